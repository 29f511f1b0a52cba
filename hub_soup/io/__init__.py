"""Bytes in and out: checkpoint formats, safetensors, direct reads, checkpoint reading, soup writing, sizes.

Nothing here knows what a model is: these modules read tensors from every format
people save and write safetensors shards, so the stages above them work on names,
dtypes and shapes only.
"""
