"""Detector regions, bottom-up-attention style (Anderson et al. 2018): a torchvision Faster
R-CNN (ResNet-50 FPN) proposes boxes; after class-agnostic non-maximum suppression the top
``regions`` boxes are kept (36, the precomputed sets' count), or adaptively every box above
``score_threshold``, at least 10 and at most 100 (padded to 100: ``num_regions`` is the mask).
Each box's feature is the RoI-aligned, average-pooled 2048-d map of the ResNet's last stage.

Needs torchvision, which is imported here only: without it, :func:`check_available` names
what is missing.
"""

from __future__ import annotations

import numpy as np
import torch

from shan.data.format import DataError
from shan.features.resnet import FEATURE_DIM, Regions, load_state

NMS_IOU = 0.3  # bottom-up attention's class-agnostic suppression threshold
ADAPTIVE = (10, 100)


def check_available() -> None:
    """A DataError when torchvision does not import (the detector needs it)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a CUDA-only wheel failing on a CPU torch
        raise DataError(
            f"--extractor detector needs torchvision, which does not import here ({e}); "
            "install a torchvision matching this torch, or use --extractor grid"
        ) from None


class DetectorExtractor:
    """features (B, R, 2048), boxes (B, R, 4), num_regions (B,); R = ``regions`` or 100
    (adaptive)."""

    name = "detector"
    feature_dim = FEATURE_DIM

    def __init__(
        self,
        weights: str = "random",
        regions: int | None = 36,
        score_threshold: float = 0.2,
        device: str | None = None,
    ) -> None:
        check_available()
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        self.adaptive = regions is None
        self.regions = ADAPTIVE[1] if regions is None else int(regions)
        self.score_threshold = float(score_threshold)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if weights == "random":
            torch.manual_seed(0)
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
        if weights != "random":
            try:
                model.load_state_dict(load_state(weights))
            except RuntimeError as e:
                raise DataError(
                    f"--weights {weights}: not a torchvision fasterrcnn_resnet50_fpn state "
                    f"dict ({str(e).splitlines()[0][:200]})"
                ) from None
        heads = model.roi_heads  # every class's box, suppression done class-agnostically below
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.0, 1000
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray, sizes: np.ndarray, scaled: np.ndarray) -> Regions:
        """pixels (B, S, S, 3) uint8, each image in its top-left ``scaled`` (w, h) corner;
        sizes (B, 2) original (width, height)."""
        from torchvision.ops import nms, roi_align

        m = self.model
        imgs = [
            torch.from_numpy(np.ascontiguousarray(p[:h, :w])).to(self.device).permute(2, 0, 1)
            / 255.0
            for p, (w, h) in zip(pixels, scaled)
        ]
        batch, _ = m.transform(imgs)
        body = m.backbone.body(batch.tensors)  # C2..C5; "3" is C5, (B, 2048, H/32, W/32)
        pyramid = m.backbone.fpn(body)
        proposals, _ = m.rpn(batch, pyramid)
        dets, _ = m.roi_heads(pyramid, proposals, batch.image_sizes)
        B, R = len(imgs), self.regions
        feats = np.zeros((B, R, FEATURE_DIM), np.float32)
        boxes = np.zeros((B, R, 4), np.float32)
        counts = np.zeros(B, np.int32)
        for i, d in enumerate(dets):
            keep = nms(d["boxes"], d["scores"], NMS_IOU)  # sorted by score
            if self.adaptive:
                above = int((d["scores"][keep] >= self.score_threshold).sum())
                keep = keep[: min(max(above, ADAPTIVE[0]), ADAPTIVE[1])]
            else:
                keep = keep[:R]
            if len(keep) == 0:  # nothing detected: the whole image is the one region
                h_in, w_in = batch.image_sizes[i]
                b = torch.tensor([[0.0, 0.0, w_in, h_in]], device=self.device)
            else:
                b = d["boxes"][keep]
            pooled = roi_align(body["3"][i : i + 1], [b], (7, 7), 1 / 32, sampling_ratio=2)
            n = len(b)
            feats[i, :n] = pooled.mean((2, 3)).float().cpu().numpy()
            h_in, w_in = batch.image_sizes[i]
            scale = np.array([sizes[i][0] / w_in, sizes[i][1] / h_in] * 2, np.float32)
            boxes[i, :n] = b.float().cpu().numpy() * scale
            counts[i] = n
        return feats, boxes, counts
