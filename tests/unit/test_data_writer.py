"""The data set writer (``shan.data.writer``): a split name is never a path, a caption keeps
at most the format's words, and a full disk is one error that leaves the old data set."""

import errno

import numpy as np
import pyarrow.parquet as pq
import pytest

from shan.data.format import DataError, DatasetCard
from shan.data.fs import StorageError
from shan.data.writer import DatasetWriter
from shan.vocab import MAX_WORDS, Vocabulary
from tests.cli import snapshot


def test_a_split_name_is_never_a_path(tmp_path):
    victim = tmp_path / "victim" / "part-00000.parquet"
    victim.parent.mkdir()
    victim.write_text("precious")
    card = DatasetCard(name="x", regions=2, feature_dim=3)
    for name in ("../victim", "/abs", "a/b", ".hidden", ""):
        writer = DatasetWriter(str(tmp_path / "out"), card, Vocabulary(["a"]), log=print)
        with pytest.raises(DataError, match="split name"), writer as w:
            w.split(name)
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()


def test_a_caption_keeps_at_most_the_formats_words(tmp_path):
    out = tmp_path / "out"
    card = DatasetCard(name="x", regions=2, feature_dim=3)
    with DatasetWriter(str(out), card, Vocabulary(["a"]), log=print) as w:
        w.split("test").write(np.arange(1), np.zeros((1, 2, 3)), [[" ".join(["a"] * 5000)]])
    (shard,) = (out / "test").glob("*.parquet")
    ((tokens,),) = pq.read_table(shard).column("tokens").to_pylist()  # as stored, not as read
    assert len(tokens) == MAX_WORDS + 2 and tokens[-1] == 2


def test_max_words_beyond_the_format_is_refused(tmp_path):
    card = DatasetCard(name="x", regions=2, feature_dim=3)
    with pytest.raises(DataError, match=f"max_words must lie in 1..{MAX_WORDS}, got 1001"):
        DatasetWriter(str(tmp_path / "o"), card, Vocabulary(["a"]), max_words=1001, log=print)


def test_a_full_disk_is_one_error_naming_the_data_set_and_the_old_one_stays(tmp_path):
    out = tmp_path / "out"
    card = DatasetCard(name="x", regions=2, feature_dim=3)
    with DatasetWriter(str(out), card, Vocabulary(["a"]), log=print) as w:
        w.split("test").write(np.arange(1), np.zeros((1, 2, 3)), [["a"]])
    before = snapshot(out)
    card = DatasetCard(name="x", regions=2, feature_dim=3)
    writer = DatasetWriter(str(out), card, Vocabulary(["a"]), overwrite=True, log=print)
    message = rf"cannot write the data set {out}: no space left on device \(errno 28\)"
    with pytest.raises(StorageError, match=message), writer as w:
        w.split("test").write(np.arange(1), np.ones((1, 2, 3)), [["a"]])
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] ...")
    assert snapshot(out) == before  # the old data set, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
