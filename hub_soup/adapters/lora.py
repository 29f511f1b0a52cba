"""LoRA tensors: keys as PEFT saves them, the exact soup of deltas, its SVD reduction, and merging into a base.

PEFT saves an adapter's factors of module ``m`` (a name in the base model) as
``base_model.model.m.lora_A.weight`` (``r x in``) and ``...lora_B.weight`` (``out x r``);
an embedding's as ``...lora_embedding_A`` (``r x num_embeddings``) and ``...lora_embedding_B``.
The module's delta is ``s * B @ A`` with PEFT's scaling ``s`` (transposed for embeddings
and for ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``). Other saved tensors
(``modules_to_save`` heads, the base layer of an adapted embedding, trained biases) are full
tensors that replace the base's, and are averaged like any soup.

The weighted sum of deltas ``sum_i w_i s_i B_i A_i`` is exactly ``B @ A`` with
``A = cat_i A_i`` (rows) and ``B = cat_i w_i s_i B_i`` (columns): an adapter of rank
``sum_i r_i`` and scaling 1 whose outputs are the base's plus the weighted mean delta.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hub_soup.adapters.config import AdapterConfig
from hub_soup.errors import AdapterError
from hub_soup.io.read import Checkpoint
from hub_soup.io.safetensors_io import TensorMeta
from hub_soup.merging.methods import MergedTensor, MergeMethod
from hub_soup.merging.plan import Layout

PREFIX = "base_model.model."  # PEFT's prefix of every saved key (LoraModel in PeftModel)
FACTORS = {  # key suffix -> (factor, embedding)
    ".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True),
}

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B, A), the scaling folded into B


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are saved, and how its delta lies in the base weight."""

    name: str  # the module's name in the base model (``model.layers.0.self_attn.q_proj``)
    embedding: bool  # an nn.Embedding (its delta is ``(B @ A).T``)

    @property
    def a_key(self) -> str:
        return f"{PREFIX}{self.name}.lora_{'embedding_A' if self.embedding else 'A.weight'}"

    @property
    def b_key(self) -> str:
        return f"{PREFIX}{self.name}.lora_{'embedding_B' if self.embedding else 'B.weight'}"

    @property
    def base_key(self) -> str:
        """The base model's weight the delta is added to."""
        return f"{self.name}.weight"


def base_key_of_full(key: str) -> str:
    """The base tensor a saved full tensor replaces: ``base_model.model.x.base_layer.weight`` -> ``x.weight``."""
    return key.removeprefix(PREFIX).replace(".base_layer.", ".")


@dataclass(frozen=True)
class AdapterPlan:
    """The adapters' modules and full tensors, checked to fit together, and each adapter's rank and scaling."""

    modules: list[LoraModule]
    full: list[str]  # full tensors' keys, as saved
    ranks: list[dict[str, int]]  # per adapter: module -> rank
    scalings: list[dict[str, float]]  # per adapter: module -> PEFT's scaling
    metas: dict[str, TensorMeta]  # the first adapter's tensors (dtypes of the soup's factors and full tensors)
    transposed: bool  # fan_in_fan_out: the base stores Linear weights as (in, out)

    def oriented(self, module: LoraModule, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``module``'s delta ``B @ A`` as factors ``(left, right)`` of the weight as the base stores it:
        ``left @ right`` (transposed for embeddings and ``fan_in_fan_out`` layers)."""
        return (a.T, b.T) if module.embedding or self.transposed else (b, a)

    def delta_shape(self, module: LoraModule) -> tuple[int, ...]:
        """The shape of ``module``'s delta as the base stores the weight."""
        rows, cols = self.metas[module.b_key].shape[0], self.metas[module.a_key].shape[1]
        return (cols, rows) if module.embedding or self.transposed else (rows, cols)


def plan_adapters(configs: Sequence[AdapterConfig], layouts: Sequence[Layout]) -> AdapterPlan:
    """The adapters' modules, which must be the same in every adapter with the same shapes (ranks aside).

    Raises:
        AdapterError: a key that is no LoRA tensor PEFT saves, adapters of different modules or shapes,
            a rank that is not the config's.
    """
    parsed = [_parse(layout) for layout in layouts]
    modules, full = parsed[0]
    first = layouts[0]
    for layout, (their_modules, their_full) in zip(layouts[1:], parsed[1:]):
        ours, theirs = {m.name for m in modules}, {m.name for m in their_modules}
        if ours != theirs:
            missing, extra = sorted(ours - theirs), sorted(theirs - ours)
            example = f"{missing[0]} is only in {first.label}" if missing else f"{extra[0]} is only in {layout.label}"
            raise AdapterError(
                f"the adapters adapt different modules: {len(ours)} in {first.label}, {len(theirs)} in "
                f"{layout.label} ({example})",
                hint="a soup combines adapters of the same target_modules; retrain with the same ones or leave one out",
            )
        if sorted(full) != sorted(their_full):
            only = min(set(full) ^ set(their_full))
            raise AdapterError(
                f"the adapters save different full tensors (modules_to_save, biases): {only} is in one of "
                f"{first.label} and {layout.label} only",
            )
        for key in full + [k for m in modules for k in (m.a_key, m.b_key)]:
            _check_shape(first, layout, key)
    ranks, scalings = [], []
    for config, layout in zip(configs, layouts):
        rank = {m.name: layout.metas[m.a_key].shape[0] for m in modules}
        for m in modules:
            if layout.metas[m.b_key].shape[1] != rank[m.name]:
                raise AdapterError(f"{layout.label}: {m.name}'s lora_A and lora_B have different ranks")
        ranks.append(rank)
        scalings.append({m.name: config.scaling(m.name, rank[m.name]) for m in modules})
    transposed = bool(configs[0].raw.get("fan_in_fan_out"))
    return AdapterPlan(modules, full, ranks, scalings, dict(first.metas), transposed)


def _parse(layout: Layout) -> tuple[list[LoraModule], list[str]]:
    """The adapted modules (in file order) and full tensors of one adapter's saved keys."""
    factors: dict[str, dict[str, str]] = {}
    embedding: dict[str, bool] = {}
    full: list[str] = []
    for key, meta in layout.metas.items():
        if not key.startswith(PREFIX):
            raise AdapterError(
                f"{layout.label}: {key!r} is not a key PEFT saves for a LoRA model (they start with {PREFIX!r})",
            )
        suffix = next((s for s in FACTORS if key.endswith(s)), None)
        if suffix is None:
            if ".lora_" in key:
                raise AdapterError(
                    f"{layout.label}: {key!r} is a LoRA tensor hub-soup does not combine (DoRA's magnitude, "
                    "lora_B's bias...)",
                    hint="merge each adapter into its base with PEFT (merge_and_unload) and make a soup of the full models",
                )
            full.append(key)
            continue
        name, (factor, is_embedding) = key[len(PREFIX) : -len(suffix)], FACTORS[suffix]
        if len(meta.shape) != 2:
            raise AdapterError(
                f"{layout.label}: {name} is a LoRA on a convolution ({key!r} has shape {list(meta.shape)}); "
                "hub-soup combines LoRA on Linear and Embedding layers",
            )
        factors.setdefault(name, {})[factor] = key
        embedding[name] = is_embedding
    for name, found in factors.items():
        if set(found) != {"A", "B"}:
            raise AdapterError(f"{layout.label}: {name} has lora_{next(iter(found))} without its other factor")
    return [LoraModule(name, embedding[name]) for name in factors], full


def _check_shape(first: Layout, other: Layout, key: str) -> None:
    ours, theirs = first.metas[key].shape, other.metas[key].shape
    lora_a, lora_b = ".lora_A" in key or "embedding_A" in key, ".lora_B" in key or "embedding_B" in key
    # factors differ in rank only: A's rows and B's columns
    same = ours[1:] == theirs[1:] if lora_a else ours[:1] == theirs[:1] if lora_b else ours == theirs
    if not same:
        raise AdapterError(
            f"shape mismatch at {key}: {list(ours)} in {first.label} vs {list(theirs)} in {other.label}",
            hint="the adapters were trained on bases of different sizes; a soup needs adapters of one base",
        )


def check_base_fits(plan: AdapterPlan, base: Layout, label: str, check: str = "check the base (--base)") -> None:
    """Every module's delta and every full tensor must have its tensor in the base, of that shape.

    Args:
        check: what to check, in the hint (an adapter soup's base, or the model an adapter is applied to).

    Raises:
        AdapterError: naming the tensors the base lacks (the first three), or the first of another shape.
    """
    wanted = {m.base_key: plan.delta_shape(m) for m in plan.modules}
    wanted |= {base_key_of_full(key): plan.metas[key].shape for key in plan.full}
    missing = [key for key in wanted if key not in base.metas]
    if missing:
        named = ", ".join(map(repr, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AdapterError(
            f"the adapter {label} does not fit the base {base.label}: the base has no {named}",
            hint=f"the adapter was trained on another model; {check}",
        )
    for key, shape in wanted.items():
        if tuple(base.metas[key].shape) != tuple(shape):
            raise AdapterError(
                f"the adapter {label} does not fit the base {base.label}: {key} is {list(base.metas[key].shape)} in "
                f"the base, the adapter's is {list(shape)}",
                hint=f"the adapter was trained on another size of the model; {check}",
            )


def soup_factors(
    adapters: Sequence[Checkpoint], plan: AdapterPlan, members: Sequence[int], weights: Sequence[float]
) -> Factors:
    """The exact soup of ``members`` (weighted by ``weights``): per module ``(cat_i w_i s_i B_i, cat_i A_i)``, float32."""
    factors: Factors = {}
    for module in plan.modules:
        b = [adapters[i].read(module.b_key).float() * (w * plan.scalings[i][module.name]) for i, w in zip(members, weights)]
        a = [adapters[i].read(module.a_key).float() for i in members]
        factors[module.name] = torch.cat(b, dim=1), torch.cat(a, dim=0)
    return factors


def full_average(
    adapters: Sequence[Checkpoint], plan: AdapterPlan, members: Sequence[int], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weighted average of every full tensor (heads, biases), in float32, by saved key."""
    averages = {}
    for key in plan.full:
        total = torch.zeros(plan.metas[key].shape, dtype=torch.float32)
        for i, w in zip(members, weights):
            total.add_(adapters[i].read(key).float(), alpha=w)
        averages[key] = total
    return averages


@dataclass(frozen=True)
class Reduction:
    """What ``--max-rank`` cost: each module's relative Frobenius error ``|dW - dW_R| / |dW|``, and the overall one."""

    max_rank: int
    errors: dict[str, float]
    overall: float

    @property
    def worst(self) -> tuple[str, float]:
        module = max(self.errors, key=lambda m: self.errors[m])
        return module, self.errors[module]

    def describe(self) -> str:
        module, worst = self.worst
        return (
            f"--max-rank {self.max_rank}: reconstruction error of the deltas (relative Frobenius norm) "
            f"{self.overall:.3g} overall, worst {worst:.3g} at {module}"
        )


def reduce_rank(factors: Factors, max_rank: int) -> tuple[Factors, Reduction]:
    """Each delta ``B @ A`` truncated to rank ``max_rank`` by its SVD: ``B = U_R diag(S_R)``, ``A = V_R^T`` (float64).

    The SVD of the (large) product comes from that of a small matrix: ``B = Qb Rb`` and ``A^T = Qa Ra``
    (QR), so ``B @ A = Qb (Rb Ra^T) Qa^T``, and only ``Rb Ra^T`` (rank x rank) is decomposed. The error
    is exact from the singular values: ``sqrt(sum of the dropped S^2 / sum of all S^2)``.
    """
    reduced: Factors = {}
    errors: dict[str, float] = {}
    dropped_total = kept_total = 0.0
    for name, (b, a) in factors.items():
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        k = min(max_rank, s.numel())
        reduced[name] = (qb @ u[:, :k]) * s[:k], vh[:k] @ qa.T
        energy, dropped = float((s**2).sum()), float((s[k:] ** 2).sum())
        errors[name] = math.sqrt(dropped / energy) if energy > 0 else 0.0
        dropped_total, kept_total = dropped_total + dropped, kept_total + energy
    overall = math.sqrt(dropped_total / kept_total) if kept_total > 0 else 0.0
    return reduced, Reduction(max_rank, errors, overall)


def adapter_tensors(
    plan: AdapterPlan, factors: Factors, full: Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The soup adapter's tensors under PEFT's keys, each in ``dtype`` or the first adapter's dtype of that tensor."""
    tensors: dict[str, torch.Tensor] = {}
    for module in plan.modules:
        b, a = factors[module.name]
        tensors[module.a_key] = a.to(dtype or plan.metas[module.a_key].dtype).contiguous()
        tensors[module.b_key] = b.to(dtype or plan.metas[module.b_key].dtype).contiguous()
    for key, tensor in full.items():
        tensors[key] = tensor.to(dtype or plan.metas[key].dtype)
    return tensors


def soup_config(first: AdapterConfig, factors: Factors, revision: str | None) -> dict[str, Any]:
    """The soup's ``adapter_config.json``: the first adapter's, with a scaling of 1 in every module.

    ``r`` and ``lora_alpha`` are the most common rank; modules of another rank get it in ``rank_pattern``
    and ``alpha_pattern`` (their names escaped: PEFT reads the keys as regular expressions). ``revision``
    pins the base.
    """
    ranks = {name: a.shape[0] for name, (_, a) in factors.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    config = dict(first.raw)
    config.update(
        r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
        revision=revision if revision is not None else first.revision,
    )
    return config


@dataclass(frozen=True)
class _Delta:
    """What merging changes in one base tensor: a replacement (a full tensor), and the delta ``left @ right``."""

    replace: torch.Tensor | None  # flat
    left: torch.Tensor | None  # rows of the base tensor x rank
    right: torch.Tensor | None  # rank x columns


class AddDeltas(MergeMethod):
    """The base with the soup merged in, as a kernel of the streamed engine (the base its only input).

    Each adapted weight gets its delta added in the kernel's dtype (float32; float64 for float64
    tensors), computed for the rows a block covers from the factors, so memory stays a few blocks;
    a full tensor (a head in ``modules_to_save``) replaces the base's. Everything else is copied.
    Not a recipe method: the pipeline uses it for adapter soups.
    """

    name = "adapter-deltas"

    def __init__(
        self, plan: AdapterPlan, factors: Factors, full: Mapping[str, torch.Tensor], device: torch.device
    ) -> None:
        super().__init__()
        self._deltas: dict[str, _Delta] = {}
        replaced = {base_key_of_full(key): tensor for key, tensor in full.items()}
        for module in plan.modules:
            left, right = plan.oriented(module, *factors[module.name])
            self._deltas[module.base_key] = _Delta(replaced.pop(module.base_key, None), left, right)
        self._deltas |= {key: _Delta(tensor, None, None) for key, tensor in replaced.items()}
        self._device = device

    def start_statistics(self, tensor: MergedTensor) -> _Delta | None:
        delta = self._deltas.get(tensor.key)
        if delta is None:
            return None
        return _Delta(*(t.to(self._device, tensor.dtype).contiguous() if t is not None else None
                        for t in (delta.replace.view(-1) if delta.replace is not None else None, delta.left, delta.right)))

    def kernel(
        self, acc: torch.Tensor, parts: Sequence[torch.Tensor], *, scratch: torch.Tensor,
        base: torch.Tensor | None = None, statistics: Any = None, offset: int = 0,
    ) -> None:
        delta: _Delta | None = statistics
        size = acc.numel()
        if delta is None or delta.replace is None:
            acc.copy_(parts[0])
        else:
            acc.copy_(delta.replace[offset : offset + size])
        if delta is not None and delta.left is not None and delta.right is not None:
            acc.add_(delta_elements(delta.left, delta.right, offset, size))


def delta_elements(left: torch.Tensor, right: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """Elements ``[offset, offset + size)`` of ``left @ right``, flattened: only the rows they lie in are
    computed, so a chunk of a large weight costs a chunk's memory."""
    columns = right.shape[1]
    first, last = offset // columns, -(-(offset + size) // columns)
    rows = left[first:last] @ right
    start = offset - first * columns
    return rows.reshape(-1)[start : start + size]
