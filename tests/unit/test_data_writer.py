"""The data set writer (``shan.data.writer``): a split name is never a path."""

import pytest

from shan.data.format import DataError, DatasetCard
from shan.data.writer import DatasetWriter
from shan.vocab import Vocabulary


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
