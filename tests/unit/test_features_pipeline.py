"""The feature extraction pipeline without Ray (``shan.features.pipeline``): how the actors are
sized from the cluster, and ``run_local``/``ExtractActor`` on a few small pictures: batches in
order, bad images as zero rows with their error, good rows unaffected by the bad ones."""

from __future__ import annotations

import numpy as np
import pytest

from shan.features import ExtractorSpec
from shan.features.pipeline import ExtractActor, plan_resources, run_local
from tests.helpers import make_images

DECODE_CPUS = 0.5  # what run_ray's read + decode tasks ask for


# -- sizing ---------------------------------------------------------------------------------------
def test_one_actor_per_gpu_with_its_share_of_the_cpus():
    r = plan_resources({"CPU": 16.0, "GPU": 4.0})
    assert (r.count, r.use_gpu, r.gpus_each) == (4, True, 1.0)
    assert r.cpus_each == 3.75 and r.torch_threads == 3  # (16 - 1) / 4, whole threads
    half = plan_resources({"CPU": 8.0, "GPU": 2.0}, gpus=0.5)
    assert (half.count, half.gpus_each, half.use_gpu) == (4, 0.5, True)


def test_gpus_zero_means_cpu_actors_on_a_gpu_cluster():
    r = plan_resources({"CPU": 8.0, "GPU": 2.0}, gpus=0)
    assert (r.count, r.use_gpu, r.gpus_each) == (2, False, 0.0)
    assert r.cpus_each == 3.5 and r.torch_threads == 4


@pytest.mark.parametrize(
    "cpus, count, each, threads",
    [(1, 1, 0.5, 1), (2, 1, 1.0, 2), (4, 1, 3.0, 4), (8, 2, 3.5, 4), (16, 4, 3.75, 4)],
)
def test_cpu_actors_are_guessed_from_the_cluster(cpus, count, each, threads):
    r = plan_resources({"CPU": float(cpus)})
    assert (r.count, r.use_gpu, r.cpus_each, r.gpus_each, r.torch_threads) == (
        count,
        False,
        each,
        0.0,
        threads,
    )


def test_guessed_cpu_actors_leave_room_for_decoding():
    """Whole-CPU actors would starve the decode tasks and the job would hang: at most 4 CPUs
    an actor, and at least one decode task's CPUs left over on every cluster size."""
    for cpus in range(1, 257):
        r = plan_resources({"CPU": float(cpus)})
        where = f"{cpus} CPUs: {r}"
        assert 0.25 <= r.cpus_each <= 4.0 and r.count >= 1, where
        assert cpus - r.count * r.cpus_each >= DECODE_CPUS - 1e-9, where
        assert r.torch_threads * r.count <= cpus, where  # no more threads than CPUs


def test_explicit_actors_and_cpus_are_kept_even_when_the_cluster_is_smaller_now():
    r = plan_resources({"CPU": 2.0}, actors=4, cpus=2.0)  # the pool waits for room: no error
    assert (r.count, r.cpus_each, r.torch_threads, r.use_gpu) == (4, 2.0, 2, False)
    r = plan_resources({"CPU": 8.0}, actors=3)
    assert r.count == 3 and r.cpus_each == round(7 / 3, 2)


# -- extraction in this process -------------------------------------------------------------------
class FakeExtractor:
    """Region r of an image holds its mean pixel value + r; records the batch sizes it saw."""

    feature_dim = 3

    def __init__(self, regions: int) -> None:
        self.regions, self.calls = regions, []

    def __call__(self, pixels, sizes, scaled):
        self.calls.append(len(pixels))
        mean = pixels.reshape(len(pixels), -1).mean(axis=1).astype(np.float32)
        feats = mean[:, None, None] + np.arange(self.regions, dtype=np.float32)[None, :, None]
        feats = np.repeat(feats, self.feature_dim, axis=2)
        boxes = np.tile(np.asarray(sizes, np.float32)[:, None, [0, 1, 0, 1]], (1, self.regions, 1))
        return feats, boxes, np.full(len(pixels), self.regions, np.int32)


@pytest.fixture
def items(tmp_path):
    """Seven rows: four pictures, an unreadable file, a missing file, and one too small."""
    from PIL import Image

    imgs = make_images(tmp_path / "imgs", n=4)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(imgs / "tiny.png")
    names = ["img0.jpg", "img1.png", "broken.jpg", "img2.jpg", "missing.png", "tiny.png"]
    names.append("img3.png")
    return [{"index": 10 + i, "uri": str(imgs / n)} for i, n in enumerate(names)]


BAD = {2: "cannot be decoded", 4: "cannot be read", 5: "8x8 pixels, smaller than --min-side"}


def test_run_local_keeps_order_and_turns_bad_images_into_zero_rows(items, monkeypatch):
    spec = ExtractorSpec(name="grid", arch="resnet50", size=64, grid=2)
    fake = FakeExtractor(spec.num_regions)
    monkeypatch.setattr(ExtractorSpec, "build", lambda self, device=None: fake)
    batches = list(run_local(items, spec, batch_size=3, min_side=16))
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert fake.calls == [2, 1, 1]  # only the good rows reach the extractor
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert out["index"].tolist() == list(range(10, 17))
    assert out["uri"].tolist() == [r["uri"] for r in items]
    assert out["features"].shape == (7, 4, 3) and out["features"].dtype == np.float32
    assert out["boxes"].shape == (7, 4, 4) and out["num_regions"].dtype == np.int32
    for i in range(7):
        if i in BAD:
            assert BAD[i] in out["error"][i]
            assert out["num_regions"][i] == 0
            assert not out["features"][i].any() and not out["boxes"][i].any()
        else:
            assert out["error"][i] == "" and out["num_regions"][i] == 4
            assert out["size"][i].tolist() == [72, 56]  # the original size, not the scaled one
            assert out["features"][i, 3, 0] - out["features"][i, 0, 0] == pytest.approx(3.0)
            assert out["boxes"][i, 0].tolist() == [72, 56, 72, 56]
    assert out["size"][5].tolist() == [8, 8] and out["size"][4].tolist() == [0, 0]


def test_a_batch_of_only_bad_images_does_not_call_the_extractor(items, monkeypatch):
    spec = ExtractorSpec(name="grid", arch="resnet50", size=64, grid=2)
    fake = FakeExtractor(spec.num_regions)
    monkeypatch.setattr(ExtractorSpec, "build", lambda self, device=None: fake)
    (batch,) = run_local([items[2], items[4]], spec, batch_size=8, min_side=16)
    assert fake.calls == [] and batch["features"].shape == (2, 4, 3)
    assert batch["num_regions"].tolist() == [0, 0] and all(batch["error"])
    assert list(run_local([], spec, batch_size=8, min_side=16)) == []


def test_real_grid_features_of_an_image_do_not_depend_on_its_batch(items):
    """A random resnet50 at 64 x 64 (2 x 2 cells): the same image alone or beside others, bad
    ones included, gets the same features; boxes are the cells in original pixels."""
    spec = ExtractorSpec(name="grid", arch="resnet50", size=64, grid=2)
    actor = ExtractActor(spec)
    from shan.features.decode import decode_batch

    def extract(rows):
        batch = {"index": [r["index"] for r in rows], "uri": [r["uri"] for r in rows]}
        return actor(decode_batch(batch, spec.size, spec.letterbox, 16))

    together = extract(items[:4])
    alone = extract([items[3]])
    assert together["features"].shape == (4, 4, 2048)
    assert np.isfinite(together["features"]).all() and together["features"][0].std() > 0
    np.testing.assert_allclose(together["features"][3], alone["features"][0], rtol=1e-4,
                               atol=1e-5)  # fmt: skip
    assert not together["features"][2].any()  # the broken file
    cells = [[0, 0, 36, 28], [36, 0, 72, 28], [0, 28, 36, 56], [36, 28, 72, 56]]  # 72 x 56
    np.testing.assert_allclose(together["boxes"][0], cells)
    assert together["num_regions"].tolist() == [4, 4, 0, 4]
