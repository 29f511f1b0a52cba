"""The recipe's ``eval`` section: the fields every task shares, and each task's own.

A section is flat (``eval: {task: lm-eval, tasks: [arc_easy], limit: 100}``).
:class:`EvalSpec` holds what every task shares: the data and its split, how many
examples, the batch size and dtype, and the placement of a model bigger than one
device. A task declares its own fields (lm-eval's harness task names, custom's
function, a classifier's columns) as a subclass of :class:`EvalSpec`, its
:attr:`~hub_soup.eval.tasks.EvalTask.Spec`, the way a merge method declares its
``Parameters``; the subclass also says which shared fields the task has no use
for, and why. A section, and ``EvalSpec(task=..., ...)``, is validated as the spec
of the task it names, found through the task registry, so this module knows no
task by name: a field only another task takes is refused naming that task, one no
task takes is pydantic's "Extra inputs are not permitted".

Validation imports the named task's module to read its spec, so a task's module
imports no torch at the top (:mod:`hub_soup.eval.tasks`). Torch-free, like the recipe;
so are the rules of what names local eval data (:func:`is_local_data`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from contextlib import suppress
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, field_validator, model_validator

from hub_soup.errors import EvalError
from hub_soup.eval.tasks import get_task, task_names
from hub_soup.io.sizes import parse_size

# The floating dtypes a recipe names: a soup's (the recipe's dtype) and the one models are scored in (eval.dtype).
# Choices the CLI offers too (``typing.get_args``), so flags and recipes cannot drift apart.
Dtype = Literal["float32", "float16", "bfloat16", "float64"]

# transformers' named device maps (from_pretrained(device_map=...)); accelerate computes each
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# A single local file of eval data, by suffix: the ``datasets`` loader that reads it (``load_dataset(loader, ...)``).
DATA_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# A Hub dataset id, as huggingface_hub spells repo ids: a canonical name (imdb) or org/name.
_DATASET_ID = re.compile(r"[\w\-.]+(?:/[\w\-.]+)?")


def is_local_data(data: str) -> bool:
    """Whether ``eval.data`` can only name a local path: it starts as a path does (``.``, ``/``, ``~``), ends
    in a data file's suffix (:data:`DATA_FILE_LOADERS`), or is no Hub dataset id (``a/b/c``). Anything else
    (``imdb``, ``org/name``) names a Hub dataset unless a local path of that name exists."""
    return (
        data.startswith((".", "~")) or os.path.isabs(data) or Path(data).suffix.lower() in DATA_FILE_LOADERS
        or _DATASET_ID.fullmatch(data) is None
    )


def _is_device(device: object, *, placing: bool) -> bool:
    """A device accelerate's ``device_map`` (``placing``) or ``max_memory`` takes: a GPU index, cpu, mps, and
    for placement also ``cuda:N`` and disk."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return int(device) >= 0
    named = {"cpu", "mps", "disk"} if placing else {"cpu", "mps"}
    return device in named or (placing and isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device) is not None)


def _every_tasks_fields(schema: dict[str, Any], model: type) -> None:
    """The section's JSON schema (``hub-soup schema``) lists the shared fields, then each task's own, described as
    for the tasks that take it. A task an installed plugin adds is listed by name only (its fields would need its
    module imported): with one, the schema lets the section have fields it does not list."""
    if model is not EvalSpec:
        return
    properties = schema["properties"]
    takers: dict[str, list[str]] = {}
    listed = task_names(plugins=False)
    for name in listed:
        spec = spec_of(name)
        if spec is EvalSpec:  # the shared fields only
            continue
        for field, definition in spec.model_json_schema()["properties"].items():
            if field not in EvalSpec.model_fields and field not in spec.not_taken:
                properties.setdefault(field, definition)
                takers.setdefault(field, []).append(name)
    for field, names in takers.items():
        described = properties[field].get("description")
        properties[field]["description"] = f"for task: {', '.join(names)}" + (f": {described}" if described else "")
    if len(listed) < len(task_names()):
        schema.pop("additionalProperties", None)


class EvalSpec(BaseModel):
    """How to score ingredients and soups (see hub_soup.eval.evaluate)."""

    # (The docstring is the schema's description.) ``EvalSpec(task=..., ...)`` is an instance of the task's own
    # spec: the subclass it declares as ``EvalTask.Spec``, with its fields, its validators and these attributes.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_every_tasks_fields)

    needs_data: ClassVar[bool] = True  # the task reads ``data`` (False: it needs none, or reads none)
    # shared fields the task has no use for: given, whatever their value, they are refused
    not_taken: ClassVar[tuple[str, ...]] = ()
    # why: said when refusing one, and then of every field of another task given too
    not_taken_because: ClassVar[str] = ""

    task: str = Field(
        description="eval task: a built-in one or one registered with hub_soup.eval.tasks.register_task (or an "
        "installed plugin's: entry points hub_soup.tasks)",
        json_schema_extra=lambda schema: schema.update(enum=list(task_names())),
    )
    data: str | None = Field(
        None,
        description="image folder, a data file (.jsonl, .json, .csv, .parquet, .txt), local dataset path, or Hub "
        "dataset repo id (every task but lm-eval; custom: optional, the name its scores are reported on)",
    )
    split: str = "validation"
    test_split: str | None = Field(None, description="second split for unbiased final numbers")
    limit: int | None = Field(
        None, gt=0,
        description="score on N examples: the first N of a fixed (seed 0) shuffle; lm-eval: the harness's limit, "
        "the first N documents of each harness task",
    )
    batch_size: int = Field(64, gt=0)
    dtype: Dtype | None = Field(
        None,
        description="dtype models are scored in (default: the soup's, as the ingredients are saved or --dtype "
        "says; float16 on the CPU: float32)",
    )
    # models bigger than one device: accelerate's big-model placement, spelled as transformers and accelerate spell it
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="place the scored model with accelerate, as from_pretrained(device_map=...): "
        f"{', '.join(DEVICE_MAPS)}, or {{module: device}}; modules on cpu (beside a GPU) or disk are offloaded",
    )
    max_memory: dict[str, int | str] | None = Field(
        None, description="with device_map: the most each device holds, as accelerate's max_memory: "
        "{0: 20GiB, cpu: 60GiB} (GPU indices, cpu, mps)",
    )
    offload_folder: str | None = Field(
        None, description="with device_map: the folder disk-offloaded weights are kept in while scoring (a temporary "
        "folder inside it, removed afterwards)",
    )

    def __new__(cls, *args: Any, **fields: Any) -> EvalSpec:
        """``EvalSpec(task=..., ...)`` makes the task's own spec, as validating a recipe's section does (a task
        that does not load is the validator's to report)."""
        spec: type[EvalSpec] = cls
        if cls is EvalSpec and fields.get("task") in task_names():
            with suppress(EvalError):
                spec = spec_of(fields["task"])
        return super().__new__(spec)

    @model_validator(mode="wrap")
    @classmethod
    def _as_the_tasks_spec(cls, data: Any, handler: ModelWrapValidatorHandler[EvalSpec]) -> EvalSpec:
        """A section is validated as the spec of its task; what that task does not take is refused first, by name.
        With a task no one registered, that is the error: fields of other tasks wait until the task is known."""
        if not isinstance(data, dict):
            return handler(data)
        if data.get("task") not in task_names():
            return handler({name: value for name, value in data.items() if name in cls.model_fields})
        try:
            spec = spec_of(data["task"])
        except EvalError as exc:  # an installed plugin's task that does not load: bad input, as the recipe's
            raise ValueError(f"{exc.message}; {exc.hint}") from None
        if spec is not cls:
            if cls is not EvalSpec:
                raise ValueError(f"task: {data['task']}'s fields are {spec.__name__}'s, not {cls.__name__}'s")
            return spec.model_validate(data)
        spec._refuse_what_it_does_not_take(data["task"], data)
        return handler(data)

    @classmethod
    def _refuse_what_it_does_not_take(cls, task: str, given: Collection[str]) -> None:
        """Refuse the shared fields this task has no use for, and the fields only other tasks take."""
        others = {name: takers for name in given if name not in cls.model_fields and (takers := _takers(name))}
        refused = [name for name in given if name in cls.not_taken or (cls.not_taken_because and name in others)]
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: task {task} does not take {_it(refused)}"
                + (f": {cls.not_taken_because}" if cls.not_taken_because else "")
            )
        by_takers: dict[tuple[str, ...], list[str]] = {}
        for name, takers in others.items():
            by_takers.setdefault(tuple(takers), []).append(name)
        if by_takers:
            raise ValueError("; ".join(
                f"{', '.join(names)}: only task: {takers[0]} takes {_it(names)}" if len(takers) == 1
                else f"{', '.join(names)}: only tasks {', '.join(takers)} take {_it(names)}"
                for takers, names in by_takers.items()
            ))

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown eval task {value!r}; known tasks: {', '.join(task_names())}")
        return value

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str | dict[str, int | str] | None) -> str | dict[str, int | str] | None:
        if isinstance(value, str) and value not in DEVICE_MAPS:
            raise ValueError(f"{value!r} is not a device map: use {', '.join(DEVICE_MAPS)}, or {{module: device}}")
        for module, device in (value.items() if isinstance(value, dict) else ()):
            if not _is_device(device, placing=True):
                raise ValueError(
                    f"{module!r}: {device!r} is not a device (a GPU index, cuda:N, cpu, mps or disk)"
                )
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, value: Any) -> Any:
        """Keys as accelerate takes them (GPU indices, cpu, mps), each size one ``parse_size`` reads."""
        if not isinstance(value, dict):
            return value
        for device, size in value.items():
            if not _is_device(device, placing=False):
                raise ValueError(f"{device!r} is not a device (a GPU index, cpu or mps)")
            try:
                parse_size(size)
            except (ValueError, AttributeError):
                raise ValueError(f"{device!r}: not a size: {size!r} (use e.g. 20GiB, 500MB)") from None
        return {str(device): size for device, size in value.items()}

    @model_validator(mode="after")
    def _placement(self) -> EvalSpec:
        if self.device_map is None:
            given = [name for name in ("max_memory", "offload_folder") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only with device_map (--device-map auto)")
        return self

    @model_validator(mode="after")
    def _data(self) -> EvalSpec:
        if self.needs_data and self.data is None:
            raise ValueError(f"task: {self.task} needs data (--eval-data): an image folder, dataset path or Hub id")
        return self

    def with_local_paths(self, convert: Callable[[str], str], base: Path) -> EvalSpec:
        """This spec with ``convert`` applied to its local paths: ``data`` when it exists under ``base`` or can
        only be a path (:func:`is_local_data`; otherwise it names a Hub dataset), and :meth:`local_paths`."""
        changes = self.local_paths(convert)
        if self.data is not None and ((base / Path(self.data).expanduser()).exists() or is_local_data(self.data)):
            changes["data"] = convert(self.data)
        return self.model_copy(update=changes)

    def local_paths(self, convert: Callable[[str], str]) -> dict[str, str]:
        """The fields other than ``data`` that name local paths, by name, each value passed through ``convert``:
        ``offload_folder``, and a task's own (its spec adds them)."""
        return {"offload_folder": convert(self.offload_folder)} if self.offload_folder is not None else {}

    def code(self) -> list[tuple[str, str]]:
        """The code this section names, as ``(field, what)``: it runs only with ``trust_remote_code`` (a task's
        spec names its own: custom's function, lm-eval's task YAMLs)."""
        return []

    def code_refs(self) -> list[tuple[str, str]]:
        """:meth:`code` under the recipe's field names (``eval.function``), as the refusal names them."""
        return [(f"eval.{field}", what) for field, what in self.code()]

    def inputs(self) -> list[tuple[str, Path]]:
        """What scoring reads, as ``(what, path)``, for the check that an output replaces none of it: ``data``
        (a Hub id names no local path: nothing is there to replace), and a task's own."""
        return [(f"the eval data {self.data}", Path(self.data).expanduser())] if self.data is not None else []


def spec_of(task: str) -> type[EvalSpec]:
    """The spec class of ``task``: its own (:attr:`~hub_soup.eval.tasks.EvalTask.Spec`), else :class:`EvalSpec`.

    Raises:
        EvalError: no task has that name, or an installed plugin's task does not load.
    """
    return get_task(task).Spec or EvalSpec


def _takers(field: str) -> list[str]:
    """The tasks whose spec takes ``field``: every task's module is imported, so only a field the named task does
    not take asks (a plugin's task that does not load takes none here; naming it says why)."""
    takers = []
    for name in task_names():
        with suppress(EvalError):
            spec = spec_of(name)
            if field in spec.model_fields and field not in spec.not_taken:
                takers.append(name)
    return takers


def _it(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"


# The columns of a table of examples, for the tasks that read one: each default is defined once, here, and the CLI's
# help states it. A task's spec takes the ones it reads (``class MySpec(LabelColumn, TextColumn)``: pydantic orders
# the fields from the last base to the first).
class ImageColumn(EvalSpec):
    """The column of a dataset's images."""

    image_column: str = Field("image", description="dataset column with the images")


class TextColumn(EvalSpec):
    """The column of a dataset's texts."""

    text_column: str = Field("text", description="dataset column with the texts")


class LabelColumn(EvalSpec):
    """The column of a dataset's labels (class indices, or class names the model's config knows)."""

    label_column: str = Field("label", description="dataset column with the labels")
