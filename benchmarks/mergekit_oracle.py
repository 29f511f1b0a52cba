"""Opt-in oracle: mergekit 0.1.5's own per-tensor results against the float64 definitions in tests/mergekit_reference.py.

    MK=/path/to/mergekit-venv/bin/python     # an environment with mergekit 0.1.5 (and torch, yaml)
    $MK benchmarks/mergekit_oracle.py           # prints the report and writes benchmarks/MERGEKIT_ORACLE.md
    $MK benchmarks/mergekit_oracle.py --no-write

Never part of the test suite: it imports mergekit, which hub-soup's environment does not have.
It does three things.

**Methods.** For each of mergekit's 20 methods, random bf16 tensors (a 128 x 256 matrix and a
512 vector: a base, fine-tunes that share part of their change so signs and angles are not
random) are merged by mergekit's own code path -- ``mergekit.merge_methods.merge_tensors``, which
binds parameters and calls the method's ``_execute_resolved`` as the merge graph's
``ExecuteMergeMethodTask`` does -- in its two arithmetics: the inputs' own bf16 (its default on
bf16 models, and what ``dtype: bfloat16`` configs ask for) and ``dtype: float32`` (output
bf16). Each result is compared with the reference's float64 definition: the table gives the
share of elements more than one bf16 ulp from it (a correctly rounded result has none).
Elements the definition leaves undecided -- ties at a rank threshold (mergekit's ``argsort``
keeps an arbitrary subset), sign votes that are 0 up to float32 rounding -- are left out and
counted apart. The random methods are compared with mergekit's own masks: the global torch RNG
is seeded before mergekit runs, and the masks are recovered by calling mergekit's ``sparsify``
again from the same seed on the same task vectors (``rescale_norm=None``). Their rows give the
share against the papers' rescaling (``1/p`` per element) and against mergekit's L1-norm
rescaling (``l1``), which tells the arithmetic apart from the rescaling; the masks' kept
fractions are checked against their law (z-scores).

**Configs.** Every file of ``tests/mergekit_configs/`` parses with mergekit's
``MergeConfiguration``, names a registered method and only parameters that method takes
(mergekit itself ignores any other key silently).

**Parameters.** For every config, every parameter of its method is resolved for the tensors
of every output layer (attention, MLP and norm weights) and for the tensors outside the layers,
by mergekit (``parameter_resolver.resolve_parameters`` with the ``ConfigReader`` its planner
builds) and by the reference's ``resolve_scopes``; plus a few edge cases of ``evaluate_setting``
against ``resolve_parameter``. Every value must be equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "mergekit_configs"
REPORT = Path(__file__).resolve().parent / "MERGEKIT_ORACLE.md"
LAYERS = 4  # the tiny models' layer count (tests/mergekit_configs/README.md)
SHAPES = ((128, 256), (512,))
SEED = 1234


def _load_reference() -> Any:
    """tests/mergekit_reference.py by its path (``tests`` is not a package that this environment could resolve)."""
    spec = importlib.util.spec_from_file_location("mergekit_reference", ROOT / "tests" / "mergekit_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mergekit_reference"] = module
    spec.loader.exec_module(module)
    return module


R = _load_reference()


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One method's inputs and parameters, as mergekit names them (per-model ones as lists over the fine-tunes)."""

    method: str
    fine_tunes: int = 3
    base: bool = True
    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, list[Any]] = field(default_factory=dict)
    delta_scale: float = 2e-3
    sparse: bool = False  # each fine-tune changes only half of the elements (RAM's setting)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.method


CASES = [
    Case("linear", base=False, per_model={"weight": [0.5, 0.3, 0.2]}),
    Case("slerp", fine_tunes=1, shared={"t": 0.3}),
    Case("nuslerp", fine_tunes=2, per_model={"weight": [0.3, 0.7]}),
    Case("nuslerp", fine_tunes=2, base=False, per_model={"weight": [0.7, 0.3]},
         shared={"nuslerp_flatten": False, "nuslerp_row_wise": True}, label="nuslerp (rows, no base)"),
    Case("multislerp", per_model={"weight": [1.0, 1.0, 0.5]}),
    Case("karcher", base=False),
    Case("task_arithmetic", per_model={"weight": [0.4, 0.3, 0.3]}, shared={"lambda": 0.9}),
    Case("ties", per_model={"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.7, 0.3]}),
    Case("dare_ties", per_model={"weight": [0.4, 0.3, 0.3], "density": [0.53, 0.53, 0.53]}),
    Case("dare_linear", fine_tunes=2, per_model={"weight": [0.6, 0.4], "density": [0.3, 0.7]}),
    Case("breadcrumbs", fine_tunes=2, per_model={"weight": [0.3, 0.7], "density": [0.9, 0.9], "gamma": [0.01, 0.01]},
         shared={"lambda": 0.5}),
    Case("breadcrumbs_ties", per_model={"weight": [1.0, 1.0, 1.0], "density": [0.8] * 3, "gamma": [0.05] * 3},
         shared={"normalize": True}),
    Case("della", fine_tunes=2, per_model={"weight": [0.3, 0.7], "density": [0.7, 0.7], "epsilon": [0.1, 0.1]},
         shared={"lambda": 0.5}),
    Case("della_linear", fine_tunes=2,
         per_model={"weight": [0.5, 0.5], "density": [0.6, 0.4], "epsilon": [0.15, 0.05]}),
    Case("sce", shared={"select_topk": 0.1}),
    Case("sce", shared={"select_topk": 0.1}, delta_scale=3e-4, label="sce (task vectors ~3e-4)"),
    Case("model_stock"),
    Case("model_stock", shared={"filter_wise": True}, label="model_stock (filter_wise)"),
    Case("nearswap", fine_tunes=1, shared={"t": 1e-3}),
    Case("arcee_fusion", fine_tunes=1),
    Case("passthrough", fine_tunes=1, base=False, per_model={"scale": [0.5]}),
    Case("ram", sparse=True),
    Case("ramplus_tl", fine_tunes=2, sparse=True, shared={"r": 0.2, "alpha": 0.3}),
]

CODE_DEFINED = {"nearswap", "arcee_fusion", "ram", "ramplus_tl"}


def make_inputs(case: Case, shape: tuple[int, ...], generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bf16 ``(fine_tunes, base)``: base ~ N(0, 0.02); each fine-tune's change half shared, half its own, scaled 1x/1.5x/2x."""
    base = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.02
    common = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensors = []
    for i in range(case.fine_tunes):
        change = (common + torch.randn(shape, generator=generator, dtype=torch.float64)) * math.sqrt(0.5)
        change *= case.delta_scale * (1 + 0.5 * i)
        if case.sparse:
            change *= torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5
        tensors.append((base + change).to(torch.bfloat16))
    return tensors, base.to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------- the two sides


RANDOM_SPARSIFICATION = {"dare_ties": "random", "dare_linear": "random", "della": "della_magprune",
                         "della_linear": "della_magprune"}


def mergekit_merge(case: Case, tensors: list[torch.Tensor], base: torch.Tensor | None,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """mergekit's result (bf16) through its in-memory API: the method's own binding and ``_execute_resolved``."""
    from mergekit.merge_methods import merge_tensors

    inputs = ([base] if base is not None else []) + tensors
    parameters: dict[str, Any] = dict(case.shared)
    parameters.update(case.per_model)  # NON_BASE and INPUT values in input order (no base among INPUT ones here)
    return merge_tensors(inputs, case.method, parameters=parameters, base_index=0 if base is not None else None,
                         dtype=dtype, out_dtype=torch.bfloat16)


def mergekit_masks(case: Case, tensors: list[torch.Tensor], base: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The keep-masks mergekit drew after ``torch.manual_seed(SEED)``: its ``sparsify`` again, same seed, same order."""
    from mergekit.sparsify import SparsificationMethod, sparsify

    torch.manual_seed(SEED)
    masks = []
    for i, x in enumerate(tensors):
        delta = x.to(dtype) - base.to(dtype)
        extra = {"epsilon": case.per_model["epsilon"][i]} if "epsilon" in case.per_model else {}
        kept = sparsify(delta, density=case.per_model["density"][i],
                        method=SparsificationMethod(RANDOM_SPARSIFICATION[case.method]), rescale_norm=None, **extra)
        masks.append(kept != 0)
    return masks


def reference_kwargs(case: Case) -> dict[str, Any]:
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in case.shared.items()}
    kwargs.update(case.per_model)
    if case.method == "passthrough":
        kwargs["scale"] = case.per_model["scale"][0]
    return kwargs


def undecided(case: Case, tensors: list[torch.Tensor], base: torch.Tensor | None,
              masks: Sequence[torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor:
    """Elements whose value the definition leaves to a convention (rank ties at a threshold, sign votes of ~0), or
    that sit so close to a threshold that the arithmetic's rounding decides (Arcee Fusion's importance cut)."""
    shape = tensors[0].shape
    found = torch.zeros(shape, dtype=torch.bool)
    if base is None:
        return found
    if case.method == "arcee_fusion":
        return arcee_flips(tensors[0], base, dtype)
    anchor = base.double()
    deltas = [x.double() - anchor for x in tensors]
    per = case.per_model
    kept: list[torch.Tensor] = deltas
    if case.method == "ties":
        parts = [R.magnitude_keep(d, per["density"][i]) for i, d in enumerate(deltas)]
        kept = [d * keep for d, (keep, _) in zip(deltas, parts)]
        found |= torch.stack([u for _, u in parts]).any(0)
    elif case.method.startswith("breadcrumbs"):
        parts = [R.outlier_keep(d, per["density"][i], per["gamma"][i]) for i, d in enumerate(deltas)]
        kept = [d * keep for d, (keep, _) in zip(deltas, parts)]
        found |= torch.stack([u for _, u in parts]).any(0)
    elif case.method == "sce":
        keep, ties = R.sce_select(torch.stack(deltas), case.shared.get("select_topk", 1.0))
        kept = [d * keep for d in deltas]
        found |= ties
    elif masks is not None:
        kept = [d * m for d, m in zip(deltas, masks)]
    if case.method in {"ties", "breadcrumbs_ties", "dare_ties", "della", "sce"}:
        weights = per.get("weight", [1.0] * len(tensors))
        found |= R.vote_undecided(kept, weights)
    return found


def arcee_flips(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elements Arcee Fusion keeps in float64 and not in mergekit's arithmetic ``dtype``, or the reverse.

    Its importance multiplies by the KL divergence of two nearly equal softmaxes, a sum that
    cancels to ~1e-6 of its terms: float32 gets it to a few percent (bf16 not at all), so
    elements whose importance is that close to the cut go either way. mergekit's own
    ``_compute_importance`` and threshold in ``dtype`` say which flipped; in float32 every flip
    must lie within 25% of the cut (else the reference computes another importance).
    """
    from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance

    theirs, _ = DynamicThresholdFusion().compute_fusion_mask(_compute_importance(x.to(dtype), base.to(dtype)))
    importance = R.arcee_fusion_importance(x.double(), base.double())
    cut = R.arcee_fusion_threshold(importance)
    flips = theirs.bool() != (importance >= cut)
    if dtype == torch.float32:
        assert ((importance[flips] / cut - 1).abs() < 0.25).all(), "arcee_fusion: a flip far from the cut"
    return flips


# ----------------------------------------------------------------------------------------------- comparing


@dataclass
class Row:
    name: str
    elements: int = 0
    off: dict[str, int] = field(default_factory=dict)
    undecided: dict[str, int] = field(default_factory=dict)
    z: list[float] = field(default_factory=list)


def compare_methods() -> list[Row]:
    generator = torch.Generator().manual_seed(SEED)
    settings = {"bf16": None, "float32": torch.float32}
    rows = []
    for case in CASES:
        row = Row(case.name)
        for shape in SHAPES:
            tensors, base_tensor = make_inputs(case, shape, generator)
            base = base_tensor if case.base else None
            random = case.method in R.RANDOM_METHODS
            for setting, dtype in settings.items():
                torch.manual_seed(SEED)
                got = mergekit_merge(case, tensors, base, dtype)
                if random:
                    assert base is not None
                    masks = mergekit_masks(case, tensors, base, dtype or torch.bfloat16)
                    expected = {
                        f"{setting} paper": R.METHODS[case.method](tensors, base, masks=masks, **reference_kwargs(case)),
                        f"{setting} l1": R.METHODS[case.method](tensors, base, masks=masks, rescale_by="l1",
                                                               **reference_kwargs(case)),
                    }
                    row.z += law_z(case, tensors, base, masks)
                else:
                    masks = None
                    expected = {setting: R.METHODS[case.method](tensors, base, **reference_kwargs(case))}
                left_out = undecided(case, tensors, base, masks, dtype or torch.bfloat16)
                for column, value in expected.items():
                    off = R.more_than_one_ulp(got, value) & ~left_out
                    row.off[column] = row.off.get(column, 0) + int(off.sum())
                    rounded = R.more_than_one_ulp(value.to(torch.bfloat16), value)
                    assert not rounded.any(), f"{case.name}: the reference rounded once is not within an ulp"
                row.undecided[setting] = row.undecided.get(setting, 0) + int(left_out.sum())
            row.elements += tensors[0].numel()
        rows.append(row)
        print(f"  {row.name}: " + ", ".join(f"{k} {100 * v / row.elements:.3f}%" for k, v in row.off.items()),
              flush=True)
    return rows


def law_z(case: Case, tensors: list[torch.Tensor], base: torch.Tensor, masks: Sequence[torch.Tensor]) -> list[float]:
    """z-scores of each mask's kept count against its law (elements whose task vector is 0 left out: no mask shows)."""
    scores = []
    for i, (x, mask) in enumerate(zip(tensors, masks)):
        delta = x.double() - base.double()
        seen = delta != 0
        if case.method.startswith("dare"):
            scores.append(R.bernoulli_z(int(mask[seen].sum()), int(seen.sum()), case.per_model["density"][i]))
        else:
            p = R.della_keep_probabilities(delta, case.per_model["density"][i], case.per_model["epsilon"][i])
            scores.append(R.poisson_binomial_z(mask[seen], p[seen]))
    return scores


# ----------------------------------------------------------------------------------------------- configs and parameters


def _value_type(annotation: Any) -> type:
    """The scalar type a mergekit ParameterSpec validates (``Optional[float]`` -> float)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _tensor_names(layer: int | None) -> list[str]:
    if layer is None:
        return ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return [f"model.layers.{layer}.{part}" for part in
            ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")]


def _attempt(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call``'s value, or ``"error"`` where it refuses (a required parameter missing: both sides must refuse)."""
    try:
        return call(*args, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return "error"


@dataclass
class Source:
    """One input of a slice as the planner sees it: the model, its own raw ``parameters``, its first layer."""

    model: Any
    parameters: dict[str, Any] | None
    first: int


@dataclass
class Piece:
    """One slice as the planner builds it: mergekit's definition, its raw ``parameters``, its sources, its layers."""

    definition: Any
    parameters: dict[str, Any] | None
    sources: list[Source]
    layers: int


def planned_slices(config: Any, raw: dict[str, Any]) -> list[Piece]:
    """The slices mergekit's planner makes of a config: a ``models`` list is one slice of all layers, base added last."""
    from mergekit.config import InputSliceDefinition, OutputSliceDefinition

    if config.slices:
        return [
            Piece(piece, raw_piece.get("parameters"),
                  [Source(s.model, r.get("parameters"), s.layer_range[0]) for s, r in zip(piece.sources, raw_piece["sources"])],
                  piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0])
            for piece, raw_piece in zip(config.slices, raw["slices"])
        ]
    sources = [Source(m.model, r.get("parameters"), 0) for m, r in zip(config.models, raw["models"])]
    if config.base_model and config.base_model not in [s.model for s in sources]:
        sources.append(Source(config.base_model, None, 0))
    definition = OutputSliceDefinition(sources=[
        InputSliceDefinition(model=s.model, layer_range=(0, LAYERS), parameters=s.parameters) for s in sources])
    return [Piece(definition, None, sources, LAYERS)]


def compare_parameters(config: Any, raw: dict[str, Any], piece: Piece, out_name: str, offset: int | None,
                       t: float) -> list[str]:
    """One output tensor's parameters, resolved by mergekit and by the reference; the differences."""
    from mergekit.config import ConfigReader
    from mergekit.merge_methods import get
    from mergekit.parameter_resolver import resolve_parameters

    spec = get(config.merge_method).spec
    in_names = {}
    for source in piece.sources:  # each source's own name of the tensor: its layer, not the output's
        in_names[source.model] = out_name if offset is None else re.sub(
            r"layers\.\d+\.", f"layers.{source.first + offset}.", out_name)
    reader = ConfigReader(config=config, t=t, slice_out=piece.definition)
    theirs = _attempt(resolve_parameters, spec, tensor_name=out_name, inputs=in_names,
                      sources=reader.parameter_sources, base_model=config.base_model, t=t)
    layers = {"layer_index": offset, "layer_count": None if offset is None else piece.layers}
    differences = []
    for p in spec.parameters:
        common = dict(default=R.MISSING if p.required else p.default, value_type=_value_type(p.value_type), **layers)
        if p.scope.value == "shared":
            pairs = [(out_name, theirs if theirs == "error" else theirs[0][p.name],
                      _attempt(R.resolve_scopes, p.name, [piece.parameters, raw.get("parameters")], out_name, **common))]
        else:
            pairs = [(f"{in_names[s.model]} of {s.model}", theirs if theirs == "error" else theirs[1][s.model][p.name],
                      _attempt(R.resolve_scopes, p.name, [s.parameters, piece.parameters, raw.get("parameters")],
                               in_names[s.model], **common))
                     for s in piece.sources if not (s.model == config.base_model and p.scope.value == "non_base")]
        differences += [f"{where} {p.name}: mergekit {mk!r}, reference {ours!r}" for where, mk, ours in pairs if mk != ours]
    return differences


def check_configs() -> tuple[list[str], int, list[str]]:
    """Each config: parses, names a method and only its parameters, resolves as the reference does.

    Returns (one table line per config, number of output tensors whose parameters were compared, the differences).
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import get

    lines, compared, differences = [], 0, []
    for path in sorted(CONFIGS.glob("*.yml")):
        raw = yaml.safe_load(path.read_text())
        config = MergeConfiguration.model_validate(raw)
        method = get(config.merge_method)
        scopes = [raw.get("parameters") or {}]
        scopes += [m.get("parameters") or {} for m in raw.get("models") or []]
        for raw_piece in raw.get("slices") or []:
            scopes += [raw_piece.get("parameters") or {}] + [s.get("parameters") or {} for s in raw_piece["sources"]]
        named = {key for scope in scopes for key in scope}
        unknown = sorted(named - {p.name for p in method.spec.parameters})
        if unknown:
            differences.append(f"{path.name}: parameters {unknown} are not {config.merge_method}'s")
        pieces = planned_slices(config, raw)
        for piece in pieces:
            method.validate_inputs([s.model for s in piece.sources], config.base_model)
        # tensors outside the layers read t = 0 with the first slice's settings (embeddings) or the last's (head)
        tensors = [(pieces[0], "model.embed_tokens.weight", None, 0.0)]
        tensors += [(pieces[-1], name, None, 0.0) for name in ("model.norm.weight", "lm_head.weight")]
        out_layer = 0
        for piece in pieces:
            for offset in range(piece.layers):
                t = offset / (piece.layers - 1) if piece.layers > 1 else 1.0
                tensors += [(piece, name, offset, t) for name in _tensor_names(out_layer)]
                out_layer += 1
        for piece, name, offset, t in tensors:
            differences += [f"{path.name} {d}" for d in compare_parameters(config, raw, piece, name, offset, t)]
        compared += len(tensors)
        lora = any(m.lora for m in config.referenced_models())
        lines.append(f"| `{path.name}` | `{config.merge_method}` | {len(pieces)} | {out_layer} | "
                     f"{'yes' if lora else ''} | {', '.join(sorted(named)) or '-'} |")
    return lines, compared, differences


EDGE_SETTINGS: list[tuple[Any, type, str, int | None, int | None]] = [
    (0.5, float, "x", None, None),
    ("1e-3", float, "x", None, None),
    ([0, 0.5, 0.3, 0.7, 1], float, "model.layers.2.self_attn.q_proj.weight", 2, 4),
    ([0, 0.5, 0.3, 0.7, 1], float, "model.layers.3.self_attn.q_proj.weight", 3, 4),
    ([1, 0], float, "model.layers.1.mlp.up_proj.weight", 1, 3),
    ([1, 0], float, "model.embed_tokens.weight", None, None),
    ([0.2, 0.6], float, "model.layers.0.mlp.up_proj.weight", 0, 1),
    ([True, False, True], bool, "model.layers.1.mlp.up_proj.weight", 1, 3),
    (["true", "false"], bool, "model.layers.1.mlp.up_proj.weight", 1, 4),
    ([], float, "x", None, None),
    ([{"filter": "mlp", "value": 1.0}], float, "model.layers.0.self_attn.q_proj.weight", 0, 4),
    ([{"filter": "mlp", "value": [0, 1]}, {"value": 0.25}], float, "model.layers.1.mlp.up_proj.weight", 1, 3),
    ({"filter": "*", "value": 2}, float, "lm_head.weight", None, None),
    ([{"filter": "self_attn", "value": 0.1}, {"filter": "attn", "value": 0.9}], float,
     "model.layers.0.self_attn.o_proj.weight", 0, 4),
    ([{"filter": "q_proj", "value": 0.1}], float, "", None, None),
    ([2, 4, 6], int, "model.layers.2.mlp.up_proj.weight", 2, 3),
]


def check_edges() -> list[str]:
    """``resolve_parameter`` against mergekit's ``evaluate_setting`` on settings chosen for their edges."""
    from mergekit.config import ConditionalParameter, evaluate_setting
    from pydantic import TypeAdapter

    def as_mergekit(setting: Any) -> Any:
        if isinstance(setting, dict):
            return ConditionalParameter.model_validate(setting)
        if isinstance(setting, list) and setting and isinstance(setting[0], dict):
            return [ConditionalParameter.model_validate(s) for s in setting]
        return setting

    mismatches = []
    for setting, kind, name, index, count in EDGE_SETTINGS:
        t = R.layer_t(index, count)
        theirs = evaluate_setting(name, as_mergekit(setting), t, validate=TypeAdapter(kind).validate_python)
        ours = R.resolve_parameter(setting, name, index, count, value_type=kind)
        if theirs != ours or type(theirs) is not type(ours):
            mismatches.append(f"{setting!r} at {name} ({index}/{count}): mergekit {theirs!r}, reference {ours!r}")
    return mismatches


# ----------------------------------------------------------------------------------------------- report


def share(row: Row, column: str) -> str:
    return f"{100 * row.off[column] / row.elements:.3f}%" if column in row.off else "-"


FINDINGS = """\
## Where mergekit and the definitions differ, and why

Investigated on these inputs; the reference follows the paper in every case.

- **`dare_ties`, `dare_linear`, `della`, `della_linear` (`paper` columns).** mergekit's `rescale`
  scales each trimmed task vector to its untrimmed L1 norm (`RescaleNorm.l1`); DARE divides each
  kept element by the density, DELLA (paper and its authors' code) by that element's own keep
  probability. With mergekit's own masks and its L1 rescaling the reference agrees with mergekit
  on every element in float32 (the `l1` columns): the difference is the rescaling, not the
  masks or the arithmetic. DARE's is small (the L1 factor is 1/density up to its sampling
  noise); DELLA's is large (a uniform factor for keep probabilities spanning density +- epsilon).
  mergekit's masks follow their law (`mask z`), with bf16 inputs at the density rounded to bf16
  (0.53 -> 0.53125), and DELLA's ranks computed in bf16 (rounded above 256).
- **`sce (task vectors ~3e-4)`.** mergekit takes equal SCE weights whenever
  `sum_j mean(tau_j^2) < 1e-6`, an absolute bound: after `select_topk: 0.1` any task vectors of
  RMS below about 1e-3 fall under it (here the sum is 1.6e-7), so its weights are 1/3 each where
  the paper's (squared-norm shares) are about 0.06 / 0.21 / 0.73. Real fine-tunes' task vectors
  are of that size: their mergekit SCE merges silently use equal weights. In `sce` (RMS 2e-3,
  above the bound) the 0.03% are the positions at the variance cut: float32 ranks a few
  near-equal variances differently, which moves every weight by ~1e-4, visible only where the
  result cancels to far below the base.
- **`model_stock`, `multislerp` (one element each in float32).** The result cancels to ~3e-7
  from inputs of ~3e-3: float32's rounding of the large terms is more than a bf16 ulp of it.
- **`arcee_fusion`.** Its importance multiplies by the KL divergence of two nearly equal
  softmaxes, which cancels: float32 gets it to a few percent and bf16 not at all, so elements
  near the cut go either way (`undecided`: 0.7% in float32, 8% in bf16; every float32 flip lies
  within 25% of the cut). Elsewhere the reference (mergekit's code in float64) and mergekit
  agree on every element.
- **`ties`, `breadcrumbs*` `undecided`.** bf16 task vectors (differences of bf16 numbers) take few
  distinct magnitudes, so many elements tie at the magnitude cut: the definition keeps all of
  them, mergekit's `argsort` an arbitrary `k`.
- **The `bf16` column.** mergekit computes in the tensors' dtype; only `linear` and `slerp` upcast
  to float32 inside (`karcher` only its norms), and `passthrough` does no arithmetic. Every other
  method loses 0.1-50% of its elements to bf16 rounding (`nuslerp` row by row 28%).
"""


def render(rows: list[Row], config_lines: list[str], compared: int, mismatches: list[str], edges: list[str],
           seconds: float) -> str:
    from importlib.metadata import version

    import mergekit  # noqa: F401  (its version below)

    lines = [
        "# mergekit 0.1.5 against the methods' float64 definitions",
        "",
        ("Generated by `benchmarks/mergekit_oracle.py` (see its docstring) in mergekit's own environment: "
        f"mergekit {version('mergekit')}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}; {seconds:.0f} s. Inputs: bf16 tensors of shapes "
        f"{', '.join(str(tuple(s)) for s in SHAPES)} per method, seed {SEED}; definitions: "
        "`tests/mergekit_reference.py`."),
        "",
        ("Share of mergekit's output elements **more than one bf16 ulp from the definition**, in mergekit's "
        "two arithmetics: `bf16` (the inputs' own dtype: its default on bf16 models and `dtype: bfloat16`) "
        "and `float32` (`dtype: float32`). Random methods use mergekit's own masks; `paper` is the papers' "
        "rescaling (each kept element divided by its keep probability), `l1` mergekit's (each trimmed "
        "task vector scaled to its untrimmed L1 norm). `undecided`: elements left out of the counts "
        "(rank ties at a threshold, sign votes of 0 up to float32 rounding). `mask z`: the largest |z| of "
        "mergekit's kept counts against their law."),
        "",
        ("| method | elements | > 1 ulp, bf16 | > 1 ulp, float32 | bf16, l1 | float32, l1 | undecided bf16 / float32 "
        "| mask z |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        random = "bf16 paper" in row.off
        first, second = ("bf16 paper", "float32 paper") if random else ("bf16", "float32")
        z = f"{max(abs(v) for v in row.z):.2f}" if row.z else ""
        lines.append(
            f"| {row.name} | {row.elements:,} | {share(row, first)} | {share(row, second)} | "
            f"{share(row, 'bf16 l1') if random else ''} | {share(row, 'float32 l1') if random else ''} | "
            f"{100 * row.undecided['bf16'] / row.elements:.3f}% / {100 * row.undecided['float32'] / row.elements:.3f}% "
            f"| {z} |"
        )
    code_rows = [r for r in rows if r.name in CODE_DEFINED]
    agree = all(r.off["float32"] == 0 for r in code_rows)
    lines += [
        "",
        (f"Methods whose definition is mergekit's code ({', '.join(sorted(CODE_DEFINED))}): the reference "
        f"{'agrees with mergekit within one ulp on every element' if agree else 'DISAGREES with mergekit'} "
        "in float32 arithmetic."),
        "",
        "## The config corpus (`tests/mergekit_configs/`)",
        "",
        ("Every file parsed by mergekit's `MergeConfiguration`, its method found in mergekit's registry, "
        "its inputs accepted by the method's contract."),
        "",
        "| config | method | slices | output layers | LoRA | parameters |",
        "|---|---|---|---|---|---|",
        *config_lines,
        "",
        (f"Parameter resolution: every parameter of the config's method, per model where per-model, for "
        f"{compared:,} output tensors (the attention, MLP and norm weights of every output layer and the "
        "tensors outside the layers), resolved by mergekit's `resolve_parameters` and by the reference's "
        f"`resolve_scopes`: {len(mismatches)} differences. `evaluate_setting` against `resolve_parameter` on "
        f"{len(EDGE_SETTINGS)} edge cases: {len(edges)} differences."),
    ]
    lines += [f"- {m}" for m in mismatches + edges]
    lines += ["", FINDINGS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the report without writing MERGEKIT_ORACLE.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.monotonic()
    print("methods:", flush=True)
    rows = compare_methods()
    print("configs and parameters:", flush=True)
    config_lines, compared, mismatches = check_configs()
    edges = check_edges()
    report = render(rows, config_lines, compared, mismatches, edges, time.monotonic() - start)
    print(report)
    if not args.no_write:
        REPORT.write_text(report)
    return 1 if mismatches or edges else 0


if __name__ == "__main__":
    sys.exit(main())
