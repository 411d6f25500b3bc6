"""The evaluation job's checks before any actor starts (``shan.eval.job``): the options' ranges
and what the tile fingerprint covers (the data: card and content; the model's files; the
options; device kind and precision)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from shan.errors import ConfigError, problems
from shan.eval.job import EvalOptions, tile_fingerprint
from shan.fingerprint import data_fingerprint


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tile_images=-1), "tile_images"),
        (dict(tile_captions=0), "tile_captions"),
        (dict(fold_size=0), "fold_size"),
        (dict(actors=0), "actors"),
        (dict(block=0), "block"),
        (dict(cpus_per_actor=0.0), "cpus_per_actor"),
        (dict(cpus_per_actor=float("nan")), "cpus_per_actor"),
        (dict(gpus_per_actor=1.5), "gpus_per_actor"),
        (dict(gpus_per_actor=-1.0), "gpus_per_actor"),
        (dict(protocol="coco-2k"), "unknown protocol"),
        (dict(wait_timeout_s=0.0), "wait_timeout_s"),
        (dict(log_matrices_mb=-1.0), "log_matrices_mb"),
    ],
)
def test_library_options_are_range_checked(change, message):
    with pytest.raises(ConfigError, match=message):
        EvalOptions(**change).check()


def test_every_bad_option_is_one_problem_at_once():
    opts = EvalOptions(protocol="coco-2k", tile_images=0, actors=0, gpus_per_actor=1.5)
    with pytest.raises(ConfigError) as e:
        opts.check()
    lines = problems(e.value)
    assert len(lines) == 4, lines
    assert lines[0].startswith("unknown protocol 'coco-2k'; choose one of plain, f30k")
    assert lines[1] == "tile_images must be an integer >= 1, got 0"
    assert lines[2].startswith("actors must be an integer >= 1") and "got 0" in lines[2]
    assert lines[3] == "gpus_per_actor must be >= 0, and whole above 1, got 1.5"


def test_edge_options_are_accepted():
    for change in (dict(gpus_per_actor=0.0), dict(gpus_per_actor=2.0), dict(tile_images=1),
                   dict(actors=1, cpus_per_actor=0.01), dict(protocol="coco-5k")):  # fmt: skip
        EvalOptions(**change).check()


class _Split:
    def __init__(self, seed: int = 0, n: int = 3):
        rng = np.random.default_rng(seed)
        self.image_ids = np.arange(n, dtype=np.int64)
        self.features = rng.normal(size=(n, 4, 5)).astype(np.float16)
        self.num_regions = np.full(n, 4, dtype=np.int32)
        self.caption_image = np.repeat(np.arange(n), 2)
        self.tokens = [[1, 5 + i, 2] for i in range(2 * n)]
        self.captions = ["c"] * (2 * n)


def test_the_data_fingerprint_covers_the_card_and_the_content():
    card = b'{"name": "x", "created": "2026-01-01T00:00:00Z"}'
    base = data_fingerprint(card, _Split())
    assert data_fingerprint(card, _Split()) == base
    assert data_fingerprint(card.replace(b"01T", b"02T"), _Split()) != base
    assert data_fingerprint(card, _Split(seed=1)) != base
    tokens = _Split()
    tokens.tokens[0] = [1, 9, 2]
    assert data_fingerprint(card, tokens) != base
    regions = _Split()
    regions.num_regions[1] = 3
    assert data_fingerprint(card, regions) != base


def test_the_tile_fingerprint_covers_model_precision_device_and_sizes():
    files = {"model.pt": b"weights", "config.yaml": b"cfg", "vocab.json": b"vocab"}
    s = _Split()

    def fp(data="data", files=files, device=("cpu", "float32"), **change):
        job = SimpleNamespace(opts=replace(EvalOptions(), **change), split=s)  # what it reads
        return tile_fingerprint(data, files, job, device)

    base = fp()
    assert fp(files=dict(files)) == base
    changed = [
        fp("data2"),
        fp(files={**files, "model.pt": b"weights2"}),
        fp(files={**files, "config.yaml": b"cfg2"}),
        fp(files={**files, "vocab.json": b"vocab2"}),
        fp(device=("cuda:NVIDIA H100", "float32")),
        fp(device=("cuda:NVIDIA H100", "bf16")),
        fp(split="dev"),
        fp(protocol="f30k"),
        fp(tile_images=7),
        fp(tile_captions=7),
        fp(block=8),
    ]
    assert len({base, *changed}) == len(changed) + 1
    # what the tiles do not depend on: how many actors score them, where, the MLflow options
    assert fp(actors=3, cpus_per_actor=0.5, experiment="x", log_matrices_mb=1.0) == base
