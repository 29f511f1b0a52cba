"""A script for ``accelerate launch`` (tests/test_accelerate.py): a soup scored by a task whose forward
pass fails on rank 1 only, while rank 0 waits for rank 1's outputs at the gather.

It is a plugin task as a user registers one (README, "Validating a soup"), run through the Python API:
``python one_rank_fails.py OUTPUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

import hub_soup
from hub_soup.errors import EvalError
from hub_soup.eval.data import Inputs
from hub_soup.eval.tasks import register_task
from hub_soup.eval.tasks.image_classification import ImageClassification
from hub_soup.recipe import Recipe

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


@register_task
class FailsOnRank1(ImageClassification):
    name = "fails-on-rank-1"

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        if PartialState().process_index == 1:
            raise EvalError("rank 1 cannot score its share")
        return super().forward(model, inputs)


recipe = Recipe.model_validate({
    "ingredients": [{"ref": str(p)} for p in sorted((DIGITS / "ingredients").iterdir())[:2]],
    "eval": {"task": "fails-on-rank-1", "data": str(DIGITS / "data"), "split": "val", "limit": 64, "batch_size": 16},
    "output": {"path": sys.argv[1]},
})
hub_soup.run(recipe)
