"""Task ``causal-lm``: the perplexity of a text column under a transformers language model.

Like every task module, this one imports no torch at the top (:mod:`hub_soup.eval.tasks`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hub_soup.errors import EvalError
from hub_soup.eval.metrics import PERPLEXITY
from hub_soup.eval.spec import TextColumn
from hub_soup.eval.tasks import Batch, EvalTask

if TYPE_CHECKING:
    import torch
    from torch import nn

    from hub_soup.eval.data import Inputs

logger = logging.getLogger(__name__)


class CausalLM(EvalTask):
    """transformers ``AutoModelForCausalLM`` models; perplexity over every token after each text's first.

    Outputs are each target token's probability (float64, padding dropped, flattened):
    averaging probabilities over models is the ensemble, averaging logits is not.
    """

    name = "causal-lm"
    Spec = TextColumn  # a dataset's text column
    spec: TextColumn
    primary = PERPLEXITY
    opens_data = True
    auto_class = "AutoModelForCausalLM"

    def batches(self) -> list[Batch]:
        """Tokenize every text once with the ingredient's own tokenizer, padded per batch."""
        from hub_soup.eval.data import text_rows, tokenized

        tokenizer = self.architecture.tokenizer(self.name)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise EvalError(
                    f"{self.architecture.label}: the tokenizer has neither a pad nor an eos token to pad batches with"
                )
            tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked out of the loss
        table = text_rows(self.spec, self.split, (self.spec.text_column,))
        texts = [str(t) for t in table[self.spec.text_column]]
        encoded = tokenized(
            tokenizer, texts, batch_size=self.spec.batch_size, max_positions=self.architecture.max_positions(),
            language_model=True,
        )
        if sum(int(inputs["attention_mask"][:, 1:].sum()) for inputs in encoded) == 0:
            raise EvalError(f"{self.spec.data} ({self.split}): no text has two tokens or more; perplexity is undefined")
        logger.info("eval data: %d texts from %s (%s)", len(texts), self.spec.data, self.split)
        return [Batch({k: v.to(self.device) for k, v in inputs.items()}) for inputs in encoded]

    def forward(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """Each next token's probability under the model, for positions that are not padding."""
        from hub_soup.eval.models import logits

        assert isinstance(inputs, dict)
        scores = logits(model, inputs)[:, :-1].float()
        targets = inputs["input_ids"][:, 1:]
        log_probs = scores.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return log_probs.double().exp()[inputs["attention_mask"][:, 1:].bool()]

    def measure(self, outputs: torch.Tensor, targets: torch.Tensor | None) -> Mapping[str, float]:
        return {PERPLEXITY.name: math.exp(-outputs.log().mean().item())}
