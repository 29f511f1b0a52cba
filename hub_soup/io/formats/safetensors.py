"""safetensors: one file, or shards behind ``model.safetensors.index.json``; the preferred format.

The header is validated and the tensors streamed chunk by chunk
(:mod:`hub_soup.io.safetensors_io`); nothing in the file can run code, and the
header can be read over HTTP, so a Hub ingredient's layout is known before its
weights are downloaded.
"""

from __future__ import annotations

from pathlib import Path

from hub_soup.errors import CheckpointFormatError
from hub_soup.io.formats import CheckpointFormat, OpenOptions, TensorFile
from hub_soup.io.safetensors_io import DTYPES, SafetensorsReader, TensorMeta


class Safetensors(CheckpointFormat):
    """A safetensors file: an 8-byte header length, then the header's JSON object."""

    name = "safetensors"
    description = "safetensors"
    suffixes = (".safetensors",)
    single_name = "model.safetensors"
    index_name = "model.safetensors.index.json"
    shard_pattern = "model-*-of-*.safetensors"
    preference = 10

    def sniff(self, head: bytes) -> bool:
        return len(head) > 8 and head[8:9] == b"{"

    def open(self, path: Path, label: str, options: OpenOptions) -> TensorFile:
        reader = SafetensorsReader(path)
        return TensorFile(self.name, dict(reader.header.tensors), reader)

    def remote_metas(
        self, repo_id: str, sha: str, weights: list[str], label: str, token: str | bool | None
    ) -> dict[str, TensorMeta] | None:
        """The headers over HTTP (the whole repo's for the standard names, else the one file's); None when
        a tensor has a dtype hub-soup does not know (the local reader then gives the verdict)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

        api = HfApi()
        try:
            if weights[0] in (self.single_name, self.index_name):
                repo = api.get_safetensors_metadata(repo_id, revision=sha, token=token)
                infos = {n: info for meta in repo.files_metadata.values() for n, info in meta.tensors.items()}
            else:
                infos = dict(api.parse_safetensors_file_metadata(repo_id, weights[0], revision=sha, token=token).tensors)
        except (NotASafetensorsRepoError, SafetensorsParsingError) as exc:
            raise CheckpointFormatError(f"{label}: unreadable safetensors header ({exc})") from None
        if any(info.dtype not in DTYPES for info in infos.values()):
            return None
        return {name: TensorMeta(DTYPES[info.dtype], tuple(info.shape)) for name, info in infos.items()}
