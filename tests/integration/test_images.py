"""``shan data images`` as a job (its shim ``jobs/prepare_data.py``): extraction on Ray (the
session's head, as on a cluster), one bad image skipped, the same features as the in-process
conversion for the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shan.data.reader import read_split
from shan.data.validate import validate
from tests.cli import run_job
from tests.helpers import make_images


def test_the_job_extracts_on_ray_and_matches_the_in_process_result(
    services, converted_images, tmp_path: Path
):
    """Real Ray (the session's head: ``RAY_ADDRESS``; a job starting its own local instance is
    test_train's), one image of the folder bad and skipped: the same features as the
    in-process conversion for the others."""
    _, local_out = converted_images
    ray_imgs = make_images(tmp_path / "imgs", 6, split=lambda i: "train" if i < 4 else "test")
    (ray_imgs / "img5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "ray-data"
    r = run_job("prepare_data", "images", str(ray_imgs), "--captions",
                str(ray_imgs / "captions.csv"), "--out", str(out), "--arch", "resnet50",
                "--image-size", "64", "--grid", "2", "--min-count", "1",
                "--on-bad-image", "skip", "--batch-size", "2", timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extract images: 100% (6/6 images)" in r.stderr and "left out 1 bad image" in r.stdout
    summary = validate(str(out))
    assert {s: v["images"] for s, v in summary["splits"].items()} == {"train": 4, "test": 1}
    ray_train, local_train = read_split(str(out), "train"), read_split(str(local_out), "train")
    np.testing.assert_array_equal(ray_train.image_ids, local_train.image_ids)
    np.testing.assert_allclose(ray_train.features.astype(np.float32),
                               local_train.features.astype(np.float32), atol=2e-3)  # fmt: skip
    report = json.loads((out / "bad_images.json").read_text())["bad_images"]
    assert [b["image"] for b in report] == ["img5.png"]
