"""From raw images and captions to the project's Parquet data set (``shan data images``): a job
above both ``shan.data`` (the format it writes) and ``shan.features`` (the extractors).

Everything a user can get wrong in the inputs is checked before any image is decoded: the
options, the destination (``DatasetWriter``), the caption file, and that every image a caption
names exists. Then Ray Data reads and decodes the images and an actor pool computes their
regions (``shan.features.pipeline``); rows are written in caption-file order.

An image that fails to decode, is empty or is smaller than ``min_side`` stops the job with one
error naming it (``on_bad_image="stop"``), or is left out with its captions and listed in the
data set's ``bad_images.json`` (``"skip"``); never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shan.data import destination, fs
from shan.data.captions import ImageCaptions, read_captions
from shan.data.format import DataError, DatasetCard
from shan.data.writer import DatasetWriter, SplitWriter
from shan.features import ExtractorSpec
from shan.features.pipeline import plan_resources, run_local, run_ray
from shan.progress import Progress
from shan.runtime import init_ray
from shan.vocab import Vocabulary

BAD_IMAGES = "bad_images.json"
ON_BAD = ("stop", "skip")


def image_root(images: str) -> str:
    """The images' folder as the card records it: absolute locally, the URL on S3."""
    if fs.is_remote(images):
        return images.rstrip("/")
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"images folder {images} does not exist")
    return str(root.resolve())


def check_present(root: str, splits: dict[str, dict[str, ImageCaptions]]) -> None:
    """A DataError naming the first caption whose image is not under ``root``."""
    present = set(fs.list_files(root))
    for entries in splits.values():
        for name, entry in entries.items():
            if name not in present:
                raise DataError(f"{entry.where}: image {name!r} is not in {root}")


def build_vocab(
    splits: dict[str, dict[str, ImageCaptions]], vocab_path: str | None, min_count: int
) -> tuple[Vocabulary, str]:
    if vocab_path is not None:
        return Vocabulary.load(vocab_path), str(vocab_path)
    base = "train" if "train" in splits else next(iter(splits))
    caps = [c for e in splits[base].values() for c in e.captions]
    return Vocabulary.build(
        caps, min_count
    ), f"built from the {base} captions (min count {min_count})"


def convert_images(
    images: str,
    captions: str,
    dest: str,
    *,
    spec: ExtractorSpec | None = None,
    image_list: str | None = None,
    split: str | None = None,
    vocab_path: str | None = None,
    min_count: int = 4,
    name: str | None = None,
    dtype: str = "float16",
    on_bad_image: str = "stop",
    min_side: int = 32,
    batch_size: int = 16,
    rows_per_file: int = 2000,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float | None = None,
    local: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> DatasetCard:
    """Extract the regions of every captioned image under ``images`` into a data set at
    ``dest``. ``local``: decode and extract in this process, without Ray."""
    spec = spec or ExtractorSpec()
    spec.check()
    if on_bad_image not in ON_BAD:
        raise DataError(f"--on-bad-image {on_bad_image!r} is not one of {', '.join(ON_BAD)}")
    root = image_root(images)
    if not fs.is_remote(root):
        destination.check_apart(root, dest)
    splits = read_captions(captions, split, image_list)
    check_present(root, splits)
    vocab, vocab_source = build_vocab(splits, vocab_path, min_count)
    card = DatasetCard(
        name=name or Path(root.rstrip("/")).name,
        regions=spec.num_regions,
        feature_dim=2048,
        dtype=dtype,
        has_boxes=True,
        variable_regions=spec.name == "detector",
        has_images=True,
        image_root=root,
        source=(
            f"extracted from images at {root} with --extractor {spec.name} (weights "
            f"{spec.weights}); captions {Path(captions).name}; vocabulary {vocab_source}"
        ),
    )
    files = list(dict.fromkeys(f for entries in splits.values() for f in entries))
    items = [{"index": i, "uri": fs.join(root, f)} for i, f in enumerate(files)]
    with DatasetWriter(dest, card, vocab, overwrite=overwrite, log=log) as out:
        writers = {s: out.split(s, rows_per_file=rows_per_file) for s in splits}
        ids = {s: {f: i for i, f in enumerate(entries)} for s, entries in splits.items()}
        batches = _batches(
            items,
            spec,
            batch_size=batch_size,
            min_side=min_side,
            local=local,
            actors=actors,
            cpus=cpus_per_actor,
            gpus=gpus_per_actor,
            log=log,
        )
        bad = _write_all(
            batches, files, splits, ids, writers, on_bad=on_bad_image, total=len(items)
        )
        if bad:
            out.add_report(BAD_IMAGES, json.dumps({"bad_images": bad}, indent=2).encode())
            log(f"left out {len(bad)} bad image(s) and their captions: listed in {BAD_IMAGES}")
    return card


def _batches(
    items: list[dict[str, Any]],
    spec: ExtractorSpec,
    *,
    batch_size: int,
    min_side: int,
    local: bool,
    actors: int | None,
    cpus: float | None,
    gpus: float | None,
    log: Callable[[str], None],
) -> Iterator[dict[str, Any]]:
    if local:
        log(f"extracting {len(items)} images in this process ({spec.name})")
        return run_local(items, spec, batch_size, min_side)
    ray = init_ray(log)
    res = plan_resources(ray.cluster_resources(), actors, cpus, gpus)
    log(f"extracting {len(items)} images ({spec.name}) on {res.describe('actor')}")
    return run_ray(items, spec, res, batch_size, min_side)


def _write_all(
    batches: Iterable[dict[str, Any]],
    files: list[str],
    splits: dict[str, dict[str, ImageCaptions]],
    ids: dict[str, dict[str, int]],
    writers: dict[str, SplitWriter],
    *,
    on_bad: str,
    total: int,
) -> list[dict[str, Any]]:
    """Write each extracted image to every split that captions it; the bad ones listed."""
    where = {f: [s for s, entries in splits.items() if f in entries] for f in files}
    bad: list[dict[str, Any]] = []
    with Progress("extract images", total, "images") as progress:
        for batch in batches:
            _write_batch(
                batch, files, splits, ids=ids, writers=writers, where=where, bad=bad, on_bad=on_bad
            )
            progress.update(len(batch["index"]))
    return bad


def _write_batch(
    batch: dict[str, Any],
    files: list[str],
    splits: dict[str, dict[str, ImageCaptions]],
    *,
    ids: dict[str, dict[str, int]],
    writers: dict[str, SplitWriter],
    where: dict[str, list[str]],
    bad: list[dict[str, Any]],
    on_bad: str,
) -> None:
    """One extracted batch to its splits; its bad images appended to ``bad``."""
    rows: dict[str, list[int]] = {s: [] for s in splits}
    for r, (index, error) in enumerate(zip(batch["index"], batch["error"])):
        f = files[int(index)]
        if error:
            if on_bad == "stop":
                raise DataError(
                    f"image {batch['uri'][r]}: {error} (--on-bad-image skip leaves it out "
                    f"and lists it in {BAD_IMAGES})"
                )
            captions = sum(len(splits[s][f].captions) for s in where[f])
            bad.append({"image": f, "error": str(error), "captions_left_out": captions})
            continue
        for s in where[f]:
            rows[s].append(r)
    for s, rs in rows.items():
        if rs:
            names = [files[int(batch["index"][r])] for r in rs]
            _write_rows(writers[s], batch, rs, names, entries=splits[s], ids=ids[s])


def _write_rows(
    writer: SplitWriter,
    batch: dict[str, Any],
    rs: list[int],
    names: list[str],
    *,
    entries: dict[str, ImageCaptions],
    ids: dict[str, int],
) -> None:
    take = np.asarray(rs)
    writer.write(
        np.array([ids[f] for f in names], dtype=np.int64),
        batch["features"][take],
        [entries[f].captions for f in names],
        num_regions=batch["num_regions"][take],
        boxes=batch["boxes"][take],
        image_files=names,
        image_sizes=batch["size"][take],
    )
