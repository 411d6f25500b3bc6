"""A generated data set whose images and captions really correspond.

Each concept (a made-up noun) has a prototype feature vector and each attribute (a colour word)
a shift. An image holds 2 to 5 objects, each a concept with an attribute, seen as 1 to 3 noisy
regions; the other regions are clutter from concepts the captions never name. Each caption
names 1 to 3 of the image's objects, sometimes with their attribute, among filler words. So a
model must find which regions a caption's words refer to: R@1 is far from trivial, yet a model
that aligns words with regions scores well. Everything is reproducible from ``seed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shan.data.format import DataError, DatasetCard
from shan.data.writer import DatasetWriter
from shan.progress import Progress
from shan.vocab import Vocabulary

ATTRIBUTES = ("red", "blue", "green", "yellow", "black", "white", "striped", "wooden")
SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ru",
    "te",
    "po",
    "san",
    "dor",
    "vel",
    "ni",
    "zu",
    "bek",
    "fa",
    "gim",
)
TEMPLATES = (
    "a {0} next to a {1} .",
    "there is a {0} and a {1} in this picture .",
    "a photo of a {0} with some {1} near the {2} .",
    "the {0} is beside a {1} .",
    "a {0} .",
    "an image showing a {0} , a {1} and a {2} .",
)


def concept_words(n: int, rng: np.random.Generator) -> list[str]:
    words: list[str] = []
    while len(words) < n:
        w = "".join(rng.choice(SYLLABLES, size=rng.integers(2, 4)))
        if w not in words:
            words.append(w)
    return words


class SyntheticWorld:
    """The concepts, attributes and their feature vectors, fixed by ``seed``."""

    def __init__(self, feature_dim: int, concepts: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.feature_dim = feature_dim
        self.nouns = concept_words(concepts, rng)
        self.prototypes = rng.normal(0, 1, (concepts, feature_dim)).astype(np.float32)
        self.shifts = rng.normal(0, 0.6, (len(ATTRIBUTES), feature_dim)).astype(np.float32)

    def vocabulary(self) -> Vocabulary:
        fillers = {w for t in TEMPLATES for w in t.split() if "{" not in w}
        return Vocabulary(sorted(fillers) + list(ATTRIBUTES) + self.nouns)

    def sample(
        self, seeds: list[list[int]], regions: int, captions: int
    ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """One image per seed -> features (n, regions, F), boxes (n, regions, 4), captions."""
        n = len(seeds)
        feats = np.empty((n, regions, self.feature_dim), dtype=np.float32)
        boxes = np.empty((n, regions, 4), dtype=np.float32)
        all_caps: list[list[str]] = []
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            feats[i] = rng.normal(0, 0.5, (regions, self.feature_dim))
            objs = rng.choice(len(self.nouns), size=rng.integers(2, 6), replace=False)
            attrs = rng.integers(0, len(ATTRIBUTES), size=len(objs))
            slots = rng.permutation(regions)
            r = 0
            for o, a in zip(objs, attrs):
                for _ in range(min(int(rng.integers(1, 4)), regions - r)):
                    feats[i, slots[r]] += self.prototypes[o] + self.shifts[a]
                    r += 1
            # clutter: regions of unnamed concepts
            for s in slots[r : r + regions // 4]:
                feats[i, s] += 0.7 * self.prototypes[rng.integers(len(self.nouns))]
            xy = rng.uniform(0, 400, (regions, 2))
            wh = rng.uniform(40, 240, (regions, 2))
            boxes[i] = np.concatenate([xy, xy + wh], axis=1)
            all_caps.append([self._caption(objs, attrs, rng) for _ in range(captions)])
        return feats, boxes, all_caps

    def _caption(self, objs: np.ndarray, attrs: np.ndarray, rng: np.random.Generator) -> str:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        slots = template.count("{")
        picks = rng.choice(len(objs), size=slots, replace=slots > len(objs))
        names = []
        for p in picks:
            noun = self.nouns[objs[p]]
            names.append(f"{ATTRIBUTES[attrs[p]]} {noun}" if rng.random() < 0.5 else noun)
        return template.format(*names)


MAX_CONCEPTS = 2000  # distinct made-up nouns the syllables give comfortably

# images per split of the demo data set (``shan data synthetic``'s defaults too); the train
# split is sized with the ``demo`` config so that the whole demo runs in minutes on 2 cores
DEMO_IMAGES = {"train": 4000, "dev": 500, "test": 1000}


def check_sizes(
    images: dict[str, int],
    *,
    regions: int,
    feature_dim: int,
    concepts: int,
    captions_per_image: int,
    seed: int,
) -> None:
    """DataError naming the first size out of range."""
    if not images or any(n < 0 for n in images.values()) or not any(images.values()):
        raise DataError(f"images per split must be >= 0 with at least one split > 0, got {images}")
    for name, value, low in (
        ("regions", regions, 1),
        ("feature_dim", feature_dim, 1),
        ("captions_per_image", captions_per_image, 1),
        ("seed", seed, 0),
    ):
        if value < low:
            raise DataError(f"{name} must be at least {low}, got {value}")
    if not 5 <= concepts <= MAX_CONCEPTS:
        raise DataError(f"concepts must lie in 5..{MAX_CONCEPTS}, got {concepts}")


def generate_synthetic(
    dest: str,
    *,
    images: dict[str, int] | None = None,
    regions: int = 16,
    feature_dim: int = 64,
    concepts: int = 120,
    captions_per_image: int = 5,
    seed: int = 0,
    chunk_rows: int = 500,
    rows_per_file: int = 1000,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> DatasetCard:
    """Write a synthetic data set with ``images`` per split (default :data:`DEMO_IMAGES`) to
    ``dest``."""
    images = dict(DEMO_IMAGES) if images is None else images
    check_sizes(
        images,
        regions=regions,
        feature_dim=feature_dim,
        concepts=concepts,
        captions_per_image=captions_per_image,
        seed=seed,
    )
    if chunk_rows < 1 or rows_per_file < 1:
        raise DataError(
            f"chunk_rows and rows_per_file must be >= 1, got {chunk_rows}, {rows_per_file}"
        )
    world = SyntheticWorld(feature_dim, concepts, seed)
    card = DatasetCard(
        name="synthetic",
        regions=regions,
        feature_dim=feature_dim,
        has_boxes=True,
        source=(
            f"shan.data.synthetic: seed {seed}, {concepts} concepts, {len(ATTRIBUTES)} "
            f"attributes, {captions_per_image} captions per image"
        ),
    )
    with DatasetWriter(dest, card, world.vocabulary(), overwrite=overwrite, log=log) as out:
        next_id = 0
        for s_idx, (split, n) in enumerate(images.items()):
            if n == 0:
                continue
            writer = out.split(split, rows_per_file=rows_per_file)
            with Progress(f"generate {split}", n, "images") as progress:
                for r0 in range(0, n, chunk_rows):
                    m = min(chunk_rows, n - r0)
                    seeds = [[seed, s_idx, r] for r in range(r0, r0 + m)]
                    feats, boxes, caps = world.sample(seeds, regions, captions_per_image)
                    ids = np.arange(next_id, next_id + m)
                    writer.write(ids, feats, caps, boxes=boxes)
                    next_id += m
                    progress.update(m)
                progress.summary = f"{n * captions_per_image} captions"
    return card


def demo_data_root() -> Path:
    """Where the demo data set lives: ``$SHAN_DEMO_DATA``, else ``datasets/demo`` under the
    working directory (the repository root in the README's Quickstart)."""
    given = os.environ.get("SHAN_DEMO_DATA")
    return Path(given).expanduser().absolute() if given else Path.cwd() / "datasets" / "demo"
