"""Grid features: the cells of a ResNet's last feature map are the regions (as VSE-infinity,
Chen et al. 2021, showed, competitive with detector regions).

An image is resized to ``size x size``, run through the trunk (feature map (2048, size/32,
size/32)), the map is average-pooled to ``grid x grid`` cells, and each cell is a region with
its box, in the original image's pixels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shan.features.resnet import FEATURE_DIM, MEAN, STD, Regions, build_resnet


def cell_boxes(grid: int, width: int, height: int) -> np.ndarray:
    """(grid*grid, 4) boxes x1, y1, x2, y2 of the cells, row by row, in pixels."""
    xs, ys = np.linspace(0, width, grid + 1), np.linspace(0, height, grid + 1)
    return np.array(
        [[xs[j], ys[i], xs[j + 1], ys[i + 1]] for i in range(grid) for j in range(grid)],
        dtype=np.float32,
    )


def to_input(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) float32, normalised with ImageNet statistics."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


class GridExtractor:
    """ResNet grid regions: ``regions = grid * grid``, ``feature_dim = 2048``."""

    name = "grid"
    feature_dim = FEATURE_DIM

    def __init__(
        self,
        weights: str = "random",
        arch: str = "resnet152",
        size: int = 448,
        grid: int = 7,
        device: str | None = None,
    ) -> None:
        self.size, self.grid = int(size), int(grid)
        self.regions = self.grid * self.grid
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_resnet(weights, arch).to(self.device).eval()

    @torch.no_grad()
    def __call__(
        self, pixels: np.ndarray, sizes: np.ndarray, scaled: np.ndarray | None = None
    ) -> Regions:
        """pixels (B, size, size, 3) uint8 (stretched: ``scaled`` is unused), sizes (B, 2)
        original (width, height) ->
        features (B, R, 2048) float32, boxes (B, R, 4) float32, num_regions (B,) int32."""
        x = to_input(pixels, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            fmap = self.model(x)  # (B, 2048, h, w)
        cells = F.adaptive_avg_pool2d(fmap.float(), self.grid)  # (B, 2048, g, g)
        feats = cells.flatten(2).transpose(1, 2).cpu().numpy()  # (B, g*g, 2048)
        boxes = np.stack([cell_boxes(self.grid, int(w), int(h)) for w, h in sizes])
        return feats, boxes, np.full(len(feats), self.regions, dtype=np.int32)
