"""hub-soup: trustworthy model soups (weight averaging) for the Hugging Face Hub.

The Python API builds the same :class:`Recipe` the CLI and YAML files build and
runs the same pipeline::

    import hub_soup
    result = hub_soup.merge(["org/a", "org/b"], output="soup")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub_soup import threads as _threads  # noqa: F401  (OMP_WAIT_POLICY's default, before torch is imported)
from hub_soup.errors import HubSoupError
from hub_soup.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from hub_soup.io.read import Checkpoint, open_checkpoint
    from hub_soup.pipeline import run
    from hub_soup.report import SoupResult
    from hub_soup.verification import VerifyReport, verify

__version__ = "0.1.0"
__all__ = [
    "Checkpoint", "HubSoupError", "Recipe", "SoupResult", "VerifyReport", "load_recipe", "merge", "open_checkpoint",
    "run", "verify",
]

# Names imported on first use: the pipeline imports torch (~1.5 s), which light commands
# (``hub-soup schema``, ``--help``, validating a recipe) and ``import hub_soup`` never need.
_LAZY = {
    "Checkpoint": "hub_soup.io.read",
    "open_checkpoint": "hub_soup.io.read",
    "SoupResult": "hub_soup.report",
    "run": "hub_soup.pipeline",
    "verify": "hub_soup.verification",
    "VerifyReport": "hub_soup.verification",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hub_soup' has no attribute {name!r}")


def merge(
    refs: Sequence[str],
    output: str | Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    method: str | None = None,
    base: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    exclude: Sequence[str] = (),
    ema: bool = True,
    allow_pickle: bool = False,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    max_rank: int | None = None,
    merge_into_base: bool = False,
    adapter_base: str | None = None,
    device: str = "cpu",
    push: str | None = None,
    private: bool = False,
    create_pr: bool = False,
    force: bool = False,
    token: str | bool | None = None,
) -> SoupResult | None:
    """Merge ``refs`` into a soup folder at ``output`` (and push it to ``push``), like ``hub-soup merge``.

    By default the soup is their average (weighted with ``weights``); ``method`` names another
    merge method, ``base`` the model they were fine-tuned from and ``parameters`` the method's
    (``merge(refs, "soup", method="ties", base="org/base", parameters={"density": 0.3})``).
    LoRA adapters (folders or repos with an ``adapter_config.json``) make an exact adapter soup of their
    base (``adapter_base``: another copy of it); ``max_rank`` reduces it by a truncated SVD, ``merge_into_base``
    writes the base with it merged in.
    Without ``output``, a soup that is pushed is staged in a temporary folder and
    removed after the push. See :class:`hub_soup.recipe.Recipe` for what each argument means.
    None only in the processes of an ``accelerate launch`` other than the main one, which writes.
    """
    fields: dict[str, Any] = {"method": method} if method is not None else {}
    recipe = Recipe.from_refs(
        list(refs),
        list(weights) if weights is not None else None,
        **fields,
        base={"ref": base} if base is not None else None,
        adapter_base={"ref": adapter_base} if adapter_base is not None else None,
        parameters=dict(parameters or {}),
        dtype=dtype,
        exclude=list(exclude),
        ema=ema,
        allow_pickle=allow_pickle,
        device=device,
        force=force,
        output={"path": str(output) if output is not None else None, "max_shard_size": max_shard_size,
                "overwrite": overwrite, "max_rank": max_rank, "merge_into_base": merge_into_base},
        push={"repo_id": push, "private": private, "create_pr": create_pr} if push else None,
    )
    from hub_soup.pipeline import run

    return run(recipe, token=token)
