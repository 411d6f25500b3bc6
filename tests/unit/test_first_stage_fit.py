"""The first stage fitted afterwards (shan.firststage, shan index head): the head learns, SHAN's
weights and scores stay as they were, the new checkpoint is a model with a head, and nothing
that exists is replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shan.checkpoint import load_model, require_first_stage
from shan.data.format import load_card
from shan.data.reader import read_split
from shan.errors import CheckpointError, JobError
from shan.firststage import FitOptions, caption_batches, fit_first_stage, with_head
from shan.indexing import HeadOptions, fit_head
from shan.scoring import score_matrix
from tests.helpers import quiet, untrained_on_synthetic


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return untrained_on_synthetic(tmp_path_factory.mktemp("head"), test_images=12)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: one torch thread (two spin, tens of times slower, on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_batches_cover_every_caption_once_and_keep_a_negative():
    rng = np.random.default_rng(0)
    parts = caption_batches(11, 4, rng)
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]
    assert [len(p) for p in caption_batches(9, 4, rng)] == [4, 4]  # a batch of 1 is dropped


def test_the_head_learns_and_shan_is_untouched(made):
    loaded = load_model(made["ckpt"])
    split = read_split(str(made["data"]), "test", load_card(str(made["data"])))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    losses: list[float] = []
    head = fit_first_stage(loaded.model, split, 8, FitOptions(epochs=20, batch=20, lr=1e-2),
                           report=lambda e, loss: losses.append(loss))  # fmt: skip
    assert len(losses) == 20 and max(losses[-3:]) < losses[0] - 0.3  # it learns
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # SHAN (and no head) as it was
    state = with_head(loaded.model, head)
    assert {k for k in state if k.startswith("first_stage.")} == {
        f"first_stage.{k}" for k in head.state_dict()
    }


def test_fit_head_writes_a_model_with_a_head_scoring_as_before(made, tmp_path):
    data = str(made["data"])
    with pytest.raises(CheckpointError, match="has no first-stage head"):
        require_first_stage(load_model(made["ckpt"]).model, "m")
    out = tmp_path / "with-head"
    fit_head(str(made["ckpt"]), data, str(out), HeadOptions(split="test", dim=6, epochs=2),
             log=quiet)  # fmt: skip
    new, old = load_model(out), load_model(made["ckpt"])
    require_first_stage(new.model, str(out))
    assert new.config.model.first_stage_dim == 6
    assert new.config.model.first_stage_pool == "max" and new.model.first_stage.pool == "max"
    split = read_split(data, "test", load_card(data))
    cpu = torch.device("cpu")
    args = (split.features, split.num_regions, split.tokens, cpu)
    a, b = score_matrix(new.model, *args), score_matrix(old.model, *args)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # SHAN's scores unchanged


def test_fit_head_refuses_a_folder_it_did_not_write_and_bad_options(made, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="is not an empty folder; it is left alone"):
        fit_head(str(made["ckpt"]), str(made["data"]), str(kept), HeadOptions(split="test"))
    assert (kept / "notes.txt").read_text() == "mine"
    with pytest.raises(JobError, match="has no split 'train'"):
        fit_head(str(made["ckpt"]), str(made["data"]), str(tmp_path / "new"))
    with pytest.raises(Exception, match="epochs") as e:
        HeadOptions(epochs=0, batch=1, pool="mean").check()
    assert "batch" in str(e.value) and "pool" in str(e.value)
