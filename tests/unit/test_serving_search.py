"""The served search (:mod:`shan.serving`), without MLflow: a request with empty features and
counts searches the index loaded beside the model and answers what ``shan search --index``
ranks; bad params and a search with no index are refused naming the field; a request with
features is still scored. The model is an untrained tiny checkpoint with a first-stage head,
its index built in this process with the index library."""

from __future__ import annotations

import numpy as np
import pytest

from shan.errors import CheckpointError, JobError
from shan.metrics import SCORES
from shan.serving import InputError, answer, is_search, open_serving_index
from tests.helpers import untrained_on_synthetic
from tests.rerank_helpers import build_index, save_untrained_first_stage

IMAGES = 9
CAPTIONS = ["a red thing", "a blue dog on the grass"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from shan.checkpoint import load_model
    from shan.data.format import load_vocab

    tmp = tmp_path_factory.mktemp("serve-search")
    base = untrained_on_synthetic(tmp, IMAGES)
    ckpt = save_untrained_first_stage(tmp / "fs", load_vocab(str(base["data"])), seed=2)
    build_index(ckpt, base["data"], tmp / "index")
    loaded = load_model(ckpt)
    index = open_serving_index(loaded, str(ckpt), str(tmp / "index"))
    return {"loaded": loaded, "index": index, "base": base, "ckpt": ckpt, "tmp": tmp}


def search(**fields) -> dict:
    return {"features": [], "counts": [], "captions": np.array(CAPTIONS), **fields}


def test_a_search_answers_what_the_rerank_ranks(served):
    from shan.rerank import search_index

    loaded, index = served["loaded"], served["index"]
    got = answer(loaded, index, search(), {"top": 4, "rerank": 6})
    assert sorted(got) == sorted(["image_ids", *SCORES])
    assert got["image_ids"].shape == (2, 4) and got["image_ids"].dtype == np.int64
    tokens = [loaded.vocab.encode(c, loaded.config.data.max_words) for c in CAPTIONS]
    want = search_index(loaded.model, index, tokens, top=4, rerank=6)
    for q, w in enumerate(want):
        np.testing.assert_array_equal(got["image_ids"][q], w.image_ids)
        for key in SCORES:
            assert got[key].dtype == np.float32
            np.testing.assert_allclose(got[key][q], w.scores[key], atol=1e-6)
    assert (np.diff(got["total"], axis=1) <= 0).all()  # best first
    whole = answer(loaded, index, search(features=None, counts=None), {"top": 50, "rerank": 50})
    assert whole["image_ids"].shape == (2, IMAGES)  # k = min(top, N)
    assert sorted(whole["image_ids"][0]) == sorted(index.image_ids)


def test_a_request_with_features_is_still_scored(served):
    from shan.scoring import score_matrix

    loaded = served["loaded"]
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 4, 16)).astype(np.float32)
    req = {"features": features, "counts": np.array([4, 2]), "captions": np.array(CAPTIONS)}
    assert not is_search(req)
    got = answer(loaded, served["index"], req)
    tokens = [loaded.vocab.encode(c, loaded.config.data.max_words) for c in CAPTIONS]
    import torch

    want = score_matrix(loaded.model, features, req["counts"], tokens, torch.device("cpu"))
    assert sorted(got) == sorted(SCORES)
    np.testing.assert_allclose(got["total"], want["total"], atol=1e-5)


@pytest.mark.parametrize(
    ("params", "fields", "message"),
    [
        ({"top": 5, "rerank": 3}, {}, "^rerank: 3 is smaller than top 5"),
        ({"rerank": 0}, {}, "^rerank: must be an integer >= 1, got 0"),
        ({"top": 0}, {}, "^top: must be an integer >= 1, got 0"),
        ({"top": 2.5}, {}, "top: expected a whole number, got 2.5"),
        ({"rerank": True}, {}, "rerank: expected a whole number, got True"),
        ({}, {"captions": np.array(["a dog", 7], dtype=object)}, r"captions\[1\] is not a string"),
        ({}, {"captions": np.array([], dtype=object)}, "captions: expected a list of M >= 1"),
    ],
)
def test_bad_searches_name_the_field(served, params, fields, message):
    with pytest.raises(InputError, match=message):
        answer(served["loaded"], served["index"], search(**fields), params)


def test_a_search_over_the_score_limit_is_refused(served, monkeypatch):
    monkeypatch.setenv("SHAN_SERVE_MAX_SCORES", "10")
    with pytest.raises(InputError, match=r"2 captions x rerank 1000000000 ask for 18 scores, "
                       r"over the limit of 10 .*\(SHAN_SERVE_MAX_SCORES\)"):  # fmt: skip
        answer(served["loaded"], served["index"], search(), {"rerank": 10**9})
    monkeypatch.setenv("SHAN_SERVE_MAX_SCORES", "18")
    assert answer(served["loaded"], served["index"], search(), {"rerank": 10**9})["total"].shape


def test_a_search_without_an_index_says_how_to_load_one(served):
    with pytest.raises(InputError, match="no index is loaded to search: serve the model with "
                       "SHAN_SERVE_INDEX=DEST"):  # fmt: skip
        answer(served["loaded"], None, search())


def test_an_index_of_another_model_or_a_model_without_head_is_refused(served, tmp_path):
    from shan.checkpoint import load_model
    from shan.data.format import load_vocab
    from tests.helpers import save_untrained

    vocab = load_vocab(str(served["base"]["data"]))
    other = save_untrained_first_stage(tmp_path / "other", vocab, seed=9)
    with pytest.raises(JobError, match="was built from model"):
        open_serving_index(load_model(other), str(other), str(served["tmp"] / "index"))
    headless = save_untrained(tmp_path / "headless", vocab)
    with pytest.raises(CheckpointError, match="has no first-stage head"):
        open_serving_index(load_model(headless), str(headless), str(served["tmp"] / "index"))
