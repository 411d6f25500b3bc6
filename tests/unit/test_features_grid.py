"""The grid extractor (``shan.features.grid``): a ResNet's last feature map pooled to cells,
each a region with its box in image pixels."""

from __future__ import annotations

import numpy as np

from shan.features.grid import GridExtractor, cell_boxes


def test_grid_regions_and_boxes():
    ex = GridExtractor("random", "resnet50", size=64, grid=2, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    feats, boxes, counts = ex(pixels, np.array([[100, 50], [64, 64], [33, 80]]))
    assert feats.shape == (3, 4, 2048) and boxes.shape == (3, 4, 4)
    assert counts.tolist() == [4, 4, 4] and np.isfinite(feats).all() and feats.std() > 0
    np.testing.assert_allclose(boxes[0], [[0, 0, 50, 25], [50, 0, 100, 25],
                                          [0, 25, 50, 50], [50, 25, 100, 50]])  # fmt: skip
    assert cell_boxes(3, 90, 30)[-1].tolist() == [60, 20, 90, 30]
