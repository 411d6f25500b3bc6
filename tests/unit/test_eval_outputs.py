"""An evaluation's output folder (``shan.eval.outputs``): only its own files accepted, no
attention picture of an earlier run left, nothing written from a NaN matrix, and what MLflow
gets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from shan.errors import JobError
from shan.eval import outputs
from shan.eval.lock import LOCK_NAME
from shan.model import SCORES


def test_a_rerun_leaves_no_attention_picture_of_the_earlier_run(tmp_path):
    for i in range(4):
        (tmp_path / f"attention_{i}.png").write_bytes(b"old")
    for name in ("metrics.json", "recall.md", "sims_total.npy"):
        (tmp_path / name).write_bytes(b"x")
    outputs.mark_incomplete(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.md", "sims_total.npy"]


def test_only_an_evaluations_own_files_are_accepted_in_out(tmp_path):
    ours = [
        "sims_total.npy",
        "sims_g2g.npy",
        "index.json",
        "metrics.json",
        "recall.md",
        "recall_at_k.png",
        "attention_0.png",
        "attention_12.png",
        "promotion.json",
        LOCK_NAME,
        "tiles/model-0/plan.json",
        "tiles/model-1/tile-r00001-c00002.npz",
        "tiles/model-1/tile-r00001-c00002.npz.tmp-77",
        "tiles/model-1/plan.json.tmp-78",
        "tiles/model-1/.tile-r00001-c00002.npz.tmp-ab_3kz9q",
        "v3/metrics.json",
        "v3/tiles/model-0/plan.json",
    ]
    for name in ours:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert outputs.foreign_entries(str(tmp_path)) == []
    outputs.check_out(str(tmp_path))
    for name in ("notes.txt", "tiles/model-0/mine.npz", "v3/x/y.txt", "sims_other.npy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert outputs.foreign_entries(str(tmp_path)) == [
        "empty/",
        "notes.txt",
        "sims_other.npy",
        "tiles/model-0/mine.npz",
        "v3/x/",
    ]
    with pytest.raises(JobError, match=r"empty/, notes.txt, sims_other.npy and 2 more"):
        outputs.check_out(str(tmp_path))
    assert outputs.foreign_entries(str(tmp_path / "missing")) == []
    with pytest.raises(JobError, match="is a file"):
        outputs.check_out(str(tmp_path / "notes.txt"))


def test_outputs_with_a_nan_matrix_are_not_written(tmp_path):
    sims = {k: np.zeros((2, 3), np.float32) for k in SCORES}
    sims["g2g"][1, 1] = np.nan
    with pytest.raises(JobError, match="g2g matrix holds NaN"):
        outputs.write_outputs(str(tmp_path), sims, {}, {}, extra={}, recall_md="")
    assert list(tmp_path.iterdir()) == []


def test_files_too_large_for_mlflow_stay_out_of_the_local_copy(tmp_path):
    from shan.data.fs import StorageError

    (tmp_path / "small.json").write_bytes(b"x" * 10)
    (tmp_path / "sims_total.npy").write_bytes(b"x" * 100)
    local, kept = outputs.local_copy(str(tmp_path), ["small.json", "sims_total.npy"], max_bytes=50)
    try:
        assert kept == ["small.json"]
        assert sorted(p.name for p in Path(local).iterdir()) == ["small.json"]
    finally:
        shutil.rmtree(local)
    with pytest.raises(StorageError, match="missing.npy"):
        outputs.local_copy(str(tmp_path), ["missing.npy"], max_bytes=50)
