"""``shan search --index DEST --rerank K`` through the real command line: with K the whole split,
the rerank gives exactly the exhaustive ranking (the same images in the same order, the same
four scores within 1e-5), with and without ``--data``; with a small K each query's matches are
the best of its K first-stage candidates. The model is an untrained tiny checkpoint with a
first-stage head, the index built in this process with the index library (shards of 4 images)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shan.metrics import SCORES
from tests.cli import run_main
from tests.helpers import untrained_on_synthetic
from tests.rerank_helpers import build_index, save_untrained_first_stage

IMAGES = 14  # test images: four shards of the index (4, 4, 4, 2)
SENTENCES = ["a red thing", "a blue dog on the grass", "two green balls"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from shan.data.format import load_vocab

    tmp = tmp_path_factory.mktemp("search-index")
    base = untrained_on_synthetic(tmp, IMAGES)
    ckpt = save_untrained_first_stage(tmp / "fs", load_vocab(str(base["data"])), seed=3)
    card = build_index(ckpt, base["data"], tmp / "index")
    assert len(card.shards) == 4
    return {"data": base["data"], "ckpt": ckpt, "index": tmp / "index", "tmp": tmp}


def searched(*args: str) -> list[dict]:
    r = run_main("search", *args, "--json", *SENTENCES)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def assert_same_ranking(got: list[dict], want: list[dict]) -> None:
    assert [q["query"] for q in got] == [q["query"] for q in want] == SENTENCES
    for g, w in zip(got, want):
        assert [m["image"] for m in g["matches"]] == [m["image"] for m in w["matches"]]
        assert [m["rank"] for m in g["matches"]] == list(range(1, IMAGES + 1))
        for key in SCORES:
            np.testing.assert_allclose(
                [m[key] for m in g["matches"]], [m[key] for m in w["matches"]], atol=1e-5
            )


def test_rerank_of_the_whole_split_is_the_exhaustive_ranking(setup):
    model, data, index = str(setup["ckpt"]), str(setup["data"]), str(setup["index"])
    cache = str(setup["tmp"] / "cache")
    exhaustive = searched("--model", model, "--data", data, "--cache", cache, "-k", str(IMAGES))
    reranked = searched("--model", model, "--index", index, "--rerank", str(IMAGES),
                        "-k", str(IMAGES))  # fmt: skip
    assert_same_ranking(reranked, exhaustive)
    # K past the split's size searches it all; --data checks the index was built from it
    with_data = searched("--model", model, "--index", index, "--data", data, "--rerank", "50",
                         "-k", str(IMAGES))  # fmt: skip
    assert_same_ranking(with_data, exhaustive)


def test_small_k_reranks_the_first_stage_candidates(setup):
    """With K = 3 each query's 2 matches are the best of its 3 first-stage nearest, by the
    exhaustive scores of those images."""
    import torch

    from shan.checkpoint import load_model
    from shan.fingerprint import file_digests
    from shan.index import open_index
    from shan.scoring import caption_vectors

    model, data, index = str(setup["ckpt"]), str(setup["data"]), str(setup["index"])
    cache = str(setup["tmp"] / "cache")
    exhaustive = searched("--model", model, "--data", data, "--cache", cache, "-k", str(IMAGES))
    reranked = searched("--model", model, "--index", index, "--rerank", "3", "-k", "2")
    loaded = load_model(setup["ckpt"])
    tokens = [loaded.vocab.encode(s, loaded.config.data.max_words) for s in SENTENCES]
    vectors = caption_vectors(loaded.model, tokens, torch.device("cpu"))
    opened = open_index(index, model_files=file_digests(model), data_fingerprint=None, name=model)
    rows, _ = opened.search(vectors, 3)
    for q, (got, want) in enumerate(zip(reranked, exhaustive)):
        candidates = {int(opened.image_ids[r]) for r in rows[q]}
        best = [m for m in want["matches"] if m["image"] in candidates][:2]
        assert [m["image"] for m in got["matches"]] == [m["image"] for m in best]
        np.testing.assert_allclose([m["total"] for m in got["matches"]],
                                   [m["total"] for m in best], atol=1e-5)  # fmt: skip
