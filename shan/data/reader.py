"""Reading a split: whole (pyarrow, for validation and evaluation) or streamed (Ray Data, for
training), and the per-worker pipeline from image rows to padded training batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shan.data import fs
from shan.data.format import (
    DataError,
    DatasetCard,
    check_num_regions,
    image_uri,
    load_card,
    split_files,
)
from shan.vocab import MAX_WORDS

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a split needs none
    import ray.data
    import torch

TRAIN_COLUMNS = ["image_id", "features", "num_regions", "tokens"]


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file; a truncated or foreign file is a DataError naming it."""
    filesystem, p = fs.filesystem(path)
    try:
        return pq.read_table(p, filesystem=filesystem, columns=columns)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (listed in the dataset card)") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file of this format ({e})") from e


@dataclass
class SplitArrays:
    """A whole split in memory: rows are images, ``caption_image`` maps captions to rows."""

    image_ids: np.ndarray  # (N,) int64
    features: np.ndarray  # (N, R, F) stored dtype
    num_regions: np.ndarray  # (N,) int32
    tokens: list[list[int]]  # per caption, in row order
    captions: list[str]  # per caption
    caption_image: np.ndarray  # (C,) row of each caption's image
    boxes: np.ndarray | None = None  # (N, R, 4)
    image_uris: list[str] | None = None  # (N,) where each image is, when the set records it
    image_sizes: np.ndarray | None = None  # (N, 2) width, height

    def head(self, n_images: int) -> SplitArrays:
        """The first ``n_images`` images and their captions."""
        keep = self.caption_image < n_images
        idx = np.flatnonzero(keep)
        return SplitArrays(
            self.image_ids[:n_images],
            self.features[:n_images],
            self.num_regions[:n_images],
            [self.tokens[i] for i in idx],
            [self.captions[i] for i in idx],
            self.caption_image[idx],
            None if self.boxes is None else self.boxes[:n_images],
            None if self.image_uris is None else self.image_uris[:n_images],
            None if self.image_sizes is None else self.image_sizes[:n_images],
        )


def cap_tokens(tokens: list[int], max_words: int | None) -> list[int]:
    """A caption's token ids with at most ``max_words`` words (None: the format's
    :data:`~shan.vocab.MAX_WORDS`): the first words, then its last id (``<end>``)."""
    n = (max_words or MAX_WORDS) + 2
    return tokens if len(tokens) <= n else [*tokens[: n - 1], tokens[-1]]


def checked_table(path: str, card: DatasetCard, columns: list[str] | None = None) -> pa.Table:
    """One file of a split (:func:`read_table`), its ``num_regions`` checked against the card's
    regions: a DataError naming the file, row and value."""
    table = read_table(path, columns)
    if "num_regions" not in table.column_names:
        raise DataError(f"{path}: missing column 'num_regions'")
    check_num_regions(path, 0, table.column("num_regions").to_numpy(), card.regions)
    return table


def check_split(root: str, split: str, card: DatasetCard | None = None) -> list[str]:
    """The files of ``split``, each one's ``num_regions`` checked (only that column is read)."""
    card = card or load_card(root)
    files = split_files(root, card, split)
    for f in files:
        checked_table(f, card, ["num_regions"])
    return files


def read_split(
    root: str, split: str, card: DatasetCard | None = None, max_words: int | None = None
) -> SplitArrays:
    """Read every file of ``split`` with pyarrow (no Ray needed); ``num_regions`` checked, each
    caption cut to ``max_words`` words (:func:`cap_tokens`)."""
    card = card or load_card(root)
    tables = [checked_table(f, card) for f in split_files(root, card, split)]
    table = pa.concat_tables(tables)
    if "features" not in table.column_names:
        raise DataError(f"{root}/{split}: missing column 'features'")
    feats = table.column("features").combine_chunks().to_numpy_ndarray()
    caps = table.column("captions").to_pylist()
    toks = table.column("tokens").to_pylist()
    counts = np.array([len(c) for c in caps])
    boxes = None
    if "boxes" in table.column_names:
        boxes = table.column("boxes").combine_chunks().to_numpy_ndarray()
    uris = sizes = None
    if card.has_images and "image_file" in table.column_names:
        uris = [image_uri(card, f) for f in table.column("image_file").to_pylist()]
        sizes = np.stack(
            [table.column(c).to_numpy() for c in ("image_width", "image_height")], axis=1
        )
    return SplitArrays(
        image_ids=table.column("image_id").to_numpy(),
        features=feats,
        num_regions=table.column("num_regions").to_numpy(),
        tokens=[cap_tokens(t, max_words) for ts in toks for t in ts],
        captions=[c for cs in caps for c in cs],
        caption_image=np.repeat(np.arange(len(caps)), counts),
        boxes=boxes,
        image_uris=uris,
        image_sizes=sizes,
    )


def open_split(root: str, split: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """``split`` as a Ray Data dataset (local or ``s3://``), one row per image, its
    ``num_regions`` checked first (:func:`check_split`); Ray Data's progress set for a job's
    log (:func:`shan.progress.quiet_ray_data`)."""
    import ray.data

    from shan.progress import quiet_ray_data

    files = check_split(root, split)
    filesystem, _ = fs.filesystem(files[0])
    paths = [fs.filesystem(f)[1] for f in files]
    quiet_ray_data()  # before the dataset takes its copy of the context
    return ray.data.read_parquet(paths, filesystem=filesystem, columns=columns or TRAIN_COLUMNS)


# -- batches --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """A training batch of B (image, caption) examples.

    features (B, R, F) float16 or float32, num_regions (B,), tokens (B, n) int64 padded with 0,
    lengths (B,), image_ids (B,).
    """

    features: torch.Tensor
    num_regions: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    image_ids: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        """The batch on ``device``, features as ``dtype`` (default float32)."""
        import torch

        dtype = dtype or torch.float32
        nb = device.type == "cuda"
        return Batch(
            self.features.to(device, non_blocking=nb).to(dtype),
            self.num_regions.to(device, non_blocking=nb),
            self.tokens.to(device, non_blocking=nb),
            self.lengths.to(device, non_blocking=nb),
            self.image_ids.to(device, non_blocking=nb),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pad_tokens(
    seqs: Iterable[Iterable[int]], max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ((B, n) int64 padded with 0, (B,) lengths).

    A list longer than ``max_len`` keeps its first ``max_len - 1`` ids and its last (``<end>``).
    """
    arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
    if max_len is not None:
        arrays = [s if len(s) <= max_len else np.append(s[: max_len - 1], s[-1]) for s in arrays]
    lengths = np.array([len(s) for s in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), int(lengths.max())), dtype=np.int64)
    for i, s in enumerate(arrays):
        out[i, : len(s)] = s
    import torch

    return torch.from_numpy(out), torch.from_numpy(lengths)


class ExampleStream:
    """Image rows in, shuffled training batches out: one example per caption.

    Each image's features are decoded once and shared by its captions' examples; examples wait
    in a shuffle buffer of ``buffer`` examples from which batches are drawn at random.
    """

    def __init__(
        self,
        batch_size: int,
        buffer: int = 2048,
        max_words: int | None = None,
        seed: int | Sequence[int] = 0,
        drop_last: bool = True,
    ) -> None:
        self.batch_size, self.buffer, self.max_words = batch_size, buffer, max_words
        self.rng = np.random.default_rng(seed)
        self.drop_last = drop_last

    def __call__(self, image_batches: Iterable[dict[str, Any]]) -> Iterator[Batch]:
        pool: list[tuple[Any, ...]] = []  # (features view, num_regions, tokens, image_id)
        for rows in image_batches:
            feats, counts, ids = rows["features"], rows["num_regions"], rows["image_id"]
            for r, toks in enumerate(rows["tokens"]):
                for t in toks:
                    pool.append((feats[r], counts[r], cap_tokens(t, self.max_words), ids[r]))
            while len(pool) >= self.buffer + self.batch_size:
                yield self._draw(pool)
        while len(pool) >= self.batch_size or (pool and not self.drop_last):
            yield self._draw(pool)

    def _draw(self, pool: list[tuple[Any, ...]]) -> Batch:
        take = min(self.batch_size, len(pool))
        picks = []
        for _ in range(take):  # swap-remove a random example
            j = int(self.rng.integers(len(pool)))
            pool[j], pool[-1] = pool[-1], pool[j]
            picks.append(pool.pop())
        import torch

        feats = torch.from_numpy(np.stack([p[0] for p in picks]))  # (B, R, F)
        tokens, lengths = pad_tokens(p[2] for p in picks)  # cut as they entered the pool
        return Batch(
            features=feats,
            num_regions=torch.tensor([int(p[1]) for p in picks]),
            tokens=tokens,
            lengths=lengths,
            image_ids=torch.tensor([int(p[3]) for p in picks]),
        )
