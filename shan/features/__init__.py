"""Region features from images: pluggable extractors and the image decoding that feeds them.

``grid`` (default): a plain-PyTorch ResNet's last feature map, pooled to a grid of cells.
``detector``: a torchvision Faster R-CNN's top boxes with RoI-pooled 2048-d features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shan.config import Checked, Problems
from shan.data.format import DataError

if TYPE_CHECKING:
    from shan.features.detector import DetectorExtractor
    from shan.features.grid import GridExtractor

EXTRACTORS = ("grid", "detector")
ARCHS = ("resnet50", "resnet101", "resnet152")  # shan.features.resnet.ARCHS' keys (no torch)


@dataclass
class ExtractorSpec(Checked):
    """What to build in each actor (small, picklable): the extractor and its settings;
    :meth:`check` raises every problem at once, each named by its ``prepare_data images``
    flag."""

    name: str = "grid"
    weights: str = "random"  # a torchvision-format .pth state dict, or "random"
    arch: str = "resnet152"  # grid with random weights: resnet50, resnet101, resnet152
    size: int = 448  # grid: images resized to size x size; detector: longer side
    grid: int = 7  # grid: cells per side, regions = grid * grid
    regions: int | None = 36  # detector: boxes kept (None: adaptive 10..100)
    score_threshold: float = 0.2  # detector, adaptive: boxes above this score

    def problems(self) -> list[str]:
        """What is wrong with the settings, one line each."""
        p = Problems("--")
        if self.name not in EXTRACTORS:
            p.append(f"--extractor {self.name!r} is not one of {', '.join(EXTRACTORS)}")
        if self.name == "grid" and self.weights == "random" and self.arch not in ARCHS:
            p.append(f"--arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        p.at_least("image-size", self.size, 32)
        p.at_least("grid", self.grid, 1)
        if self.regions is not None:
            p.at_least("regions", self.regions, 1)
        p.positive("score-threshold", self.score_threshold)
        sized = all(isinstance(v, int) and v >= 1 for v in (self.size, self.grid))
        if self.name == "grid" and sized and 32 <= self.size < 32 * self.grid:
            p.append(
                f"--image-size {self.size} is too small for --grid {self.grid}: the feature "
                f"map has size/32 cells a side, so give at least {32 * self.grid}"
            )
        if self.name == "detector":
            from shan.features.detector import check_available  # torch: only for a detector

            try:
                check_available()
            except DataError as e:
                p.append(str(e))
        return list(p)

    @property
    def num_regions(self) -> int:
        """R, the regions stored per image (the padded maximum for adaptive detectors)."""
        if self.name == "grid":
            return self.grid * self.grid
        return 100 if self.regions is None else self.regions

    @property
    def letterbox(self) -> bool:
        """Whether images keep their aspect ratio (detector) or are stretched (grid)."""
        return self.name == "detector"

    def build(self, device: str | None = None) -> GridExtractor | DetectorExtractor:
        if self.name == "grid":
            from shan.features.grid import GridExtractor

            return GridExtractor(self.weights, self.arch, self.size, self.grid, device)
        from shan.features.detector import DetectorExtractor

        return DetectorExtractor(self.weights, self.regions, self.score_threshold, device)
