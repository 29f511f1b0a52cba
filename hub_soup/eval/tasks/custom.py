"""Task ``custom``: a user's ``module:function`` (or ``path/to/file.py:function``) scores the model.

The function takes the model (eval mode, inference mode) and returns a float,
better in the direction the spec declares (``higher_is_better``). It is someone's
code, so it is imported only with ``trust_remote_code``. Like every task module,
this one imports no torch: validating a recipe reads :class:`CustomSpec` from it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from hub_soup.errors import EvalError, UntrustedCodeError
from hub_soup.eval.metrics import Metric
from hub_soup.eval.spec import EvalSpec
from hub_soup.eval.tasks import Batch, EvalTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub_soup.eval.data import Inputs


class CustomSpec(EvalSpec):
    """``task: custom``: the function, and its score's direction; ``data`` only names what the scores are on."""

    needs_data = False

    function: str | None = Field(None, description="module:function (model -> float), or path/to/file.py:function")
    higher_is_better: bool = Field(True, description="direction of the function's score (others know theirs)")

    @model_validator(mode="after")
    def _function_given(self) -> CustomSpec:
        if not self.function:
            raise ValueError("task: custom needs function: 'module:function'")
        return self

    def local_paths(self, convert: Callable[[str], str]) -> dict[str, str]:
        """A ``path/to/file.py:function``'s file too (a module name is imported from ``sys.path``)."""
        paths = super().local_paths(convert)
        module, _, name = (self.function or "").rpartition(":")
        if module.endswith(".py"):
            paths["function"] = f"{convert(module)}:{name}"
        return paths

    def code(self) -> list[tuple[str, str]]:
        return [*super().code(), *([("function", self.function)] if self.function else [])]


class Custom(EvalTask):
    """The user's function is the metric, named after it, in the spec's direction; no data, no outputs."""

    name = "custom"
    Spec = CustomSpec
    spec: CustomSpec
    has_outputs = False
    scoring = "each model with its function, which gives back one number"

    def __init__(self, spec: EvalSpec, *args: Any, trust_remote_code: bool = False, **kwargs: Any) -> None:
        super().__init__(spec, *args, trust_remote_code=trust_remote_code, **kwargs)
        assert self.spec.function is not None  # CustomSpec validates it
        if not trust_remote_code:
            raise UntrustedCodeError(
                f"eval function {self.spec.function} is code to run; refusing to import it without "
                "--trust-remote-code",
                hint=UntrustedCodeError.HINT,
            )
        self.primary = Metric(self.spec.function, self.spec.higher_is_better)
        self._function = load_function(self.spec.function)

    @property
    def dataset(self) -> str:
        """The data the scores are reported on: ``spec.data`` where the recipe names it (the function reads what
        it reads; hub-soup reads nothing), else the function itself."""
        assert self.spec.function is not None
        return self.spec.data or self.spec.function

    def batches(self) -> list[Batch]:
        return []

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        raise _no_outputs()

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        raise _no_outputs()

    def measure_model(self, model: nn.Module) -> Mapping[str, float]:
        return {self.primary.name: float(self._function(model))}


def _no_outputs() -> EvalError:
    return EvalError("task custom has no model outputs to ensemble", hint="drop ensemble_reference")


def load_function(ref: str) -> Callable[[nn.Module], float]:
    """Import ``module:function`` or ``path/to/file.py:function``."""
    module_name, _, name = ref.partition(":")
    if not module_name or not name:
        raise EvalError(f"function {ref!r} must look like 'module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError) as exc:
        raise EvalError(
            f"cannot import the eval function's module {module_name!r} ({exc})",
            hint="pass an importable module, or a file path like ./my_eval.py:score",
        ) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise EvalError(f"{module_name} has no function {name!r}")
    return function
