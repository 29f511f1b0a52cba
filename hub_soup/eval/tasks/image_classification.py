"""Task ``image-classification``: timm classifiers on an image folder or a ``datasets`` dataset.

Images are preprocessed with the model's own pretrained config
(``resolve_data_config`` + ``create_transform``), as timm's own evaluation does,
and scored by top-1 accuracy (and log loss). Like every task module, this one
imports no torch at the top (:mod:`hub_soup.eval.tasks`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from hub_soup.errors import EvalError
from hub_soup.eval.spec import ImageColumn, LabelColumn
from hub_soup.eval.tasks import Batch
from hub_soup.eval.tasks.classification import Classification

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class ImageClassificationSpec(LabelColumn, ImageColumn):
    """``task: image-classification``: an image folder, or a dataset's image and label columns."""


class ImageClassification(Classification):
    """timm image classifiers; top-1 accuracy."""

    name = "image-classification"
    Spec = ImageClassificationSpec
    spec: ImageClassificationSpec
    opens_data = True

    def batches(self) -> list[Batch]:
        """Decode and transform every image once, with the transform from the model's own config."""
        if self.architecture.family != "timm":
            raise EvalError(
                "task image-classification supports timm models; this is a transformers model",
                hint="use task custom with a function that runs your image processor",
            )
        import torch
        from timm.data import ImageDataset, create_transform, resolve_data_config

        from hub_soup.eval.data import checked_columns, decoded_images, example_order, open_split

        data_config = resolve_data_config(model=self.model())
        transform = create_transform(**data_config)
        mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        source = open_split(self.spec, self.split, image_folders=True)
        samples: Iterable[tuple[torch.Tensor, int]]
        if isinstance(source, Path):
            dataset = ImageDataset(
                str(source), input_img_mode=mode, transform=transform, class_map=self._class_map(source)
            )
            if len(dataset) == 0:
                raise EvalError(f"{source}: no images found in class folders", hint="lay out images as <class>/<image>")
            indices = example_order(len(dataset), self.spec.limit)
            samples = (dataset[i] for i in indices)
        else:
            table = checked_columns(source, (self.spec.image_column, self.spec.label_column), self.spec, self.split)
            indices = example_order(len(table), self.spec.limit)
            table = decoded_images(table.select(indices), self.spec.image_column)
            samples = (
                (transform(row[self.spec.image_column].convert(mode)), self.class_index(row[self.spec.label_column]))
                for row in table
            )
        pairs = list(samples)
        if not pairs:
            raise EvalError(f"{self.spec.data} ({self.split}) has no examples to score")
        images, labels = zip(*pairs)
        self.check_labels(labels)
        size = self.spec.batch_size
        batches = [
            Batch(
                torch.stack(images[start : start + size]).to(self.device),
                torch.tensor(labels[start : start + size], device=self.device),
            )
            for start in range(0, len(images), size)
        ]
        logger.info(
            "eval data: %d images from %s (%s), input %s", len(images), self.spec.data, self.split,
            data_config["input_size"],
        )
        return batches

    def _class_map(self, folder: Path) -> dict[str, int] | None:
        """Folder name -> class index from the model's ``label_names`` when they name every folder;
        otherwise ``None``: timm's convention (class folders in natural sort order)."""
        config = self.architecture.config
        names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
        folders = {p.name for p in folder.iterdir() if p.is_dir()}
        if names and folders <= set(names):
            return {name: i for i, name in enumerate(names)}
        return None
