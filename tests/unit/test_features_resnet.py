"""The plain-PyTorch ResNet (``shan.features.resnet``) against an independent functional
computation of the same torchvision-format weights; its parameter names; weights that are not
a ResNet."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shan.data.format import DataError
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
