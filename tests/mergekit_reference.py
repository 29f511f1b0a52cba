"""Float64 reference definitions of mergekit 0.1.5's 20 merge methods and of its parameter resolution.

The oracle that hub-soup's implementations of mergekit's methods are checked against, in
plain torch (no ``hub_soup`` import), so that it is written once, from the papers and from
mergekit's code, and never from the code it checks.

**Shape of every method.** ``METHOD(tensors, base, **parameters) -> float64 tensor`` for one
output tensor: ``tensors`` are the ingredients' tensors *other than the base*, in the
config's order; ``base`` is the base model's tensor (``None`` where the method takes none).
Methods that ignore a base (``linear``, ``karcher``, ``passthrough``) take every input in
``tensors`` and refuse a ``base``: a ``base_model`` listed among their ``models`` is one more
input to them, as in mergekit. Parameters are spelled as mergekit spells them (``lambda_``
for ``lambda``); a per-model parameter is a sequence with one value per tensor of
``tensors`` (a scalar is broadcast). Every computation is float64; the caller rounds the
result once to the output dtype. No method of mergekit 0.1.5 reads the tensor's name (names
only select parameters, see :func:`resolve_parameter`), so none takes it here.

**Random methods** (``dare_ties``, ``dare_linear``, ``della``, ``della_linear``) take their
keep-masks (``masks``: one bool tensor per ingredient) or draw them from ``generator``, so a
test can pass the masks an implementation used, or check an output by its law with the
helpers at the end (:func:`bernoulli_z`, :func:`della_keep_probabilities`). Every other
method is deterministic (``breadcrumbs`` too: it trims by magnitude rank).

**Where mergekit and a paper differ**, the paper is followed and the difference is named in
the method's docstring; ``rescale_by="l1"`` gives mergekit's rescaling of the random methods,
so that a comparison can tell the masks' law from the arithmetic. Selections by rank (TIES's
top-k, Breadcrumbs' window, SCE's top-k variance) keep *every* element tied with the last one
kept; :func:`rank_window` also says which elements such a tie makes undecided.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

Tensor = torch.Tensor
F64 = torch.float64

# --------------------------------------------------------------------------------------------------- helpers


def _f64(tensor: Tensor) -> Tensor:
    return tensor.to(F64)


def _per_model(value: float | Sequence[float], count: int, name: str) -> list[float]:
    """One value per ingredient: a scalar broadcast, a sequence checked for its length."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} ingredients")
    return values


def _no_base(name: str, base: Tensor | None) -> None:
    if base is not None:
        raise ValueError(f"{name} ignores a base model: pass the base's tensor among the tensors (mergekit's meaning)")


def _needs_base(name: str, base: Tensor | None) -> Tensor:
    if base is None:
        raise ValueError(f"{name} needs the base model's tensor")
    return _f64(base)


def _exactly(name: str, tensors: Sequence[Tensor], count: int) -> None:
    if len(tensors) != count:
        raise ValueError(f"{name} takes exactly {count} tensor(s) besides the base, not {len(tensors)}")


def rank_window(values: Tensor, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Keep the elements whose rank (ascending, 0-based, over the whole tensor) is in ``[start, start + count)``.

    Returns ``(keep, undecided)``, both bool tensors of ``values``' shape. Equal values share
    the ranks ``[#smaller, #smaller-or-equal)``: all of them are kept when those ranks meet the
    window, and the ones whose ranks reach outside it are *undecided* (an implementation that
    keeps exactly ``count`` elements, as mergekit's ``argsort`` does, keeps an arbitrary subset
    of them).
    """
    flat = values.reshape(-1)
    if count <= 0 or flat.numel() == 0:
        nothing = torch.zeros_like(values, dtype=torch.bool)
        return nothing, nothing.clone()
    ordered = torch.sort(flat).values
    smaller = torch.searchsorted(ordered, flat, right=False)
    at_most = torch.searchsorted(ordered, flat, right=True)
    end = start + count
    keep = (at_most > start) & (smaller < end)
    undecided = keep & ((smaller < start) | (at_most > end))
    return keep.reshape(values.shape), undecided.reshape(values.shape)


# --------------------------------------------------------------------------------------------------- interpolation


def linear(
    tensors: Sequence[Tensor], base: Tensor | None = None, *, weight: float | Sequence[float], normalize: bool = True
) -> Tensor:
    """``linear``: the weighted average of the inputs (Wortsman et al. 2022, "Model soups", arXiv 2203.05482).

    ``sum_i w_i x_i``, divided by ``sum_i w_i`` with ``normalize`` (mergekit's default: true).
    ``weight`` is per input (required). A zero weight sum with ``normalize`` is undefined
    (mergekit divides by it and writes inf/NaN); refused here.
    """
    _no_base("linear", base)
    weights = _per_model(weight, len(tensors), "weight")
    result = sum(w * _f64(t) for w, t in zip(weights, tensors))
    assert isinstance(result, Tensor)
    if normalize:
        total = math.fsum(weights)
        if total == 0:
            raise ValueError("linear: the weights sum to 0; normalize divides by their sum")
        result = result / total
    return result


def _slerp_coefficients(t: float, cos: Tensor, linear_where: Tensor) -> tuple[Tensor, Tensor]:
    """SLERP's coefficients of the two endpoints at angle ``acos(cos)``, or ``(1 - t, t)`` where ``linear_where``."""
    theta = torch.acos(torch.where(linear_where, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    safe = torch.where(linear_where, torch.ones_like(sin), sin)
    c0 = torch.where(linear_where, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(linear_where, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0, c1


def slerp(
    tensors: Sequence[Tensor], base: Tensor | None, *, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> Tensor:
    """``slerp``: spherical linear interpolation from the base (``t = 0``) to the other model (``t = 1``).

    Shoemake 1985 ("Animating rotation with quaternion curves"), applied as mergekit applies it
    to a whole tensor flattened to one vector: with ``Omega`` the angle between ``v0 = base`` and
    ``v1`` (their normalised dot product), ``sin((1 - t) Omega) / sin Omega * v0 + sin(t Omega) /
    sin Omega * v1`` -- the coefficients applied to the tensors themselves, not to unit vectors.
    Where ``|cos Omega| > dot_threshold`` (0.9995, nearly parallel or antiparallel: mergekit's
    guard, within 1e-4 relative of SLERP for parallel vectors) it is the linear ``(1 - t) v0 + t v1``.
    A norm at most ``eps`` counts as 1 for the angle (zero tensors). ``t`` is one number per tensor.
    """
    anchor = _needs_base("slerp", base)
    _exactly("slerp", tensors, 1)
    v0, v1 = anchor.reshape(-1), _f64(tensors[0]).reshape(-1)
    if v0.numel() == 0:
        return anchor
    n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    n0 = torch.where(n0 > eps, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > eps, n1, torch.ones_like(n1))
    cos = torch.dot(v0 / n0, v1 / n1).clamp(-1, 1)
    c0, c1 = _slerp_coefficients(t, cos, cos.abs() > dot_threshold)
    return (c0 * v0 + c1 * v1).reshape(anchor.shape)


def _nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP of each last-axis vector of ``v0`` with its counterpart in ``v1`` (linear where collinear)."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    c0, c1 = _slerp_coefficients(t, cos, (1 - cos.square()) <= eps**2)
    return c0 * v0 + c1 * v1


def nuslerp(
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    weight: float | Sequence[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> Tensor:
    """``nuslerp``: SLERP of two models (or, with a base, of their task vectors), weighted (mergekit's own method).

    ``t = w_1 / (w_0 + w_1)`` (0.5 where ``|w_0 + w_1| < 1e-6``) towards the *second* model;
    ``weight`` per model (required). With a base: ``base + slerp(t, x_0 - base, x_1 - base)``.
    ``nuslerp_flatten`` (default): the whole tensor is one vector; otherwise each vector along
    the last axis (``nuslerp_row_wise: false``) or along the first (``true``) is interpolated on
    its own. Collinear vectors (``1 - cos^2 <= 1e-16``) interpolate linearly. It is SLERP as in
    :func:`slerp`, only the guard for (anti)parallel vectors is exact collinearity.
    """
    _exactly("nuslerp", tensors, 2)
    w0, w1 = _per_model(weight, 2, "weight")
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    anchor = None if base is None else _f64(base)
    v0, v1 = (_f64(x) if anchor is None else _f64(x) - anchor for x in tensors)
    shape = v0.shape
    if nuslerp_flatten:
        result = _nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    elif nuslerp_row_wise and v0.ndim > 1:
        result = _nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        result = _nuslerp_vectors(t, v0, v1)
    return result if anchor is None else anchor + result


def multislerp(
    tensors: Sequence[Tensor],
    base: Tensor | None = None,
    *,
    weight: float | Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """``multislerp``: barycentric interpolation of any number of models on the hypersphere (mergekit's own).

    C. Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea), as
    mergekit's code computes it, each tensor (or task vector ``x_i - base`` with a base)
    flattened: unit vectors ``u_i = x_i / (|x_i| + eps)``; their weighted mean ``m``
    normalised; tangent vectors ``u_i - (u_i . m) m``; their weighted sum ``T``; the
    exponential map ``m cos|T| + T sin|T| / |T|`` (``|T|`` plus ``eps``) scaled by the weighted
    mean norm ``sum_i w_i |x_i|``; plus the base. Weights per model (required), divided by their
    sum with ``normalize_weights`` (default). One tensor: that tensor. A weighted mean of unit
    vectors below ``eps``: the weighted sum for two tensors, an error for more (as mergekit).
    """
    if len(tensors) == 1:
        return _f64(tensors[0])
    weights = torch.tensor(_per_model(weight, len(tensors), "weight"), dtype=F64)
    if normalize_weights:
        weights = weights / weights.sum()
    anchor = None if base is None else _f64(base)
    stacked = torch.stack([_f64(x) if anchor is None else _f64(x) - anchor for x in tensors])
    flat = stacked.reshape(len(tensors), -1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted mean of the unit vectors is 0 (antipodal inputs)")
        result = (stacked[0] * weights[0] + stacked[1] * weights[1]).reshape(stacked.shape[1:])
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * weights[:, None]).sum(0)
        length = torch.linalg.vector_norm(tangent) + eps
        direction = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        result = (direction * (norms.squeeze(-1) * weights).sum()).reshape(stacked.shape[1:])
    return result if anchor is None else result + anchor


def karcher(tensors: Sequence[Tensor], base: Tensor | None = None, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """``karcher``: the Karcher (Frechet) mean of the inputs' directions on the unit sphere, times their mean norm.

    Wang, Ye and Yin 2026, "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold"
    (arXiv 2603.04972; mergekit's ``karcher.py`` is the paper's code): equal weights
    ``a_i = 1/N`` over every input (a listed base is one of them); each tensor flattened to
    ``x_i = |x_i| u_i``. Inputs of norm at most ``tol`` leave the direction (the others' weights
    renormalised) but count in the norm. Start at the normalised weighted mean of the ``u_i``
    (``u_0`` if that is shorter than ``tol``); repeat at most ``max_iter`` times: tangent ``T =
    sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)`` (``theta_i = acos(u_i . m)``, terms
    with ``theta_i < tol`` left out), stop once ``|T| < tol``, else ``m <- cos|T| m + sin|T| T /
    |T|``, renormalised. Result: ``(sum_i a_i |x_i|) m``. ``max_iter`` and ``tol`` are the
    method's own parameters, so the definition is this iteration with them, in float64.
    """
    _no_base("karcher", base)
    if len(tensors) == 1:
        return _f64(tensors[0])
    alphas = [1.0 / len(tensors)] * len(tensors)
    shape = tensors[0].shape
    flats = [_f64(x).reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(x) for x in flats]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros(shape, dtype=F64)
    units = [flats[i] / norms[i] for i in valid]
    total = math.fsum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    mean = sum(w * u for w, u in zip(weights, units))
    assert isinstance(mean, Tensor)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            cos = torch.dot(mean, u).clamp(-1, 1)
            theta = torch.acos(cos)
            if float(theta) < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).reshape(shape)


# --------------------------------------------------------------------------------------------------- task arithmetic family


def _combine(
    deltas: Sequence[Tensor],
    base: Tensor,
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """mergekit's generalized task arithmetic after sparsification: weight, elect signs, sum, divide, scale, add.

    ``d_i = w_i delta_i``; with ``consensus`` (TIES's sign election, Yadav et al. 2023) the
    elected sign of an element is that of ``sum_i d_i`` (``+`` for a sum of 0) and only the
    ``d_i`` of that sign count (a zero ``d_i`` has neither); ``mixed = sum`` of the counted
    ``d_i``, divided with ``normalize`` by the sum of their weights (1 where none counts), or
    without consensus by ``sum_i w_i`` (1 where ``|sum_i w_i| < 1e-8``); ``base + lambda * mixed``.
    """
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    w = torch.tensor(list(weights), dtype=F64).reshape(-1, *([1] * base.ndim))
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(F64)
        agree = torch.sign(weighted) == elected
        mixed = (weighted * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(0)
        total = math.fsum(weights)
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=F64)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed


def vote_undecided(deltas: Sequence[Tensor], weights: Sequence[float], rtol: float = 2.0**-23) -> Tensor:
    """Elements whose elected sign rests on a vote ``sum_i w_i delta_i`` that is 0 up to ``rtol`` of ``sum_i |w_i delta_i|``.

    The election's ``+`` for a sum of exactly 0 is a convention; an implementation that sums in
    float32 may see such a sum on either side of 0. Comparisons leave these out (and count them).
    Elements where every vote is 0 are not undecided: nothing is added there, whatever the sign.
    """
    weighted = torch.stack([w * _f64(d) for w, d in zip(weights, deltas)])
    magnitude = weighted.abs().sum(0)
    return (weighted.sum(0).abs() <= rtol * len(deltas) * magnitude) & (magnitude > 0)


def l1_rescaled(delta: Tensor, keep: Tensor, eps: float = 1e-7) -> Tensor:
    """mergekit's ``rescale`` (``RescaleNorm.l1``): the kept elements scaled so the L1 norm is the untrimmed one's.

    Unscaled where either norm is below ``eps`` (an absolute bound, as mergekit).
    """
    kept = delta * keep
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude_keep(delta: Tensor, density: float) -> tuple[Tensor, Tensor]:
    """TIES's trim: keep the ``k = max(1, int(density * numel))`` largest ``|delta|`` of the whole tensor.

    ``(keep, undecided)`` as :func:`rank_window`; density ``>= 1`` keeps all, ``<= 0`` none.
    """
    n = delta.numel()
    if density >= 1:
        everything = torch.ones_like(delta, dtype=torch.bool)
        return everything, torch.zeros_like(everything)
    if density <= 0 or n == 0:
        nothing = torch.zeros_like(delta, dtype=torch.bool)
        return nothing, nothing.clone()
    k = max(1, int(density * n))
    return rank_window(delta.abs(), n - k, k)


def outlier_keep(delta: Tensor, density: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Model Breadcrumbs' mask: drop the ``int(gamma * n)`` largest ``|delta|`` and the smallest, keep ``int(density * n)``.

    Davari and Belilovsky 2023 (arXiv 2312.06795) remove a top fraction (outliers) and a
    bottom fraction (negligible changes) per tensor; mergekit's parameters say it with the
    kept fraction ``density`` and the top fraction ``gamma`` (bottom = ``1 - density - gamma``):
    ascending ranks ``[n_bot, n_bot + int(density * n))`` with ``n_bot = max(0, n -
    int(density * n) - int(gamma * n))``, so where ``density + gamma > 1`` fewer outliers go.
    Density ``>= 1`` keeps everything (``gamma`` too is then without effect, as in mergekit).
    """
    if density >= 1:
        everything = torch.ones_like(delta, dtype=torch.bool)
        return everything, torch.zeros_like(everything)
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    return rank_window(delta.abs(), max(0, n - target - top), target)


def _draw(generator: torch.Generator | None, probabilities: Tensor) -> Tensor:
    if generator is None:
        raise ValueError("a random method needs its masks or a torch.Generator")
    return torch.rand(probabilities.shape, generator=generator, dtype=F64) < probabilities


def task_arithmetic(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    int8_mask: bool = False,
) -> Tensor:
    """``task_arithmetic``: ``base + lambda sum_i w_i (x_i - base)`` (Ilharco et al. 2023, arXiv 2212.04089).

    ``weight`` per model (required), ``lambda`` 1; ``normalize`` (default false) divides by
    ``sum_i w_i``. ``int8_mask`` is a memory setting of mergekit's, without effect on the result.
    """
    del int8_mask
    anchor = _needs_base("task_arithmetic", base)
    weights = _per_model(weight, len(tensors), "weight")
    deltas = [_f64(x) - anchor for x in tensors]
    return _combine(deltas, anchor, weights, consensus=False, normalize=normalize, lambda_=lambda_)


def _magnitude_method(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: float | Sequence[float],
    keep: Callable[[Tensor, int], Tensor],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> Tensor:
    anchor = _needs_base(name, base)
    weights = _per_model(weight, len(tensors), "weight")
    deltas = []
    for i, x in enumerate(tensors):
        delta = _f64(x) - anchor
        mask = keep(delta, i)
        deltas.append(l1_rescaled(delta, mask) if rescale else delta * mask)
    return _combine(deltas, anchor, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    int8_mask: bool = False,
) -> Tensor:
    """``ties``: trim, elect sign, disjoint merge (Yadav et al. 2023, "TIES-Merging", arXiv 2306.01708).

    Each task vector ``x_i - base`` keeps its ``max(1, int(density_i * n))`` largest magnitudes
    (:func:`magnitude_keep`; ``density`` per model, default 1), is weighted by ``w_i`` (per
    model, required), and the signs are elected and merged as :func:`_combine` says; with
    ``normalize`` (default true) the disjoint mean of the paper (weights 1). ``rescale`` (default
    false) scales each trimmed vector to its untrimmed L1 norm (mergekit's; no paper defines it).
    """
    del int8_mask
    densities = _per_model(density, len(tensors), "density")
    return _magnitude_method(
        "ties", tensors, base, weight, lambda delta, i: magnitude_keep(delta, densities[i])[0],
        consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


def _breadcrumbs(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: float | Sequence[float],
    density: float | Sequence[float],
    gamma: float | Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> Tensor:
    densities = _per_model(density, len(tensors), "density")
    gammas = _per_model(gamma, len(tensors), "gamma")
    return _magnitude_method(
        name, tensors, base, weight, lambda delta, i: outlier_keep(delta, densities[i], gammas[i])[0],
        consensus=consensus, normalize=normalize, rescale=rescale, lambda_=lambda_,
    )


def breadcrumbs(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
) -> Tensor:
    """``breadcrumbs``: Model Breadcrumbs (Davari and Belilovsky 2023, arXiv 2312.06795) without sign election.

    Each task vector masked by :func:`outlier_keep` (``density`` default 1: no trimming at all,
    ``gamma`` default 0.01, both per model), weighted by ``w_i`` (per model, required), summed;
    ``normalize`` (default false) divides by ``sum_i w_i``; ``base + lambda * sum``.
    """
    del int8_mask
    return _breadcrumbs("breadcrumbs", tensors, base, weight, density, gamma, consensus=False,
                        normalize=normalize, rescale=rescale, lambda_=lambda_)


def breadcrumbs_ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    gamma: float | Sequence[float] = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    int8_mask: bool = False,
) -> Tensor:
    """``breadcrumbs_ties``: :func:`breadcrumbs`' masks, then TIES's sign election (mergekit's combination).

    As :func:`breadcrumbs`, the signs elected and merged as :func:`_combine` says. Note
    ``normalize`` defaults to false here (``ties`` defaults to true): the agreeing entries are
    summed, not averaged, unless the config says so.
    """
    del int8_mask
    return _breadcrumbs("breadcrumbs_ties", tensors, base, weight, density, gamma, consensus=True,
                        normalize=normalize, rescale=rescale, lambda_=lambda_)


RescaleBy = Literal["paper", "l1"]


def _random_method(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: float | Sequence[float],
    probabilities: Callable[[Tensor, int], Tensor | None],
    masks: Sequence[Tensor] | None,
    generator: torch.Generator | None,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    rescale_by: RescaleBy,
    lambda_: float,
) -> Tensor:
    """Random sparsification: ingredient ``i`` keeps element ``j`` with probability ``p_ij`` (``None``: keeps all).

    The kept elements are divided by ``p_ij`` with ``rescale`` (the papers' rescaling, so each
    task vector is unchanged in expectation), or L1-rescaled with ``rescale_by="l1"`` (mergekit).
    """
    anchor = _needs_base(name, base)
    weights = _per_model(weight, len(tensors), "weight")
    if masks is not None and len(masks) != len(tensors):
        raise ValueError(f"{name}: {len(masks)} masks for {len(tensors)} ingredients")
    deltas = []
    for i, x in enumerate(tensors):
        delta = _f64(x) - anchor
        p = probabilities(delta, i)
        if p is None:  # density >= 1: nothing dropped, nothing rescaled (as mergekit)
            deltas.append(delta)
            continue
        keep = masks[i].to(torch.bool) if masks is not None else _draw(generator, p)
        if not rescale:
            deltas.append(delta * keep)
        elif rescale_by == "l1":
            deltas.append(l1_rescaled(delta, keep))
        else:
            deltas.append(torch.where(keep, delta / p, torch.zeros_like(delta)))
    return _combine(deltas, anchor, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)


def dare_probabilities(delta: Tensor, density: float) -> Tensor | None:
    """DARE's keep probability of every element: ``density`` (``None`` for density ``>= 1``: nothing is dropped)."""
    if density >= 1:
        return None
    return torch.full_like(delta, max(density, 0.0), dtype=F64)


def _dare(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: float | Sequence[float],
    density: float | Sequence[float],
    masks: Sequence[Tensor] | None,
    generator: torch.Generator | None,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    rescale_by: RescaleBy,
    lambda_: float,
) -> Tensor:
    densities = _per_model(density, len(tensors), "density")
    return _random_method(
        name, tensors, base, weight, lambda delta, i: dare_probabilities(delta, densities[i]), masks, generator,
        consensus=consensus, normalize=normalize, rescale=rescale, rescale_by=rescale_by, lambda_=lambda_,
    )


def dare_ties(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    masks: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale_by: RescaleBy = "paper",
) -> Tensor:
    """``dare_ties``: DARE's random drop (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099), TIES's election.

    Each element of each task vector is kept with probability ``density_i`` (per model,
    default 1: nothing dropped) and, with ``rescale`` (default true), divided by ``density_i``
    as the paper does; then weighted, signs elected and merged as :func:`_combine` says
    (``normalize`` default false). mergekit instead scales each trimmed vector to its untrimmed
    L1 norm (``rescale_by="l1"``): the same in expectation, not element by element; and on
    bf16 inputs it draws with the density rounded to bf16 (0.53 -> 0.53125).
    """
    del int8_mask
    return _dare("dare_ties", tensors, base, weight, density, masks, generator, consensus=True,
                 normalize=normalize, rescale=rescale, rescale_by=rescale_by, lambda_=lambda_)


def dare_linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    masks: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale_by: RescaleBy = "paper",
) -> Tensor:
    """``dare_linear``: :func:`dare_ties` without the sign election (task arithmetic of the dropped, rescaled vectors)."""
    del int8_mask
    return _dare("dare_linear", tensors, base, weight, density, masks, generator, consensus=False,
                 normalize=normalize, rescale=rescale, rescale_by=rescale_by, lambda_=lambda_)


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor | None:
    """DELLA's MagPrune keep probabilities: from ``density - epsilon`` (smallest ``|delta|``) to ``density + epsilon``.

    Deep et al. 2024 (arXiv 2406.11617), in mergekit's (and the authors' code's)
    parameterisation: within each row (the vectors along axis 1; a 1-D tensor is one row) the
    elements are ranked by magnitude, ``r = 0 .. n-1`` ascending (ties in index order), and kept
    with probability ``density - epsilon + 2 epsilon r / (n - 1)`` (``density`` for a row of
    one element, where mergekit's formula is 0/0). ``None`` for density ``>= 1`` (nothing
    dropped); density ``<= 0`` keeps nothing; ``density +- epsilon`` must lie in (0, 1).
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(delta, dtype=F64)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("della: density +- epsilon must lie in (0, 1)")
    rows = delta.unsqueeze(0) if delta.ndim < 2 else delta
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).to(F64)
    scaled = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon + 2 * epsilon * scaled).reshape(delta.shape)


def _della(
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    weight: float | Sequence[float],
    density: float | Sequence[float],
    epsilon: float | Sequence[float],
    masks: Sequence[Tensor] | None,
    generator: torch.Generator | None,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    rescale_by: RescaleBy,
    lambda_: float,
) -> Tensor:
    densities = _per_model(density, len(tensors), "density")
    epsilons = _per_model(epsilon, len(tensors), "epsilon")
    return _random_method(
        name, tensors, base, weight, lambda delta, i: della_keep_probabilities(delta, densities[i], epsilons[i]),
        masks, generator, consensus=consensus, normalize=normalize, rescale=rescale, rescale_by=rescale_by,
        lambda_=lambda_,
    )


def della(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    epsilon: float | Sequence[float] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = True,
    int8_mask: bool = False,
    masks: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale_by: RescaleBy = "paper",
) -> Tensor:
    """``della``: DELLA-Merging (Deep et al. 2024, arXiv 2406.11617): MagPrune, elect, fuse.

    Each task vector's elements are kept with :func:`della_keep_probabilities` (``density``
    default 1: nothing dropped; ``epsilon`` default 0.15; both per model) and, with ``rescale``
    (default true), each kept element divided by its own keep probability ``p_ij`` (the paper's
    ``1 / (1 - p_drop)``); then weighted, elected and merged as :func:`_combine` says
    (``normalize`` default true: the paper's mean of the elected). mergekit rescales each
    trimmed vector to its untrimmed L1 norm instead (``rescale_by="l1"``), and on bf16 inputs
    computes the ranks and probabilities in bf16 (ranks above 256 rounded).
    """
    del int8_mask
    return _della("della", tensors, base, weight, density, epsilon, masks, generator, consensus=True,
                  normalize=normalize, rescale=rescale, rescale_by=rescale_by, lambda_=lambda_)


def della_linear(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    weight: float | Sequence[float],
    density: float | Sequence[float] = 1.0,
    epsilon: float | Sequence[float] = 0.15,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    int8_mask: bool = False,
    masks: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale_by: RescaleBy = "paper",
) -> Tensor:
    """``della_linear``: :func:`della`'s MagPrune without the election; ``normalize`` default false."""
    del int8_mask
    return _della("della_linear", tensors, base, weight, density, epsilon, masks, generator, consensus=False,
                  normalize=normalize, rescale=rescale, rescale_by=rescale_by, lambda_=lambda_)


def sce_select(task_vectors: Tensor, select_topk: float) -> tuple[Tensor, Tensor]:
    """SCE's select: the ``int(select_topk * #nonzero variances)`` positions of largest variance across models.

    ``task_vectors`` stacked ``[models, *shape]``; the variance is the population one, computed as
    ``(n sum tau^2 - (sum tau)^2) / n^2``: exact up to one rounding wherever its terms are (bf16 and
    fp16 task vectors in float64), so that positions of equal variance (a permutation or a shift of
    the same values) tie, and all of those tied with the k-th are kept (``torch.var``'s two passes
    round the mean and break such ties by rounding noise). ``(keep, undecided)`` as :func:`rank_window`
    over the positions; ``select_topk >= 1`` keeps all.
    """
    shape = task_vectors.shape[1:]
    if select_topk >= 1:
        everything = torch.ones(shape, dtype=torch.bool)
        return everything, torch.zeros_like(everything)
    count = task_vectors.shape[0]
    tau = task_vectors.to(F64)
    variance = (count * tau.square().sum(0) - tau.sum(0).square()).clamp(min=0) / count**2
    k = int(int(torch.count_nonzero(variance)) * select_topk) if select_topk > 0 else 0
    return rank_window(variance, variance.numel() - k, k)


def sce(
    tensors: Sequence[Tensor], base: Tensor | None, *, select_topk: float = 1.0, int8_mask: bool = False
) -> Tensor:
    """``sce``: Select, Calculate, Erase (Wan et al. 2024, "FuseChat", arXiv 2408.07990).

    Task vectors ``tau_i = x_i - base``. Select: with ``select_topk < 1`` every ``tau_i`` is
    zeroed outside the positions :func:`sce_select` keeps. Calculate: ``eta_i = |tau_i|^2 /
    sum_j |tau_j|^2`` of the selected vectors (equal where all are 0). Erase: the elected sign
    of a position is that of ``sum_i tau_i`` (unweighted, ``+`` for 0); ``m_i`` marks the
    ``tau_i`` of that sign. Result ``base + sum_i eta_i m_i tau_i / sum_i eta_i m_i`` (0 where
    nothing agrees). No per-model parameters; ``int8_mask`` is without effect.

    mergekit 0.1.5 differs in two guards: it takes equal weights whenever ``sum_j mean(tau_j^2)
    < 1e-6`` (an absolute bound that real fine-tunes, with task vectors of 1e-3 and below, fall
    under: their SCE weights silently become equal), and divides by ``max(sum eta m, 1e-6)``.
    The FuseChat repository's own code uses the selection only for the ``eta_i`` and merges the
    unselected elements too; mergekit (followed here) zeroes them, as the paper's "filtered
    fusion vectors" say.
    """
    del int8_mask
    anchor = _needs_base("sce", base)
    if not tensors:
        return anchor
    tau = torch.stack([_f64(x) - anchor for x in tensors])
    keep, _ = sce_select(tau, select_topk)
    tau = tau * keep
    squares = tau.reshape(len(tensors), -1).square().sum(1)
    total = squares.sum()
    eta = torch.full_like(squares, 1 / len(tensors)) if total == 0 else squares / total
    eta = eta.reshape(-1, *([1] * anchor.ndim))
    elected = torch.where(tau.sum(0) >= 0, 1.0, -1.0).to(F64)
    weights = eta * (torch.sign(tau) == elected)
    divisor = weights.sum(0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return anchor + (tau * weights).sum(0) / divisor


def model_stock(
    tensors: Sequence[Tensor],
    base: Tensor | None,
    *,
    filter_wise: bool = False,
    clamp_t_at_zero: bool = False,
) -> Tensor:
    """``model_stock``: Model Stock (Jang, Han and Yun 2024, arXiv 2403.19522).

    With ``N >= 2`` fine-tunes ``w_i`` of the base ``w_0`` and ``cos`` the mean cosine over all
    pairs of task vectors ``w_i - w_0`` (0 for a pair with a zero vector): ``t = N cos / (1 +
    (N - 1) cos)`` (0 where the denominator is 0: the base) and ``t mean_i(w_i) + (1 - t) w_0``.
    Per tensor (the paper's), or with ``filter_wise`` per row: each vector along the last axis
    (a 1-D tensor is one row). ``clamp_t_at_zero`` gives hub-soup's deliberate difference (``t``
    0 where ``cos <= 0``); mergekit follows the formula, and bounds the norm product below by
    1e-6 (absolute: tiny task vectors get a smaller cosine than theirs).
    """
    anchor = _needs_base("model_stock", base)
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tunes besides the base")
    shape = anchor.shape
    if filter_wise:
        w0 = anchor.unsqueeze(0) if anchor.ndim < 2 else anchor
    else:
        w0 = anchor.reshape(-1)
    ws = [_f64(x).reshape(w0.shape) for x in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            product = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            safe = torch.where(product == 0, torch.ones_like(product), product)
            cosines.append(torch.where(product == 0, torch.zeros_like(product), (a * b).sum(-1) / safe).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator == 0
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    if clamp_t_at_zero:
        t = torch.where(cos <= 0, torch.zeros_like(t), t)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


# --------------------------------------------------------------------------------------------------- mergekit's own


def nearswap(tensors: Sequence[Tensor], base: Tensor | None, *, t: float) -> Tensor:
    """``nearswap`` (mergekit's code is the definition): take the other model's value where it is near the base's.

    ``a = base``, ``b`` the other model; ``w = clamp(t / max(|a - b|, 1e-6), 0, 1)``; result
    ``w b + (1 - w) a``: elements closer than ``t`` become ``b``, the others move ``t`` towards it.
    """
    a = _needs_base("nearswap", base)
    _exactly("nearswap", tensors, 1)
    b = _f64(tensors[0])
    w = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * a


def arcee_fusion_importance(x: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance of each element: ``|x - base|`` times the KL divergence of its row's softmaxes.

    ``KL(softmax(x) || softmax(base))`` over the last axis (with ``1e-8`` added to both
    distributions, as mergekit), one value per row, broadcast along it.
    """
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)


def arcee_fusion_threshold(importance: Tensor) -> Tensor:
    """``median + 1.5 (Q3 - Q1)`` of the importances, each quantile the sorted element at ``int(q (n - 1))``.

    Exact over the whole tensor; mergekit samples 1,000,000 elements (with replacement, from
    the unseeded global RNG) of larger tensors, so it is not reproducible there.
    """
    ordered = torch.sort(importance.reshape(-1)).values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """``arcee_fusion`` (mergekit's code is the definition): the other model's change kept where it is important.

    ``base + (x - base) [importance >= threshold]`` with :func:`arcee_fusion_importance` and
    :func:`arcee_fusion_threshold`. No parameters.
    """
    anchor = _needs_base("arcee_fusion", base)
    _exactly("arcee_fusion", tensors, 1)
    x = _f64(tensors[0])
    importance = arcee_fusion_importance(x, anchor)
    return anchor + (x - anchor) * (importance >= arcee_fusion_threshold(importance))


def passthrough(tensors: Sequence[Tensor], base: Tensor | None = None, *, scale: float | None = None) -> Tensor:
    """``passthrough``: the one input's tensor, times ``scale`` where given (per input, default none)."""
    _no_base("passthrough", base)
    _exactly("passthrough", tensors, 1)
    x = _f64(tensors[0])
    return x if scale is None else x * scale


def _ram_parts(tensors: Sequence[Tensor], anchor: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """RAM's task vectors (zeroed where ``|tau| <= epsilon``), their contributing masks and counts per position."""
    tau = torch.stack([_f64(x) - anchor for x in tensors])
    contributes = tau.abs() > epsilon
    return tau * contributes, contributes, contributes.sum(0)


def ram(tensors: Sequence[Tensor], base: Tensor | None, *, epsilon: float = 1e-5) -> Tensor:
    """``ram`` (mergekit's code is the definition; arXiv 2601.13572): the mean over contributing models.

    Task vectors ``tau_i = x_i - base``; model ``i`` contributes at a position where ``|tau_i| >
    epsilon``; ``base + sum_i tau_i [contributes] / max(count, 1)``: a position one model
    changed takes its change, one several changed takes the mean of theirs.
    """
    anchor = _needs_base("ram", base)
    if not tensors:
        return anchor
    tau, _, counts = _ram_parts(tensors, anchor, epsilon)
    return anchor + tau.sum(0) / counts.clamp(min=1)


def ramplus_tl(
    tensors: Sequence[Tensor], base: Tensor | None, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> Tensor:
    """``ramplus_tl`` (mergekit's code is the definition): :func:`ram` with each model's unique changes scaled up.

    Per model, over the tensor: ``shared_i`` its contributing positions that others contribute
    to as well, ``unique_i`` those only it does; ``rho_i = shared_i / max(unique_i, epsilon)``,
    ``lambda_i = 1 + r clamp(rho_i, 0, alpha)``; unique changes are multiplied by ``lambda_i``,
    shared ones averaged as in :func:`ram`.
    """
    anchor = _needs_base("ramplus_tl", base)
    if not tensors:
        return anchor
    tau, contributes, counts = _ram_parts(tensors, anchor, epsilon)
    unique, shared = counts == 1, counts > 1
    flat = (len(tensors), -1)
    n_shared = (contributes & shared).reshape(flat).sum(1).to(F64)
    n_unique = (contributes & unique).reshape(flat).sum(1).to(F64)
    lambdas = 1 + r * (n_shared / n_unique.clamp(min=epsilon)).clamp(0, alpha)
    lambdas = lambdas.reshape(-1, *([1] * anchor.ndim))
    return anchor + (tau * unique * lambdas + tau * shared / counts.clamp(min=1)).sum(0)


METHODS: dict[str, Callable[..., Tensor]] = {
    "linear": linear,
    "slerp": slerp,
    "nuslerp": nuslerp,
    "multislerp": multislerp,
    "karcher": karcher,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_ties": dare_ties,
    "dare_linear": dare_linear,
    "breadcrumbs": breadcrumbs,
    "breadcrumbs_ties": breadcrumbs_ties,
    "della": della,
    "della_linear": della_linear,
    "sce": sce,
    "model_stock": model_stock,
    "nearswap": nearswap,
    "arcee_fusion": arcee_fusion,
    "passthrough": passthrough,
    "ram": ram,
    "ramplus_tl": ramplus_tl,
}
"""mergekit 0.1.5's 20 methods by their names."""

RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})
"""The methods that draw masks (``masks=`` or ``generator=``)."""


# --------------------------------------------------------------------------------------------------- laws and ulps


def bernoulli_z(kept: int, total: int, p: float) -> float:
    """How many standard deviations ``kept`` of ``total`` Bernoulli(``p``) draws are from their mean ``total p``."""
    if total == 0 or p <= 0 or p >= 1:
        return 0.0 if kept == total * max(0.0, min(1.0, p)) else math.inf
    return (kept - total * p) / math.sqrt(total * p * (1 - p))


def poisson_binomial_z(kept: Tensor, probabilities: Tensor) -> float:
    """:func:`bernoulli_z` for draws of differing probabilities (DELLA): ``kept`` a bool mask, one probability each."""
    p = _f64(probabilities).reshape(-1)
    variance = float((p * (1 - p)).sum())
    excess = float(kept.reshape(-1).sum()) - float(p.sum())
    return 0.0 if variance == 0 and excess == 0 else excess / math.sqrt(variance) if variance else math.inf


def more_than_one_ulp(out: Tensor, expected: Tensor, mantissa_bits: int = 8) -> Tensor:
    """Elements of ``out`` more than one ulp of a format with ``mantissa_bits`` significant bits (bf16: 8) from ``expected``.

    The ulp is the spacing at the float64 ``expected``'s binade (the smallest normal spacing
    below it), so a correctly rounded result is always within one.
    """
    exponent = torch.floor(torch.log2(_f64(expected).abs().clamp_min(2.0**-126)))
    return (_f64(out) - _f64(expected)).abs() > 2.0 ** (exponent - (mantissa_bits - 1))


# --------------------------------------------------------------------------------------------------- parameters


def layer_t(layer_index: int | None, layer_count: int | None) -> float:
    """The position ``t`` at which a gradient is read for a tensor, as mergekit's planner sets it.

    Layer ``i`` of a slice of ``n`` layers: ``i / (n - 1)``; a slice of one layer: 1 (mergekit's
    ``plan_slice``); a tensor outside the layers (embeddings, final norm, head: ``None``): 0.
    """
    if layer_index is None:
        return 0.0
    if layer_count is None or not 0 <= layer_index < layer_count:
        raise ValueError(f"layer {layer_index} of {layer_count}")
    return layer_index / (layer_count - 1) if layer_count > 1 else 1.0


_TRUE = {"1", "true", "t", "yes", "y", "on"}
_FALSE = {"0", "false", "f", "no", "n", "off"}


def _coerce(value: Any, value_type: type) -> Any:
    """A YAML scalar as the parameter's type, as pydantic's lax validation reads it ("1e-3" is a float)."""
    if value_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{value!r} is not a boolean")
    if value_type is int:
        number = float(value)
        if isinstance(value, bool) or number != int(number):
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if value_type is float:
        return float(value)
    return str(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def resolve_parameter(
    setting: Any,
    tensor_name: str,
    layer_index: int | None = None,
    layer_count: int | None = None,
    *,
    value_type: type = float,
) -> Any:
    """One scope's setting of a parameter, for one tensor: mergekit 0.1.5's ``evaluate_setting``.

    ``setting`` as YAML loads it:
    - a scalar: that value;
    - a list of scalars, a **gradient**: read at ``t = layer_t(layer_index, layer_count)``;
      numbers are interpolated linearly between the neighbouring entries (``t (len - 1)``
      falls between them); booleans and strings take entry ``int(t (len - 1))``;
    - a mapping ``{filter, value}`` or a list of them, a **filter list**: the first entry whose
      ``filter`` is missing, ``"*"``, or a substring of ``tensor_name`` gives the value (itself a
      scalar or a gradient); ``None`` when no entry matches (the next scope then decides).
    An empty list is ``None`` too. ``value_type`` is the parameter's type (gradient endpoints are
    read as it before interpolating, and the result is read as it again).
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return _coerce(setting, value_type)
    if not isinstance(setting, list):
        raise TypeError(f"unexpected setting {setting!r}")
    if not setting:
        return None
    t = layer_t(layer_index, layer_count)
    if all(_is_scalar(e) for e in setting):
        values = [_coerce(e, value_type) for e in setting]
        position = t * (len(values) - 1)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(position)]
        i0 = int(position)
        i1 = min(len(values) - 1, i0 + 1)
        fraction = position - i0
        return _coerce((1 - fraction) * values[i0] + fraction * values[i1], value_type)
    for entry in setting:
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise ValueError(f"a filter list's entry needs a value: {entry!r}")
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return resolve_parameter(entry["value"], tensor_name, layer_index, layer_count, value_type=value_type)
    return None


MISSING: Any = object()
"""``default`` of :func:`resolve_scopes` for a required parameter."""


def resolve_scopes(
    name: str,
    scopes: Sequence[Mapping[str, Any] | None],
    tensor_name: str,
    layer_index: int | None = None,
    layer_count: int | None = None,
    *,
    default: Any = MISSING,
    value_type: type = float,
) -> Any:
    """A parameter's value for one tensor: the first scope, in precedence order, whose setting resolves.

    ``scopes`` are ``parameters`` mappings from highest precedence to lowest: for a per-model
    parameter the source's (in ``slices``) or the model's (in ``models``), then the slice's,
    then the global ones; a shared parameter (``t``, ``lambda``, ``normalize`` ...) starts at the
    slice -- mergekit 0.1.5 never reads a source's ``parameters`` for it (a ``t`` written under
    a source is silently ignored). A scope whose filter list matches nothing passes to the next;
    after the last, ``default`` (``MISSING``: required, an error). ``tensor_name`` is the output
    tensor's name for a shared parameter and the tensor's name *in that source* for a per-model
    one (a stacked layer's source index): mergekit matches filters against those.
    """
    for scope in scopes:
        if scope is not None and name in scope:
            value = resolve_parameter(scope[name], tensor_name, layer_index, layer_count, value_type=value_type)
            if value is not None:
                return value
    if default is MISSING:
        raise ValueError(f"missing required parameter {name} for {tensor_name}")
    return _coerce(default, value_type) if default is not None else None
