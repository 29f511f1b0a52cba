"""PEFT LoRA adapter soups: fine-tunes of one base, averaged exactly.

An adapter holds factors ``A`` and ``B`` whose product, scaled by ``lora_alpha / r``,
is the fine-tune's change of a base weight. Averaging ``A`` and ``B`` separately
is wrong (the mean of products is not the product of means), so an adapter soup
is made of the deltas themselves: ``base + sum_i w_i dW_i``. It is written either
as an adapter in concatenated-rank form (exact; optionally reduced by a truncated
SVD) or merged into the full base model.

- :mod:`hub_soup.adapters.config`: which ingredients are adapters, their
  ``adapter_config.json``, the checks that they can share one soup (read before
  any weights), and the base they name.
- :mod:`hub_soup.adapters.lora`: the tensors: module keys, scalings, the exact
  concatenation, the SVD reduction, and the merge method that adds a delta to a
  base tensor inside the streamed engine.
- :mod:`hub_soup.adapters.applied`: one adapter applied to one model before a
  merge (mergekit's ``model+lora``), read as a checkpoint, chunk by chunk.
"""
