"""The extractor's description (``shan.features``, :class:`ExtractorSpec`): settings checked
before anything is built."""

from __future__ import annotations

import pytest

from shan.data.format import DataError
from shan.features import ExtractorSpec


def test_spec_checks_the_image_size_against_the_grid():
    with pytest.raises(DataError, match="--image-size 64.*--grid 3"):
        ExtractorSpec(size=64, grid=3).check()
