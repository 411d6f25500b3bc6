"""The index card (``index.json``): what an index folder holds and what it was built from.

The card is written last, so a folder without it is incomplete. It names the model (its files'
sha256 digests, :func:`shan.fingerprint.file_digests`, and the reference it was given as), the
data (:func:`shan.fingerprint.data_fingerprint` and the split), the sizes (N images, first-stage
dimension D, k regions of d dimensions), the FAISS kind and parameters, the shards and every
file's size and sha256.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from shan.errors import JobError
from shan.fingerprint import digest

FORMAT = "shan-index/1"
CARD = "index.json"
VECTORS = "vectors.faiss"  # the FAISS index over the N first-stage image vectors
IMAGE_IDS = "image_ids.npy"  # (N,) int64


def fragments_file(shard: int) -> str:
    """The shard's region embeddings ``v``: (n, k, d) float32."""
    return f"fragments-{shard:05d}.npy"


def regions_file(shard: int) -> str:
    """The shard's region counts: (n,) int64."""
    return f"regions-{shard:05d}.npy"


def model_digest(model_files: dict[str, str]) -> str:
    """One digest of a checkpoint's files (name -> sha256)."""
    return digest(*(f"{name}\0{sha}" for name, sha in sorted(model_files.items())))


@dataclass
class Shard:
    """A run of ``images`` consecutive rows: its fragments and region counts files."""

    fragments: str
    regions: str
    images: int


@dataclass
class IndexCard:
    """What ``index.json`` holds."""

    model: str  # the model reference the index was built from, as given
    model_files: dict[str, str]  # checkpoint file name -> sha256
    data: str  # the data set, as given
    data_fingerprint: str
    split: str
    images: int  # N
    dim: int  # D: first-stage dimension
    regions: int  # k
    d: int  # region embedding dimension
    kind: str  # flat | ivf | hnsw
    params: dict[str, int] = field(default_factory=dict)  # ivf: nlist, nprobe; hnsw: M, ef...
    shard_size: int = 0
    shards: list[Shard] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256
    vectors: str = VECTORS  # the FAISS index file (under the write's prefix on s3://)
    image_ids: str = IMAGE_IDS
    created: str = ""
    created_by: str = ""
    format: str = FORMAT

    @property
    def model_digest(self) -> str:
        return model_digest(self.model_files)

    @property
    def digest(self) -> str:
        """The index's identity: a digest of its files' checksums and its key."""
        parts = [f"{f}\0{s}" for f, s in sorted(self.checksums.items())]
        return digest(self.format, self.model_digest, self.data_fingerprint, self.split, *parts)

    def files(self) -> list[str]:
        """Every file of the index but the card, relative to its root."""
        return sorted(self.sizes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> IndexCard:
        """The card in ``text``; JobError naming ``source`` when it is not one of ours."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise JobError(f"{source} is not an index card (not JSON: {e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise JobError(f"{source} is not a {FORMAT} index card (format {got!r})")
        try:
            shards = [Shard(**s) for s in data.pop("shards")]
            card = cls(**data, shards=shards)
        except (TypeError, KeyError) as e:
            raise JobError(f"{source}: a damaged index card ({e})") from None
        if sum(s.images for s in card.shards) != card.images:
            raise JobError(f"{source}: a damaged index card (shards do not add up to images)")
        return card


__all__ = [
    "CARD",
    "FORMAT",
    "IMAGE_IDS",
    "VECTORS",
    "IndexCard",
    "Shard",
    "fragments_file",
    "model_digest",
    "regions_file",
]
