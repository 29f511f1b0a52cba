"""Do the ingredients share an initialization? Pairwise weight similarity, streamed.

Fine-tunes of one pretrained model stay close to it: their weight vectors have
cosine similarity near 1 and a small relative distance. Two independent
trainings of one architecture are nearly orthogonal (cosine near 0, relative
distance near sqrt(2)), and averaging them usually collapses: the neurons of
one are a permutation of the other's. Only matrices and kernels (tensors of
2 or more dimensions) are compared: biases and norm scales start at 0 and 1 in
every training, so they would make any two models look alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hub_soup.io.read import Checkpoint
from hub_soup.merging.plan import MergePlan, TensorPlan

# Below this cosine similarity two ingredients are reported as independent trainings.
SHARED_INIT_COSINE = 0.5


@dataclass
class Similarity:
    """Pairwise cosine similarity and relative distance of the ingredients' weights."""

    labels: list[str]
    cosine: list[list[float]]
    relative_distance: list[list[float]]  # ||a - b|| / mean(||a||, ||b||)

    def independent_pairs(self) -> list[tuple[int, int]]:
        """Pairs that look like separate trainings rather than fine-tunes of one model."""
        n = len(self.labels)
        return [(i, j) for i in range(n) for j in range(i + 1, n) if self.cosine[i][j] < SHARED_INIT_COSINE]

    def table(self) -> str:
        """A text table: cosine above the diagonal, relative distance below."""
        width = max(len(label) for label in self.labels)
        lines = ["weight similarity (cosine above the diagonal, relative distance below):"]
        header = " " * (width + 4) + "".join(f"{j:>9}" for j in range(len(self.labels)))
        lines.append(header)
        for i, label in enumerate(self.labels):
            cells = []
            for j in range(len(self.labels)):
                value = "-" if i == j else f"{(self.cosine if j > i else self.relative_distance)[i][j]:.4f}"
                cells.append(f"{value:>9}")
            lines.append(f"[{i}] {label:<{width}}" + "".join(cells))
        return "\n".join(lines)


class GramAccumulator:
    """The ingredients' Gram matrix (float64), fed block by block: the heart of :func:`weight_similarity`.

    A block is ingredients x elements, the same elements of one tensor in every
    ingredient. Only the first ``sample_per_tensor`` elements of each matrix count
    (all of them when ``None``): :meth:`sample_of` says how many, so the streamed
    merge can feed its own chunks here and the check costs no extra read.
    """

    def __init__(self, count: int, sample_per_tensor: int | None = None) -> None:
        self.gram = torch.zeros(count, count, dtype=torch.float64)
        self.sample_per_tensor = sample_per_tensor

    def sample_of(self, tensor: TensorPlan) -> int:
        """How many leading elements of ``tensor`` the check uses (0: not a matrix or kernel, not averaged,
        or not made of every ingredient's tensor in order, as a stacked layer is not)."""
        if not tensor.average or len(tensor.meta.shape) < 2:
            return 0
        if [i.ingredient for i in tensor.inputs] != list(range(self.gram.shape[0])):
            return 0
        return min(tensor.meta.numel, self.sample_per_tensor or tensor.meta.numel)

    def add(self, block: torch.Tensor) -> None:
        """Add a block of raw (unweighted) values, one row per ingredient."""
        rows = block.to(torch.float64)
        self.gram += rows @ rows.T

    def similarity(self, labels: Sequence[str]) -> Similarity:
        """Cosine similarity and relative distance of every pair, from the Gram matrix."""
        gram = self.gram.tolist()
        n = len(gram)
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
        cosine = [[0.0] * n for _ in range(n)]
        distance = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                denominator = norms[i] * norms[j]
                cosine[i][j] = gram[i][j] / denominator if denominator else 0.0
                squared = max(gram[i][i] + gram[j][j] - 2 * gram[i][j], 0.0)
                mean_norm = (norms[i] + norms[j]) / 2
                distance[i][j] = math.sqrt(squared) / mean_norm if mean_norm else 0.0
        return Similarity(list(labels), cosine, distance)


def weight_similarity(
    checkpoints: Sequence[Checkpoint],
    plan: MergePlan,
    sample_per_tensor: int | None = None,
    chunk_elements: int = 1 << 20,
) -> Similarity:
    """Pairwise similarity of the ingredients' weights, read chunk by chunk in a pass of its own.

    Args:
        sample_per_tensor: read only the first this many elements of each tensor;
            independent trainings sit near cosine 0 and fine-tunes near 1, which a
            sample shows as clearly as the whole. ``inspect`` reads everything; a
            streamed merge feeds the same check from its own reads instead.
    """
    gram = GramAccumulator(len(checkpoints), sample_per_tensor)
    rows = torch.empty(len(checkpoints), chunk_elements, dtype=torch.float64)
    buffer = torch.empty(chunk_elements * 8, dtype=torch.uint8)
    for tensor in plan.tensors:
        numel = gram.sample_of(tensor)
        for begin in range(0, numel, chunk_elements):
            count = min(chunk_elements, numel - begin)
            for i, (checkpoint, source) in enumerate(zip(checkpoints, tensor.inputs)):
                rows[i, :count].copy_(source.read_into(checkpoint, begin, count, tensor.row_numel, buffer))
            gram.add(rows[:, :count])
    return gram.similarity([c.label for c in checkpoints])
