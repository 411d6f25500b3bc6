"""The synthetic data set (``shan.data.synthetic``): reproducible from its seed, valid, and
where the demo's copy lives."""

from pathlib import Path

import numpy as np

from shan.data.reader import read_split
from shan.data.synthetic import demo_data_root, generate_synthetic
from shan.data.validate import validate
from tests.helpers import quiet


def test_synthetic_is_reproducible_and_valid(tmp_path):
    kw = dict(images={"train": 30, "test": 20}, regions=5, feature_dim=8, concepts=12, log=quiet)
    generate_synthetic(str(tmp_path / "a"), seed=3, **kw)
    generate_synthetic(str(tmp_path / "b"), seed=3, chunk_rows=7, **kw)
    a, b = read_split(str(tmp_path / "a"), "test"), read_split(str(tmp_path / "b"), "test")
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.features, b.features)
    assert a.boxes.shape == (20, 5, 4)
    assert validate(str(tmp_path / "a"))["splits"]["train"]["captions"] == 150
    # captions name concepts that are in the image: words repeat across an image's captions
    c = read_split(str(tmp_path / "a"), "train")
    assert c.captions[0] != c.captions[5]


def test_the_demo_data_set_lives_under_the_working_directory_or_where_the_env_says(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("SHAN_DEMO_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()  # tmp_path as the OS gives it back (links resolved)
    assert demo_data_root() == here / "datasets" / "demo"
    monkeypatch.setenv("SHAN_DEMO_DATA", str(tmp_path / "elsewhere" / "demo"))
    assert demo_data_root() == tmp_path / "elsewhere" / "demo"
    monkeypatch.setenv("SHAN_DEMO_DATA", "rel/demo")  # made absolute, against the working dir
    assert demo_data_root() == here / "rel" / "demo"
    monkeypatch.setenv("SHAN_DEMO_DATA", "~/demo")
    assert demo_data_root() == Path("~/demo").expanduser()
