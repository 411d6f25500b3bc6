"""The extractor's description (``shan.features``, :class:`ExtractorSpec`): settings checked
before anything is built."""

from __future__ import annotations

import pytest

from shan.errors import ConfigError, problems
from shan.features import ARCHS, ExtractorSpec


def test_spec_checks_the_image_size_against_the_grid():
    with pytest.raises(ConfigError, match="--image-size 64.*--grid 3"):
        ExtractorSpec(size=64, grid=3).check()
    ExtractorSpec(size=96, grid=3).check()  # 96 / 32 = 3 cells a side: enough


def test_every_bad_setting_is_one_problem_at_once():
    assert ExtractorSpec().problems() == []
    spec = ExtractorSpec(name="grid", arch="resnet18", size=16, grid=0, score_threshold=0.0)
    with pytest.raises(ConfigError) as e:
        spec.check()
    assert problems(e.value) == [
        "--arch 'resnet18' is not one of resnet50, resnet101, resnet152",
        "--image-size must be an integer >= 32, got 16",
        "--grid must be an integer >= 1, got 0",
        "--score-threshold must be > 0 and finite, got 0.0",
    ]
    assert ExtractorSpec(name="sift", regions=0).problems() == [
        "--extractor 'sift' is not one of grid, detector",
        "--regions must be an integer >= 1, got 0",
    ]


def test_the_light_list_of_architectures_is_the_resnets_built():
    from shan.features.resnet import ARCHS as BUILT

    assert set(ARCHS) == set(BUILT)
