"""The detector extractor (``shan.features.detector``): regions, boxes and features where
torchvision imports, one clear error where it does not."""

from __future__ import annotations

import numpy as np
import pytest

from shan.errors import ConfigError
from shan.features import ExtractorSpec


def torchvision_or_skip():
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        pytest.skip(f"detector needs torchvision, which does not import here ({e})")


def test_detector_regions_boxes_and_features():
    torchvision_or_skip()
    from shan.features.detector import DetectorExtractor

    ex = DetectorExtractor("random", regions=36, device="cpu")
    pixels = np.zeros((2, 128, 128, 3), np.uint8)
    pixels[:, 20:80, 30:100] = 200
    feats, boxes, counts = ex(
        pixels, np.array([[256, 128], [128, 128]]), np.array([[128, 64], [128, 128]])
    )
    assert feats.shape == (2, 36, 2048) and boxes.shape == (2, 36, 4)
    assert ((counts >= 1) & (counts <= 36)).all() and np.isfinite(feats).all()
    assert boxes[0, :, 2].max() <= 256 + 1 and boxes[0, :, 3].max() <= 128 + 1


def test_detector_without_torchvision_is_one_clear_error():
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision imports here: the error case cannot happen")
    except Exception:
        pass
    with pytest.raises(ConfigError, match="needs torchvision.*--extractor grid"):
        ExtractorSpec(name="detector").check()
