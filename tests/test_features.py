"""The extractors: the plain-PyTorch ResNet against an independent functional computation of
the same torchvision-format weights, grid regions and boxes, image decoding, the detector
(where torchvision imports)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shan.data.format import DataError
from shan.features import ExtractorSpec
from shan.features.decode import decode
from shan.features.grid import GridExtractor, cell_boxes
from shan.features.resnet import ARCHS, ResNet, build_resnet


def reference_trunk(sd: dict, x: torch.Tensor, blocks) -> torch.Tensor:
    """A ResNet trunk written again from the state dict alone, with torch.nn.functional."""

    def bn(y, p):
        w, b = sd[f"{p}.weight"], sd[f"{p}.bias"]
        mean, var = sd[f"{p}.running_mean"], sd[f"{p}.running_var"]
        return (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * w[
            :, None, None
        ] + b[:, None, None]

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(blocks):
        for b in range(n):
            p, stride = f"layer{i + 1}.{b}", (2 if b == 0 and i > 0 else 1)
            y = F.relu(bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.relu(
                bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2")
            )
            y = bn(F.conv2d(y, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = x
            if f"{p}.downsample.0.weight" in sd:
                short = bn(
                    F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1"
                )
            x = F.relu(y + short)
    return x


def random_state(blocks, seed: int = 0) -> dict:
    """A torchvision-format state dict (fc included) with every weight and statistic random."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ResNet(blocks).state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.ndim == 4:
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            sd[k] = torch.randn(v.shape, generator=g) * (2 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k.endswith("weight") else 0)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(10, 2048, generator=g), torch.zeros(10)
    return sd


def test_plain_resnet_equals_a_functional_computation_of_the_same_weights(tmp_path: Path):
    blocks = (1, 2, 1, 1)
    sd = random_state(blocks)
    torch.save(sd, tmp_path / "w.pth")
    model = build_resnet(str(tmp_path / "w.pth")).eval()
    assert model.blocks == blocks  # read from the key names
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x), reference_trunk(sd, x, blocks)
    assert ours.shape == (2, 2048, 2, 3)
    assert ref.abs().max() > 0.1  # not a trivial map
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_resnet50_has_torchvisions_parameter_names():
    keys = ResNet(ARCHS["resnet50"]).state_dict().keys()
    assert len(keys) + 2 == 320  # torchvision's resnet50 state dict, with fc.weight and fc.bias
    for k in ("conv1.weight", "bn1.num_batches_tracked", "layer1.0.downsample.0.weight",
              "layer3.5.bn3.running_var", "layer4.2.conv3.weight"):  # fmt: skip
        assert k in keys


def test_weights_that_are_not_a_resnet_are_refused_naming_the_file(tmp_path: Path):
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(DataError, match="bad.pth"):
        build_resnet(str(tmp_path / "bad.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="junk.pth.*cannot be loaded"):
        build_resnet(str(tmp_path / "junk.pth"))


def test_grid_regions_and_boxes():
    ex = GridExtractor("random", "resnet50", size=64, grid=2, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    feats, boxes, counts = ex(pixels, np.array([[100, 50], [64, 64], [33, 80]]))
    assert feats.shape == (3, 4, 2048) and boxes.shape == (3, 4, 4)
    assert counts.tolist() == [4, 4, 4] and np.isfinite(feats).all() and feats.std() > 0
    np.testing.assert_allclose(boxes[0], [[0, 0, 50, 25], [50, 0, 100, 25],
                                          [0, 25, 50, 50], [50, 25, 100, 50]])  # fmt: skip
    assert cell_boxes(3, 90, 30)[-1].tolist() == [60, 20, 90, 30]


def png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 100).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_names_what_is_wrong_and_keeps_the_size():
    pixels, size, scaled, err = decode(png((80, 40)), 64, letterbox=False, min_side=16)
    assert (pixels.shape, size, scaled, err) == ((64, 64, 3), (80, 40), (64, 64), "")
    pixels, size, scaled, err = decode(png((80, 40), "L"), 64, letterbox=True, min_side=16)
    assert (size, scaled, err) == ((80, 40), (64, 32), "") and pixels[40:].max() == 0
    assert "empty" in decode(b"", 64, False, 16)[3]
    assert "cannot be decoded" in decode(b"\x89PNG\r\n\x1a\nbroken", 64, False, 16)[3]
    assert "8x40 pixels" in decode(png((8, 40)), 64, False, 16)[3]


def test_spec_checks_the_image_size_against_the_grid():
    with pytest.raises(DataError, match="--image-size 64.*--grid 3"):
        ExtractorSpec(size=64, grid=3).check()


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
    with pytest.raises(DataError, match="needs torchvision.*--extractor grid"):
        ExtractorSpec(name="detector").check()
