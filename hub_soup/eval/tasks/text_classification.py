"""Task ``text-classification``: transformers sequence classifiers, with the ingredient's own tokenizer.

Like every task module, this one imports no torch at the top (:mod:`hub_soup.eval.tasks`).
"""

from __future__ import annotations

import logging

from hub_soup.eval.spec import LabelColumn, TextColumn
from hub_soup.eval.tasks import Batch
from hub_soup.eval.tasks.classification import Classification

logger = logging.getLogger(__name__)


class TextClassificationSpec(LabelColumn, TextColumn):
    """``task: text-classification``: a dataset's text and label columns."""


class TextClassification(Classification):
    """transformers ``AutoModelForSequenceClassification`` models; accuracy."""

    name = "text-classification"
    Spec = TextClassificationSpec
    spec: TextClassificationSpec
    opens_data = True
    auto_class = "AutoModelForSequenceClassification"

    def batches(self) -> list[Batch]:
        """Tokenize every text once with the ingredient's own tokenizer, padded per batch."""
        import torch

        from hub_soup.eval.data import text_rows, tokenized

        tokenizer = self.architecture.tokenizer(self.name)
        table = text_rows(self.spec, self.split, (self.spec.text_column, self.spec.label_column))
        texts = [str(t) for t in table[self.spec.text_column]]
        labels = [self.class_index(v) for v in table[self.spec.label_column]]
        self.check_labels(labels)
        size = self.spec.batch_size
        encoded = tokenized(
            tokenizer, texts, batch_size=size, max_positions=self.architecture.max_positions(), language_model=False
        )
        logger.info("eval data: %d texts from %s (%s)", len(texts), self.spec.data, self.split)
        return [
            Batch(
                {k: v.to(self.device) for k, v in inputs.items()},
                torch.tensor(labels[n * size : (n + 1) * size], device=self.device),
            )
            for n, inputs in enumerate(encoded)
        ]

