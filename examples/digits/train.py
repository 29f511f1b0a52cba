"""Regenerate the bundled digits example: real soup ingredients that need no network.

The README's first command merges these folders, so they must be genuine fine-tunes that
share one initialization (the precondition of Wortsman et al. 2022, "Model soups"), small
enough to commit, and stored exactly the way the Hub stores timm models.

Digits is too easy for a soup to matter when every model sees all the data (fine-tunes sit
at ~99%), so the example mimics transfer from an upstream checkpoint:

1. scikit-learn's bundled ``load_digits`` (1797 8x8 images, values 0..16) is split into
   stratified train / val / test (60/20/20) with a fixed seed; val is the held-out set for
   greedy soup selection, test is for unbiased final numbers. Val and test are written as
   ImageFolder trees of 8x8 grayscale PNGs (``data/<split>/<digit>/``);
2. ``base`` stands in for a pretrained checkpoint: trained from a seeded random init on the
   train-split images of digits 0-4 only, then given a linear-probed 10-way head (backbone
   and BatchNorm statistics frozen) on the fine-tuning set: 30 train-split images per digit;
3. four ingredients are fully fine-tuned from ``base`` on that fine-tuning set with different
   learning rates, lengths, seeds, shift augmentation and label smoothing, as in the paper's
   hyperparameter grid; BatchNorm runs in train mode, so each keeps its own running stats;
4. every model is saved with timm's own ``save_for_hf`` (``model.safetensors`` in float16 with
   the BatchNorm buffers, plus timm's Hub ``config.json``), reloaded through
   ``timm.create_model('local-dir:...', pretrained=True)`` and scored through timm's data
   config, eval transform and PIL loading of the PNGs; ``RESULTS.md`` records the numbers.

Training inputs are produced by the same timm eval transform that the saved config yields,
applied to the same 8x8 images, so training and evaluation preprocessing cannot drift apart;
the script asserts this on the written PNGs.

Run with ``python examples/digits/train.py`` (CPU, two threads, well under three minutes).
Runs are seeded and use deterministic algorithms; bit-identical weights are still only
expected on the same torch version and CPU kind.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import ImageDataset, create_transform, resolve_model_data_config
from timm.models import save_for_hf
from torch import nn

EXAMPLE_DIR = Path(__file__).resolve().parent
INGREDIENTS_DIR = EXAMPLE_DIR / "ingredients"
BASE_DIR = EXAMPLE_DIR / "base"
DATA_DIR = EXAMPLE_DIR / "data"

# Smallest timm test architecture that is a plain CNN with BatchNorm (the soup story needs
# running statistics to average) at ~0.37M parameters, i.e. ~0.75 MB per fp16 checkpoint.
ARCHITECTURE = "test_resnet"
NUM_CLASSES = 10
# test_resnet downsamples 32x; 8x8 digits upsampled to 32x32 leave a 1x1 final feature map.
IMG_SIZE = 32
SPLIT_SEED = 0
INIT_SEED = 0
HEAD_SEED = 7
PRETRAIN_CLASSES = 5  # the stand-in "upstream" task sees digits 0-4 only
FINE_TUNE_PER_CLASS = 30
BATCH_SIZE = 64
LABEL_NAMES = [str(d) for d in range(NUM_CLASSES)]


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of one training run (SGD, Nesterov momentum, cosine schedule).

    ``shift`` is the maximum random translation in 32x32 pixels (4 = one original 8x8 pixel).
    """

    name: str
    lr: float
    epochs: int
    seed: int
    shift: int = 0
    label_smoothing: float = 0.0
    weight_decay: float = 5e-4


PRETRAIN = Recipe("pretrain", lr=0.05, epochs=8, seed=100)
LINEAR_PROBE = Recipe("linear-probe", lr=0.05, epochs=30, seed=101, weight_decay=0.0)
INGREDIENTS = (
    Recipe("ft-lr0.01", lr=0.01, epochs=20, seed=1),
    Recipe("ft-lr0.02-shift", lr=0.02, epochs=30, seed=2, shift=4),
    Recipe("ft-lr0.02-ls0.1", lr=0.02, epochs=20, seed=3, label_smoothing=0.1),
    Recipe("ft-lr0.05-shift-ls0.1", lr=0.05, epochs=40, seed=4, shift=4, label_smoothing=0.1),
)


def split_indices() -> dict[str, np.ndarray]:
    """Return sorted ``load_digits`` indices of the stratified 60/20/20 train/val/test split."""
    labels = load_digits().target
    all_idx = np.arange(len(labels))
    train, rest = train_test_split(all_idx, test_size=0.4, stratify=labels, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=SPLIT_SEED)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def fine_tune_indices(train_idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pick the shared fine-tuning set: ``FINE_TUNE_PER_CLASS`` seeded train images per digit."""
    rng = np.random.default_rng(SPLIT_SEED)
    picks = [
        rng.choice(train_idx[labels[train_idx] == c], FINE_TUNE_PER_CLASS, replace=False) for c in range(NUM_CLASSES)
    ]
    return np.sort(np.concatenate(picks))


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Return all digits as uint8 8x8 images (0..16 scaled to 0..255) and their labels."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def image_file_name(index: int) -> str:
    """Name a PNG after its ``load_digits`` index, so files are deterministic and traceable."""
    return f"digits_{index:04d}.png"


def digits_pretrained_cfg(train_images: np.ndarray) -> dict[str, Any]:
    """Preprocessing for the saved config: one-channel mean/std of the train split, no crop.

    ``crop_pct=1.0`` makes timm's eval transform a plain resize to 32x32, so the whole
    8x8 digit is kept; the tag replaces the inherited ImageNet one (``r160_in1k``).
    """
    pixels = train_images.astype(np.float64) / 255.0
    return {
        "tag": "digits",
        "input_size": (1, IMG_SIZE, IMG_SIZE),
        "pool_size": (1, 1),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": (round(float(pixels.mean()), 4),),
        "std": (round(float(pixels.std()), 4),),
        "num_classes": NUM_CLASSES,
    }


def create_digits_model(pretrained_cfg: dict[str, Any]) -> nn.Module:
    """Build the architecture with the digits preprocessing recorded in its pretrained_cfg."""
    return timm.create_model(
        ARCHITECTURE,
        pretrained=False,
        num_classes=NUM_CLASSES,
        in_chans=1,
        pretrained_cfg_overlay=pretrained_cfg,
    )


def eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The transform an evaluator derives from the model's (saved) config."""
    return create_transform(**resolve_model_data_config(model), is_training=False)


def preprocess(images: np.ndarray, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Apply the eval transform to uint8 images via PIL, exactly as for the PNG files."""
    return torch.stack([transform(Image.fromarray(img)) for img in images])


def write_image_folders(images: np.ndarray, labels: np.ndarray, splits: dict[str, np.ndarray]) -> None:
    """Write val and test as ``data/<split>/<digit>/digits_<index>.png`` (ImageFolder layout)."""
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    for split in ("val", "test"):
        for index in splits[split]:
            class_dir = DATA_DIR / split / LABEL_NAMES[labels[index]]
            class_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(class_dir / image_file_name(int(index)))


def random_shift(x: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, background: float) -> None:
    """Train ``module`` in place; the recipe's seed fixes batch order and augmentation.

    ``background`` is the normalized value of a blank pixel, used to fill shifted images.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(x) / BATCH_SIZE)
    optimizer = torch.optim.SGD(
        module.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    module.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            inputs = x[batch]
            if recipe.shift:
                inputs = random_shift(inputs, recipe.shift, background, generator)
            loss = F.cross_entropy(module(inputs), y[batch], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def linear_probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Give the pretrained backbone a fresh, seeded 10-way head trained on frozen features.

    Like initializing fine-tunes from a zero-shot or linear-probe head in the paper, this
    makes ``base`` a usable 10-class model whose head every ingredient starts from.
    """
    model.eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.manual_seed(HEAD_SEED)
    model.reset_classifier(NUM_CLASSES)
    train(model.get_classifier(), features, y, LINEAR_PROBE, background=0.0)


def save_folder(model: nn.Module, folder: Path) -> None:
    """Save as a timm Hub folder with timm's own writer, weights cast to float16.

    ``Module.half`` casts only floating tensors, so ``num_batches_tracked`` stays int64.
    """
    shutil.rmtree(folder, ignore_errors=True)
    save_for_hf(
        copy.deepcopy(model).half(),
        str(folder),
        model_config={"label_names": LABEL_NAMES},
        safe_serialization=True,
    )


def load_folder(folder: Path) -> nn.Module:
    """Load a saved folder the offline-Hub way: architecture, args and preprocessing from config.json."""
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@torch.no_grad()
def image_folder_accuracy(model: nn.Module, root: Path) -> float:
    """Accuracy on an ImageFolder tree, loaded by timm's dataset (grayscale) and config transform."""
    dataset = ImageDataset(str(root), input_img_mode="L", transform=eval_transform(model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(dataset)


def check_png_roundtrip(model: nn.Module, x_val: torch.Tensor, val_idx: np.ndarray) -> None:
    """Fail unless the PNG + timm path reproduces the training-time tensors bit for bit."""
    dataset = ImageDataset(str(DATA_DIR / "val"), input_img_mode="L", transform=eval_transform(model))
    row_of = {int(index): row for row, index in enumerate(val_idx)}
    for (path, _), (tensor, _) in zip(dataset.reader.samples, dataset):
        index = int(Path(path).stem.split("_")[1])
        if not torch.equal(tensor, x_val[row_of[index]]):
            raise RuntimeError(f"timm's eval path on {path} differs from the training preprocessing")


def write_results(rows: list[tuple[str, float, float]], sizes: dict[str, int]) -> None:
    """Write RESULTS.md with the recipes and accuracies measured through the saved folders."""
    recipes = {r.name: r for r in INGREDIENTS}
    lines = [
        "# Digits example: measured accuracies",
        "",
        (
            "Generated by `train.py`. Each folder was reloaded with "
            "`timm.create_model('local-dir:<folder>', pretrained=True)` and scored on the PNG "
            "image folders through timm's data config and eval transform (images opened as `L`)."
        ),
        "Images: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".",
        "",
        "| model | lr | epochs | shift | label smoothing | seed | val acc | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, val, test in rows:
        r = recipes.get(name)
        recipe = f"{r.lr} | {r.epochs} | {r.shift} | {r.label_smoothing} | {r.seed}" if r else "- | - | - | - | -"
        lines.append(f"| {name} | {recipe} | {val:.2%} | {test:.2%} |")
    (EXAMPLE_DIR / "RESULTS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Build data, train base and ingredients, save, reload and evaluate everything."""
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    images, labels = digits_uint8()
    splits = split_indices()
    write_image_folders(images, labels, splits)

    cfg = digits_pretrained_cfg(images[splits["train"]])
    torch.manual_seed(INIT_SEED)
    base = create_digits_model(cfg)
    transform = eval_transform(base)
    check_png_roundtrip(base, preprocess(images[splits["val"]], transform), splits["val"])
    background = -cfg["mean"][0] / cfg["std"][0]

    source_idx = splits["train"][labels[splits["train"]] < PRETRAIN_CLASSES]
    ft_idx = fine_tune_indices(splits["train"], labels)
    x_ft, y_ft = preprocess(images[ft_idx], transform), torch.from_numpy(labels[ft_idx])
    train(base, preprocess(images[source_idx], transform), torch.from_numpy(labels[source_idx]), PRETRAIN, background)
    linear_probe(base, x_ft, y_ft)
    save_folder(base, BASE_DIR)

    shutil.rmtree(INGREDIENTS_DIR, ignore_errors=True)
    folders = {"base": BASE_DIR}
    for recipe in INGREDIENTS:
        model = copy.deepcopy(base)
        train(model, x_ft, y_ft, recipe, background)
        folders[recipe.name] = INGREDIENTS_DIR / recipe.name
        save_folder(model, folders[recipe.name])

    rows = []
    for name, folder in folders.items():
        model = load_folder(folder)
        val, test = (image_folder_accuracy(model, DATA_DIR / split) for split in ("val", "test"))
        rows.append((name, val, test))
        print(f"{name:24s} val {val:.2%}  test {test:.2%}")
    sizes = {
        "pretrain (digits 0-4)": len(source_idx),
        "fine-tune": len(ft_idx),
        "val": len(splits["val"]),
        "test": len(splits["test"]),
    }
    write_results(rows, sizes)


if __name__ == "__main__":
    main()
