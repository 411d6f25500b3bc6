"""A ResNet (He et al. 2016, bottleneck blocks, v1.5 strides) in plain PyTorch, so it runs
with any torch build, torchvision or not. Parameter names are torchvision's, so its ``.pth``
state dicts (``resnet50-*.pth``, ``resnet152-*.pth``) load as they are.

Shapes: images (B, 3, H, W) normalised RGB -> feature map (B, 2048, H/32, W/32).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from shan.data.format import DataError

ARCHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
FEATURE_DIM = 2048  # channels of the last stage: 512 * Bottleneck.expansion
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics torchvision's weights were trained with
STD = (0.229, 0.224, 0.225)
# an extractor's output: features (B, R, 2048), boxes (B, R, 4), num_regions (B,)
Regions = tuple[np.ndarray, np.ndarray, np.ndarray]


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's v1.5) -> 1x1, plus the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(out + short)


class ResNet(nn.Module):
    """The convolutional trunk of a ResNet (no pooling, no classifier): ``forward`` gives the
    last feature map. ``blocks``: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50."""

    def __init__(self, blocks: tuple[int, int, int, int] = ARCHS["resnet152"]) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        stages = []
        for i, (n, width) in enumerate(zip(self.blocks, (64, 128, 256, 512))):
            layer = []
            for b in range(n):
                layer.append(Bottleneck(c_in, width, 2 if (b == 0 and i > 0) else 1))
                c_in = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation, with the last BN of each block at zero (its
        ``zero_init_residual``), so random weights give features of a sane size."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 2048, ceil(H/32), ceil(W/32))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def blocks_of(state: dict[str, Tensor]) -> tuple[int, int, int, int]:
    """Blocks per stage, read from a torchvision state dict's key names."""
    counts = []
    for i in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        counts.append(max(ids) + 1 if ids else 0)
    return counts[0], counts[1], counts[2], counts[3]


def load_state(path: str) -> dict[str, Tensor]:
    """A state dict from a torchvision-format ``.pth`` file (``weights_only``: never runs
    pickled code); a DataError naming the file when it is not one."""
    from shan.data import fs

    try:
        import io

        obj = torch.load(io.BytesIO(fs.read_bytes(path)), map_location="cpu", weights_only=True)
    except fs.StorageError as e:
        raise DataError(f"--weights {path}: {e}") from None
    except Exception as e:  # torch raises many types for a foreign or damaged file
        raise DataError(f"--weights {path}: cannot be loaded as a state dict ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DataError(f"--weights {path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def resnet_from_state(state: dict[str, Tensor], source: str) -> ResNet:
    """A ResNet with the weights of a torchvision state dict (``fc.*`` is ignored)."""
    blocks = blocks_of(state)
    if 0 in blocks or "conv1.weight" not in state:
        raise DataError(f"--weights {source}: not a torchvision ResNet state dict")
    model = ResNet(blocks)
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        model.load_state_dict(trunk, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise DataError(
            f"--weights {source}: does not fit a bottleneck ResNet {blocks} ({first[:200]})"
        ) from None
    return model


def build_resnet(weights: str, arch: str = "resnet152", seed: int = 0) -> ResNet:
    """``weights`` a torchvision ``.pth`` file, or ``random`` (``arch``, from ``seed``: every
    actor builds the same weights)."""
    if weights == "random":
        if arch not in ARCHS:
            raise DataError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
        torch.manual_seed(seed)
        return ResNet(ARCHS[arch])
    return resnet_from_state(load_state(weights), weights)
