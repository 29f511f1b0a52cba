"""Eval data: checking it early, opening a split (image folder, saved dataset, a data file, data files, Hub
dataset) and the example order.

Every task reads its split once, in one fixed order (:func:`example_order`), so
every ingredient, soup and ensemble is scored on the same examples, and the first
batches BatchNorm is recalibrated on are a sample of every class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, constants

from hub_soup.errors import EvalError, NetworkError, RefNotFoundError
from hub_soup.eval.spec import DATA_FILE_LOADERS, is_local_data
from hub_soup.eval.tasks import get_task
from hub_soup.hub.errors import hub_errors, with_retries
from hub_soup.hub.resolve import closest_entry, near_miss

if TYPE_CHECKING:
    from hub_soup.eval.spec import EvalSpec

# Model inputs: an image batch tensor, or the keyword tensors a transformers model takes.
Inputs = torch.Tensor | dict[str, torch.Tensor]
# Files ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write.
_SAVED_DATASET = "state.json"
_SAVED_DATASET_DICT = "dataset_dict.json"
# What --eval-data (eval.data) may name, for hints.
_DATA_KINDS = (
    "an image folder, a data file (.jsonl, .json, .csv, .parquet, .txt), a saved dataset, a folder of data files, "
    "or a Hub dataset repo id"
)


def check_data(spec: EvalSpec, base: Path, token: str | bool | None = None) -> None:
    """Refuse, before anything is downloaded, eval data no task could open: a path that does not exist, a
    file of a kind ``datasets`` has no loader for, or an ``org/name`` that reads as a mistyped local path
    (its ``org/`` folder exists under ``base``) and is no Hub dataset either (offline: not looked up, as
    :func:`~hub_soup.hub.resolve.resolve_ref` treats such a model ref).

    Whether ``org/name`` is a Hub dataset is asked here only in that last case; otherwise the Hub is first
    asked when the data is opened. Only the data of tasks that open it here (:func:`open_split`) is checked:
    custom and lm-eval read none, and a task of one's own reads it as it likes.
    """
    data = spec.data
    if data is None or not get_task(spec.task).opens_data:
        return
    path = Path(data).expanduser()
    if path.is_file():
        _loader_of(path)
        if spec.test_split is not None:
            _one_split(path, spec, spec.test_split)
    if path.exists():
        return
    if is_local_data(data):
        close = _close_name(path)
        raise EvalError(
            f"eval data {data}: no such file or folder" + (f"; did you mean {close}?" if close else ""),
            hint=f"--eval-data (eval.data) is {_DATA_KINDS}",
        )
    near = near_miss(base, data) if "/" in data else None
    if constants.is_offline_mode():
        if near is None:
            return  # a Hub dataset in the local cache is used offline; the loader says if it is not there
        raise EvalError(
            f"eval data {data!r}: no local path of that name exists ({near}), and offline mode is on "
            "(HF_HUB_OFFLINE=1), so it was not looked up on the Hub",
            hint="check the path; a Hub dataset is only used offline once it is in the local cache",
        )
    # looked up now, with hub-soup's own short retries: a Hub that cannot be reached, or a dataset that is not
    # there, stops the run in seconds and before any merging (datasets' loader retries for half a minute)
    try:
        with_retries(lambda: _dataset_info(data, token), f"looking up the dataset {data}")
    except RefNotFoundError:
        raise EvalError(
            f"eval data {data!r}: no Hub dataset of that name, nor is it a local path" + (f" ({near})" if near else ""),
            hint=f"--eval-data (eval.data) is {_DATA_KINDS}",
        ) from None


def _dataset_info(repo_id: str, token: str | bool | None) -> None:
    with hub_errors(repo_id, action="look up the dataset"):
        HfApi().dataset_info(repo_id, token=token)


def _close_name(path: Path) -> Path | None:
    """The entry of ``path``'s folder whose name is closest to ``path``'s (None: no folder, or none close)."""
    if not path.parent.is_dir():
        return None
    close = closest_entry(path.parent, path.name)
    return path.parent / close if close else None


def _loader_of(path: Path) -> str:
    """The ``datasets`` loader that reads the data file ``path`` (:data:`~hub_soup.eval.spec.DATA_FILE_LOADERS`)."""
    loader = DATA_FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise EvalError(
            f"eval data {path} is a file, and not one of the kinds read as eval data "
            f"({', '.join(DATA_FILE_LOADERS)})",
            hint=f"--eval-data (eval.data) is {_DATA_KINDS}",
        )
    return loader


def open_split(spec: EvalSpec, split: str, *, image_folders: bool) -> Any:
    """``split`` of ``spec.data`` as an image folder (a ``Path``) or a ``datasets.Dataset``.

    A local ``data`` path may be: a data file (:func:`_data_file`); a ``DatasetDict.save_to_disk``
    folder; a folder with one subfolder per split (``data/<split>``), each an image folder or a
    ``save_to_disk`` dataset; a single image folder or saved dataset (then only ``spec.split`` refers
    to it, so a test split can never silently reuse the selection data); or data files ``datasets``
    can split by name (``data/validation.jsonl``, ``data/<split>-*.parquet``). Anything else is a Hub
    dataset repo id. ``image_folders`` says whether the task reads image folders (a text task refuses
    them by name).
    """
    assert spec.data is not None  # EvalSpec requires data of every task that reads it
    path = Path(spec.data).expanduser()
    if not path.exists():
        return _hub_dataset(spec.data, split)
    if path.is_file():
        return _data_file(path, spec, split)
    if (path / _SAVED_DATASET_DICT).is_file():
        splits = import_datasets().load_from_disk(str(path))
        if split not in splits:
            raise EvalError(f"{path}: no split {split!r}; it has {', '.join(splits)}")
        return splits[split]
    folder = path / split
    if not folder.is_dir() and (is_image_folder(path) or (path / _SAVED_DATASET).is_file()):
        if split != spec.split:
            raise EvalError(
                f"{path} holds one split, already used as {spec.split!r}; there is no {path / split}",
                hint=f"put each split in its own folder: {path}/<split>/<class>/<image>",
            )
        folder = path
    if (folder / _SAVED_DATASET).is_file():
        return import_datasets().load_from_disk(str(folder))
    if folder.is_dir() and is_image_folder(folder):
        if not image_folders:
            raise EvalError(f"{folder} is an image folder, but task {spec.task} reads text")
        return folder  # read with timm, no datasets needed
    try:
        return import_datasets().load_dataset(str(path), split=split)
    except (ValueError, FileNotFoundError) as exc:
        raise EvalError(f"{path}: cannot read split {split!r} as a dataset ({exc})") from None


def _data_file(path: Path, spec: EvalSpec, split: str) -> Any:
    """A single data file, read by the ``datasets`` loader of its kind: it holds one split, the one ``spec.split``
    names (``datasets`` calls it ``train``), so a test split can never silently reuse the selection data."""
    loader = _loader_of(path)
    _one_split(path, spec, split)
    datasets = import_datasets()
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except (ValueError, datasets.exceptions.DatasetsError) as exc:  # the loader's own error is the cause
        raise EvalError(f"{path}: cannot read it as {loader} data ({exc.__cause__ or exc})") from None


def _one_split(path: Path, spec: EvalSpec, split: str) -> None:
    """Refuse a second split of the data file ``path``: it is ``spec.split``, and nothing else."""
    if split != spec.split:
        raise EvalError(
            f"{path} is one file, already used as split {spec.split!r}; it holds no split {split!r}",
            hint=f"put each split in a file of its own, in one folder ({path.parent / 'validation'}{path.suffix}, "
            f"{path.parent / 'test'}{path.suffix}), and pass the folder",
        )


def _hub_dataset(repo_id: str, split: str) -> Any:
    datasets = import_datasets()
    try:
        return datasets.load_dataset(repo_id, split=split)
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise EvalError(
            f"eval data {repo_id!r} is neither a local path nor a Hub dataset ({exc})",
            hint=f"--eval-data (eval.data) is {_DATA_KINDS} you can access",
        ) from None
    except ConnectionError as exc:  # datasets' "Couldn't reach ... on the Hub"
        if not datasets.config.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE: the user's choice
            raise NetworkError(
                f"eval data {repo_id!r} is no local path, and the Hub dataset of that name cannot be reached at "
                f"{constants.ENDPOINT} ({exc})",
                hint="check the path, your connection (or HF_ENDPOINT); a Hub dataset in the local cache is used "
                "offline with HF_HUB_OFFLINE=1",
            ) from None
        raise EvalError(
            f"eval data {repo_id!r} is no local path, and offline mode is on (HF_HUB_OFFLINE=1), so the Hub "
            f"dataset of that name cannot be loaded ({exc})",
            hint="check the path; a Hub dataset is only used offline once it is in the local cache",
        ) from None
    except ValueError as exc:  # datasets' "Unknown split" and friends
        raise EvalError(f"Hub dataset {repo_id}: cannot load split {split!r} ({exc})") from None


def checked_columns(table: Any, columns: Sequence[str], spec: EvalSpec, split: str) -> Any:
    """``table`` once it is known to have ``columns``."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise EvalError(
            f"{spec.data} ({split}) has no column {missing[0]!r}; columns: {', '.join(table.column_names)}",
            hint="set image_column / text_column / label_column in the eval section",
        )
    return table


def text_rows(spec: EvalSpec, split: str, columns: Sequence[str]) -> Any:
    """The split's rows (a ``datasets.Dataset`` with ``columns``) in the fixed example order, for text tasks."""
    table = checked_columns(open_split(spec, split, image_folders=False), columns, spec, split)
    return table.select(example_order(len(table), spec.limit))


def example_order(total: int, limit: int | None) -> list[int]:
    """The examples to score, in a fixed pseudo-random order (its first ``limit`` with a limit).

    Not the stored order: image folders and many datasets are sorted by class, so the
    first N examples, and the first batches BatchNorm is recalibrated on, would cover
    a few classes only (measured: 4 class-sorted batches of digits cost a soup 2 points).
    """
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0)).tolist()
    return order[:limit] if limit is not None else order


def is_image_folder(folder: Path) -> bool:
    """True if ``folder`` holds images one level down (``<class>/<image>``)."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    return any(p.suffix.lower() in extensions for p in folder.glob("*/*"))


def decoded_images(table: Any, column: str) -> Any:
    """Make ``datasets`` decode ``column`` to PIL images (parquet files often store raw ``{bytes, path}``)."""
    datasets = import_datasets()
    if not isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image())
    return table


def import_datasets() -> Any:
    """``datasets``, its progress bars off when huggingface_hub's are (the CLI's switch: quiet, CI, no terminal)."""
    try:
        import datasets
    except ImportError:
        raise EvalError("evaluation data needs the datasets package", hint="pip install 'hub-soup[eval]'") from None
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        datasets.disable_progress_bars()
    return datasets


def tokenized(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int, max_positions: int, language_model: bool
) -> list[dict[str, torch.Tensor]]:
    """``texts`` tokenized in batches of ``batch_size``, each padded on the right to its longest text
    and truncated to what both the tokenizer and the model (``max_positions``) take.

    A language model scores tokens alone (GPT-2 would add token-type embeddings), so it gets none.
    """
    tokenizer.padding_side = "right"
    return [
        dict(
            tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=min(tokenizer.model_max_length, max_positions),
                return_tensors="pt",
                return_token_type_ids=False if language_model else None,
            )
        )
        for start in range(0, len(texts), batch_size)
    ]
