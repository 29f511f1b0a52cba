"""Evaluation on real models and real data: timm on digits, tiny transformers built offline.

The digits kit (:func:`digits_kit`) is shared with ``test_greedy.py`` and ``test_diagnose.py``:
a timm ``test_resnet`` (BatchNorm) pretrained on digits 0-4, linear-probed, then fine-tuned
four ways on 30 images per digit, plus two models trained from independent random inits;
every model saved the Hub way (``save_for_hf``: fp16 ``model.safetensors`` + ``config.json``),
and val/test PNG image folders. It trains once per session, in seconds.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from filelock import FileLock
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.models import save_for_hf

from hub_soup.cli import main
from hub_soup.errors import EXIT_BAD_INPUT, EvalError, UntrustedCodeError
from hub_soup.eval.bn import has_batchnorm, recalibrate_bn
from hub_soup.eval.evaluate import Evaluator
from hub_soup.eval.metrics import ACCURACY, NLL, PERPLEXITY
from hub_soup.eval.score import Score, compare_to_best
from hub_soup.eval.spec import EvalSpec
from hub_soup.io.read import Checkpoint, open_checkpoint
from tests.hub_server import HubServer

LABEL_NAMES = [str(d) for d in range(10)]
PRETRAINED_CFG = {
    "input_size": (1, 32, 32),  # 8x8 digits upsampled: test_resnet downsamples 32x
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.3,),
    "std": (0.37,),
    "num_classes": 10,
}
# (name, learning rate, steps, batch seed, max shift in pixels): a small hyperparameter grid.
FINE_TUNES = (
    ("ft-lr0.01", 0.01, 60, 1, 0),
    ("ft-lr0.02-shift", 0.02, 60, 2, 4),
    ("ft-lr0.03", 0.03, 60, 3, 0),
    ("ft-lr0.02", 0.02, 60, 4, 0),
)
INDEPENDENT_SEEDS = (11, 12)


@dataclass(frozen=True)
class DigitsKit:
    """Folders of trained timm models and the image folders they are scored on."""

    data: Path  # data/{val,test}/<digit>/*.png
    base: Path
    ingredients: list[Path]  # fine-tunes of base, in FINE_TUNES order
    independent: list[Path]  # two trainings from different random inits

    def open(self, folders: list[Path]) -> list[Checkpoint]:
        return [open_checkpoint(folder, label=folder.name) for folder in folders]


def digits_kit(tmp_path_factory: pytest.TempPathFactory) -> DigitsKit:
    """Train and save the digits models once per session (see the module docstring).

    The session's base temp folder is the cache, not a module global: pytest imports this
    file as ``test_evaluate`` while other test files import it as ``tests.test_evaluate``.
    Under pytest-xdist the workers share their parent temp folder: the first to get the lock
    trains, the others wait and read (training is deterministic: one thread, seeded).
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "digits-kit"
    with FileLock(str(shared / "digits-kit.lock")):
        if not (root / "complete").exists():
            shutil.rmtree(root, ignore_errors=True)
            _train_digits(root)
            (root / "complete").touch()
    return DigitsKit(
        data=root / "data",
        base=root / "base",
        ingredients=[root / name for name, *_ in FINE_TUNES],
        independent=[root / f"independent-{seed}" for seed in INDEPENDENT_SEEDS],
    )


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsKit:
    return digits_kit(tmp_path_factory)


def _create(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=10, in_chans=1, pretrained_cfg_overlay=PRETRAINED_CFG)


def _fit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, seed: int, shift: int = 0
) -> None:
    """SGD with Nesterov momentum and a cosine schedule; ``seed`` fixes batches and shifts."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=generator)
        inputs = x[batch]
        if shift:
            dy, dx = torch.randint(-shift, shift + 1, (2,), generator=generator).tolist()
            inputs = torch.roll(inputs, (dy, dx), (2, 3))
        loss = F.cross_entropy(model(inputs), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _save(model: torch.nn.Module, folder: Path) -> None:
    """Save the Hub way: fp16 ``model.safetensors`` (int64 ``num_batches_tracked``) and timm's ``config.json``."""
    save_for_hf(
        copy.deepcopy(model).half(), str(folder), model_config={"label_names": LABEL_NAMES}, safe_serialization=True
    )


def _train_digits(root: Path) -> None:
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target
    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=0)
    for split, rows in (("val", val), ("test", test)):
        for row in rows:
            folder = root / "data" / split / LABEL_NAMES[labels[row]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row], mode="L").save(folder / f"digits_{row:04d}.png")

    base = _create(0)
    transform = create_transform(**resolve_data_config(model=base))  # what the Evaluator will use

    def tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([transform(Image.fromarray(images[r], mode="L")) for r in rows])
        return x, torch.from_numpy(labels[rows])

    rng = np.random.default_rng(0)
    fine_tune = np.sort(np.concatenate([rng.choice(train[labels[train] == c], 30, replace=False) for c in range(10)]))
    x_ft, y_ft = tensors(fine_tune)
    _fit(base, *tensors(train[labels[train] < 5]), lr=0.05, steps=60, seed=100)  # "pretraining" on digits 0-4
    with torch.no_grad():
        features = base.forward_head(base.forward_features(x_ft), pre_logits=True)
    torch.manual_seed(7)
    base.reset_classifier(10)
    _fit(base.get_classifier(), features, y_ft, lr=0.05, steps=60, seed=101)  # linear probe

    _save(base, root / "base")
    for name, lr, steps, seed, shift in FINE_TUNES:
        model = copy.deepcopy(base)
        _fit(model, x_ft, y_ft, lr, steps, seed, shift)
        _save(model, root / name)
    for seed in INDEPENDENT_SEEDS:
        model = _create(seed)
        _fit(model, x_ft, y_ft, lr=0.05, steps=60, seed=seed)
        _save(model, root / f"independent-{seed}")


def image_spec(data: Path | str, **fields: object) -> EvalSpec:
    return EvalSpec(task="image-classification", data=str(data), split="val", test_split="test", **fields)


# -- image classification --------------------------------------------------------------------------


def test_image_folder_accuracy_equals_timms_own_eval(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    evaluator = Evaluator(image_spec(digits.data, batch_size=50), checkpoint)
    score = evaluator.score_state_dict(checkpoint.state_dict())

    model = timm.create_model(f"local-dir:{digits.ingredients[0]}", pretrained=True).eval()
    dataset = ImageDataset(
        str(digits.data / "val"), input_img_mode="L", transform=create_transform(**resolve_data_config(model=model))
    )
    correct, log_loss = 0, 0.0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=128):
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            log_loss += float(F.cross_entropy(logits.double(), y, reduction="sum"))
    assert (score.primary, score.value, score.examples, score.split, score.dataset) == (
        ACCURACY, correct / len(dataset), 359, "val", str(digits.data)
    )
    [(nll, value)] = score.others
    assert nll is NLL and not nll.higher_is_better and value == pytest.approx(log_loss / len(dataset), rel=1e-4)
    assert score.value > 0.9
    assert evaluator.score(evaluator.build_model()).value < 0.5  # a fresh instance is untrained
    test = Evaluator(image_spec(digits.data), checkpoint, split="test").score_state_dict(checkpoint.state_dict())
    assert (test.split, test.examples) == ("test", 360)


def test_limit_takes_a_sample_of_every_class(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    evaluator = Evaluator(image_spec(digits.data, limit=30, batch_size=8), checkpoint)
    outputs = evaluator.predict(evaluator.model_with(checkpoint.state_dict()))
    assert outputs.shape == (30, 10)
    assert evaluator.examples == 30
    # a fixed shuffle, not the stored order: the folder is sorted by class and its first 30 are all zeros
    assert len(set(outputs.argmax(1).tolist())) >= 8


def test_a_single_image_folder_is_only_the_selection_split(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    spec = image_spec(digits.data / "val")
    assert Evaluator(spec, checkpoint).examples == 359
    with pytest.raises(EvalError, match="holds one split"):
        Evaluator(spec, checkpoint, split="test")


def test_hub_image_dataset_scores_like_the_same_images_in_a_folder(
    digits: DigitsKit, hub: HubServer, hub_token: str, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi

    paths = sorted((digits.data / "val").glob("*/*.png"))
    table = pa.table(
        {
            "img": [{"bytes": p.read_bytes(), "path": p.name} for p in paths],
            "digit": [int(p.parent.name) for p in paths],
        }
    )
    folder = tmp_path / "upload" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "validation-00000-of-00001.parquet")
    api = HfApi(token=hub_token)
    repo_id = api.create_repo(f"digits-{uuid.uuid4().hex[:8]}", repo_type="dataset").repo_id
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=tmp_path / "upload")

    [checkpoint] = digits.open(digits.ingredients[:1])
    spec = EvalSpec(
        task="image-classification", data=repo_id, split="validation", image_column="img", label_column="digit"
    )
    hub_score = Evaluator(spec, checkpoint).score_state_dict(checkpoint.state_dict())
    folder_score = Evaluator(image_spec(digits.data), checkpoint).score_state_dict(checkpoint.state_dict())
    assert (hub_score.value, hub_score.examples, hub_score.dataset) == (folder_score.value, 359, repo_id)

    with pytest.raises(EvalError, match="no column 'image'"):
        Evaluator(EvalSpec(task="image-classification", data=repo_id, split="validation"), checkpoint)
    with pytest.raises(EvalError, match="split 'nope'"):
        Evaluator(spec, checkpoint, split="nope")


def test_state_dicts_load_strictly(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    evaluator = Evaluator(image_spec(digits.data, limit=10), checkpoint)
    state_dict = checkpoint.state_dict()
    with pytest.raises(EvalError, match="not in the model.*'extra.weight'"):
        evaluator.score_state_dict({**state_dict, "extra.weight": torch.zeros(1)})
    with pytest.raises(EvalError, match="missing, e.g. 'fc.bias'"):
        evaluator.score_state_dict({k: v for k, v in state_dict.items() if k != "fc.bias"})


def test_ensemble_averages_probabilities(digits: DigitsKit) -> None:
    checkpoints = digits.open(digits.ingredients[:2])
    evaluator = Evaluator(image_spec(digits.data), checkpoints[0])
    ensemble = evaluator.ensemble_score([c.state_dict() for c in checkpoints])

    models = [timm.create_model(f"local-dir:{folder}", pretrained=True).eval() for folder in digits.ingredients[:2]]
    transform = create_transform(**resolve_data_config(model=models[0]))
    dataset = ImageDataset(str(digits.data / "val"), input_img_mode="L", transform=transform)
    with torch.no_grad():
        correct = sum(
            int((sum(m(x).softmax(1) for m in models).argmax(1) == y).sum())
            for x, y in torch.utils.data.DataLoader(dataset, batch_size=128)
        )
    assert ensemble.value == pytest.approx(correct / len(dataset), abs=1 / 359 + 1e-9)  # a near-tie may flip one image
    assert ensemble.metric == "accuracy" and ensemble.examples == 359


# -- BatchNorm recalibration -------------------------------------------------------------------------


def test_recalibrate_bn_computes_the_exact_batch_statistics(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    evaluator = Evaluator(image_spec(digits.data, batch_size=64), checkpoint)
    model = evaluator.model_with(checkpoint.state_dict())
    batches = evaluator.unlabelled_batches(3)
    assert len(batches) == 3 and all(isinstance(b, torch.Tensor) for b in batches)
    first_bn = model.conv1[1]
    momentum = first_bn.momentum
    # what update_bn computes: the mean over batches of each batch's per-channel statistics
    with torch.no_grad():
        inputs = [model.conv1[0](b) for b in batches]
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)

    assert has_batchnorm(model) and recalibrate_bn(model, batches)
    assert torch.allclose(first_bn.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(first_bn.running_var, expected_var, rtol=1e-4)
    assert int(first_bn.num_batches_tracked) == 3
    assert first_bn.momentum == momentum and not model.training

    plain = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert not has_batchnorm(plain) and not recalibrate_bn(plain, [torch.zeros(1, 4)])


def test_recalibrated_state_dict_keeps_the_dtypes(digits: DigitsKit) -> None:
    [checkpoint] = digits.open(digits.ingredients[:1])
    evaluator = Evaluator(image_spec(digits.data), checkpoint)
    state_dict = checkpoint.state_dict()
    recalibrated = evaluator.recalibrated(state_dict, evaluator.unlabelled_batches(2))
    assert recalibrated is not None and recalibrated.keys() == state_dict.keys()
    assert all(recalibrated[k].dtype == v.dtype for k, v in state_dict.items())
    changed = {k for k in state_dict if not torch.equal(recalibrated[k], state_dict[k])}
    assert changed and all(
        k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed
    )


# -- text classification and causal LM with tiny transformers built offline ------------------------------

WORDS = ["the", "a", "movie", "film", "plot", "acting", "was", "is", "good", "great", "fine", "bad", "awful"]
WORDS += ["dull", "very", "not", "really"]
REVIEWS = [
    ("the movie was great", "pos"),
    ("a very good film", "pos"),
    ("the acting is fine", "pos"),
    ("really great plot", "pos"),
    ("the movie was awful", "neg"),
    ("a very bad film", "neg"),
    ("the acting is dull", "neg"),
    ("really awful plot", "neg"),
    ("not good", "neg"),
]


def _tokenizer() -> object:
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})


def _save_dataset(rows: dict[str, list], path: Path) -> Path:
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-label BertForSequenceClassification trained for a moment on REVIEWS, saved with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _tokenizer()
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=2,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    batch = tokenizer([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
    labels = torch.tensor([config.label2id[label] for _, label in REVIEWS])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_text_classification_with_the_ingredients_tokenizer(bert_classifier: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _save_dataset(
        {"review": [t for t, _ in REVIEWS], "sentiment": [s for _, s in REVIEWS]}, tmp_path / "reviews"
    )
    spec = EvalSpec(
        task="text-classification", data=str(data), text_column="review", label_column="sentiment", batch_size=4
    )
    checkpoint = open_checkpoint(bert_classifier)
    evaluator = Evaluator(spec, checkpoint)
    score = evaluator.score_state_dict(checkpoint.state_dict())

    model = AutoModelForSequenceClassification.from_pretrained(bert_classifier).eval()
    tokenizer = AutoTokenizer.from_pretrained(bert_classifier)
    with torch.no_grad():
        predictions = [
            model.config.id2label[int(model(**tokenizer(t, return_tensors="pt")).logits.argmax())] for t, _ in REVIEWS
        ]
    expected = sum(p == s for p, (_, s) in zip(predictions, REVIEWS)) / len(REVIEWS)
    assert (score.value, score.metric, score.examples, score.higher_is_better) == (
        pytest.approx(expected),
        "accuracy",
        9,
        True,
    )
    assert score.value >= 8 / 9
    bert = evaluator.model_with(checkpoint.state_dict())
    assert not recalibrate_bn(bert, evaluator.unlabelled_batches(1))  # BERT has no BatchNorm


TEXTS = ["the movie was good", "a film", "the plot was not really very good", "bad acting", "the the the"]


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny GPT-2s (tied embeddings: ``lm_head.weight`` is not saved) from one init, one trained a little."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tokenizer()
    config = GPT2Config(
        vocab_size=len(WORDS) + 5, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=2, eos_token_id=3
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    folders = []
    for n in range(2):
        if n:
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            model.train()
            for _ in range(10):
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                loss = model(**batch, labels=labels).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        folder = tmp_path_factory.mktemp(f"gpt2-{n}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


def test_causal_lm_perplexity_is_token_weighted_and_ignores_padding(gpt2_pair: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _save_dataset({"text": TEXTS}, tmp_path / "texts")
    checkpoints = [open_checkpoint(f) for f in gpt2_pair]
    assert "lm_head.weight" not in checkpoints[0].metas
    evaluator = Evaluator(EvalSpec(task="causal-lm", data=str(data), batch_size=2), checkpoints[0])
    scores = [evaluator.score_state_dict(c.state_dict()) for c in checkpoints]

    tokenizer = AutoTokenizer.from_pretrained(gpt2_pair[0])
    token_probabilities = []
    for folder in gpt2_pair:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        per_text = []
        with torch.no_grad():
            for text in TEXTS:  # one at a time: no padding at all
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                log_probs = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
                per_text.append(log_probs.double().exp())
        token_probabilities.append(torch.cat(per_text))
    for score, probabilities in zip(scores, token_probabilities):
        assert score.metric == "perplexity" and not score.higher_is_better and score.examples == len(TEXTS)
        assert score.value == pytest.approx(math.exp(-probabilities.log().mean().item()), rel=1e-5)
    assert scores[1].better_than(scores[0])  # the trained one

    ensemble = evaluator.ensemble_score([c.state_dict() for c in checkpoints])
    mixed = (token_probabilities[0] + token_probabilities[1]) / 2  # average probabilities, not logits
    assert ensemble.value == pytest.approx(math.exp(-mixed.log().mean().item()), rel=1e-5)
    # Jensen: the mixture's log-perplexity is at most the mean of the members'
    assert math.log(ensemble.value) <= (math.log(scores[0].value) + math.log(scores[1].value)) / 2


def _data_file(rows: dict[str, list], path: Path) -> Path:
    """``rows`` as the data file ``path`` names by its suffix, written as a user's tools write them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [dict(zip(rows, values)) for values in zip(*rows.values())]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows))
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        pq.write_table(pa.table(rows), path)
    else:  # .txt: one text a line, read as the column "text"
        [texts] = rows.values()
        path.write_text("".join(f"{text}\n" for text in texts))
    return path


def test_a_data_file_scores_as_the_same_rows_saved_as_a_dataset(gpt2_pair: list[Path], tmp_path: Path) -> None:
    checkpoint = open_checkpoint(gpt2_pair[1])
    saved = _save_dataset({"text": TEXTS}, tmp_path / "texts")
    expected = Evaluator(EvalSpec(task="causal-lm", data=str(saved), batch_size=2), checkpoint).score_state_dict(
        checkpoint.state_dict()
    )
    for suffix in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        data = _data_file({"text": TEXTS}, tmp_path / f"val{suffix}")
        spec = EvalSpec(task="causal-lm", data=str(data), batch_size=2)
        score = Evaluator(spec, checkpoint).score_state_dict(checkpoint.state_dict())
        assert (score.value, score.examples, score.split, score.dataset) == (
            expected.value, len(TEXTS), "validation", str(data)
        ), suffix
        with pytest.raises(EvalError, match="is one file, already used as split 'validation'; it holds no split"):
            Evaluator(spec, checkpoint, split="test")  # a test split can never silently reuse the selection data
    (tmp_path / "broken.jsonl").write_text('{"text": "the movie"\n')
    with pytest.raises(EvalError, match="broken.jsonl: cannot read it as json data"):
        Evaluator(EvalSpec(task="causal-lm", data=str(tmp_path / "broken.jsonl")), checkpoint)


def test_a_csv_file_of_texts_and_labels_scores_as_the_same_rows_saved_as_a_dataset(
    bert_classifier: Path, tmp_path: Path
) -> None:
    rows = {"review": [t for t, _ in REVIEWS], "sentiment": [s for _, s in REVIEWS]}
    checkpoint = open_checkpoint(bert_classifier)
    scores = [
        Evaluator(
            EvalSpec(task="text-classification", data=str(data), text_column="review", label_column="sentiment"),
            checkpoint,
        ).score_state_dict(checkpoint.state_dict())
        for data in (_save_dataset(rows, tmp_path / "reviews"), _data_file(rows, tmp_path / "reviews.csv"))
    ]
    assert (scores[1].value, scores[1].examples, scores[1].others) == (scores[0].value, 9, scores[0].others)


def test_the_cli_scores_on_a_data_file_named_from_where_it_runs_or_from_the_recipe(
    gpt2_pair: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _data_file({"text": TEXTS}, tmp_path / "val.jsonl")
    refs = [str(f) for f in gpt2_pair]
    assert main(["merge", *refs, "--eval-task", "causal-lm", "--eval-data", "val.jsonl", "-o", "soup"]) == 0
    assert f"scored on val.jsonl split validation ({len(TEXTS)} examples; perplexity" in capsys.readouterr().out
    (tmp_path / "recipes").mkdir()
    recipe = {"ingredients": [{"ref": r} for r in refs], "eval": {"task": "causal-lm", "data": "../val.jsonl"}}
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", "recipes/r.yaml", "-o", "again"]) == 0  # read from the recipe's folder
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "soup/model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["run", "recipes/r.yaml", "--eval-limit", "2", "-o", "limited"]) == 0  # adds to the file's section
    assert "scored on val.jsonl split validation (2 examples; perplexity" in capsys.readouterr().out
    recipe["eval"] = {"task": "causal-lm", "data": "val.jsonl"}  # not beside the recipe
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", "recipes/r.yaml", "-o", "never"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "eval data recipes/val.jsonl: no such file or folder" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()


# -- custom functions, scores, errors ----------------------------------------------------------------------


def test_custom_function_from_a_file_and_a_module(
    digits: DigitsKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "my_metric.py"
    module.write_text(
        "import torch\n"
        "def head_norm(model):\n"
        "    assert not model.training and torch.is_inference_mode_enabled()\n"
        "    return float(model.fc.weight.norm())\n"
    )
    [checkpoint] = digits.open(digits.ingredients[:1])
    state_dict = checkpoint.state_dict()
    expected = float(state_dict["fc.weight"].float().norm())
    for function in (f"{module}:head_norm", "my_metric:head_norm"):
        monkeypatch.syspath_prepend(str(tmp_path))
        spec = EvalSpec(task="custom", function=function, higher_is_better=False)
        with pytest.raises(UntrustedCodeError, match=f"eval function {function} is code to run.*--trust-remote-code"):
            Evaluator(spec, checkpoint)  # the function is someone's code: never imported unasked
        evaluator = Evaluator(spec, checkpoint, trust_remote_code=True)
        score = evaluator.score_state_dict(state_dict)
        assert (score.value, score.metric, score.higher_is_better) == (pytest.approx(expected), function, False)
        assert score.dataset == function  # custom reads no data: its scores name the function unless data names one
        with pytest.raises(EvalError, match="task custom has none"):
            evaluator.unlabelled_batches(1)
    with pytest.raises(EvalError, match="cannot import"):
        Evaluator(EvalSpec(task="custom", function="no_such_module_xyz:f"), checkpoint, trust_remote_code=True)
    with pytest.raises(EvalError, match="has no function"):
        Evaluator(EvalSpec(task="custom", function=f"{module}:missing"), checkpoint, trust_remote_code=True)


def test_scores_compare_in_their_declared_direction() -> None:
    def score(value: float, higher: bool = True) -> Score:
        return Score(ACCURACY if higher else PERPLEXITY, value, 10, "val", "d")

    assert score(0.9).better_than(score(0.8)) and not score(0.8).better_than(score(0.8))
    assert score(0.8).at_least(score(0.8)) and not score(math.nan).at_least(score(0.8))
    assert score(5.0, higher=False).better_than(score(6.0, higher=False))
    comparison = compare_to_best(score(0.85), ["a", "b", "c"], [score(0.8), score(0.9), score(0.9)])
    assert comparison.best_label == "b" and comparison.soup_is_worse
    assert "worse than its best ingredient b" in comparison.message() and "-5.00 points" in comparison.message()
    assert not compare_to_best(score(4.0, False), ["a"], [score(4.5, False)]).soup_is_worse


def test_clear_errors_for_unusable_eval_setups(
    digits: DigitsKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    from huggingface_hub import constants

    [checkpoint] = digits.open(digits.ingredients[:1])
    with pytest.raises(EvalError, match="needs a transformers model"):
        Evaluator(EvalSpec(task="text-classification", data=str(digits.data)), checkpoint)
    with pytest.raises(EvalError, match="neither a local path nor a Hub dataset"):
        Evaluator(image_spec("tester/no-such-dataset"), checkpoint)
    # HF_HUB_OFFLINE=1, as both libraries read it when imported
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EvalError, match=r"'tester/no-such-dataset' is no local path, and offline mode is on"):
        Evaluator(image_spec("tester/no-such-dataset"), checkpoint)
    monkeypatch.undo()
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes((digits.ingredients[0] / "model.safetensors").read_bytes())
    with pytest.raises(EvalError, match="no config.json"):
        Evaluator(image_spec(digits.data), open_checkpoint(bare))
    eleven = tmp_path / "few"
    for n in range(11):  # names the model does not know: timm's sorted order, 11 classes
        (eleven / "val" / f"class{n}").mkdir(parents=True)
        Image.new("L", (8, 8)).save(eleven / "val" / f"class{n}" / "x.png")
    with pytest.raises(EvalError, match="labels 0..10, but .* has 10 classes"):
        Evaluator(image_spec(eleven), checkpoint)
