"""Image feature extraction throughput: images per second through the real pipeline (Ray Data
read + decode tasks feeding the extractor's actor pool), on generated images.

On CPU: 1 and then 2 actors in one run, and their ratio. With a GPU: images per second per
GPU for each extractor (detector where torchvision imports).

    python benchmarks/extract.py --images 48 --size 224                 # CPU
    python benchmarks/extract.py --images 512 --size 448 --extractors grid detector   # GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from shan.features import ExtractorSpec
from shan.features.pipeline import plan_resources, run_ray


def make_images(folder: Path, n: int, size: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        a = rng.integers(0, 255, (size * 3 // 4, size, 3), dtype=np.uint8)
        p = folder / f"im{i}.jpg"
        Image.fromarray(a).save(p, quality=90)
        items.append({"index": i, "uri": str(p)})
    return items


def rate(items, spec, res, batch) -> float:
    """Images per second, the actors' start excluded (a first batch warms them up)."""
    it = run_ray(items, spec, res, batch, min_side=8)
    t0, seen = None, 0
    for b in it:
        if t0 is None:  # the first batch includes the actors' start
            t0 = time.perf_counter()
            continue
        seen += len(b["index"])
    return seen / (time.perf_counter() - t0) if seen else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=224, help="extractor input size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--extractors", nargs="+", default=["grid"])
    args = p.parse_args()
    os.environ.pop("RAY_ADDRESS", None)
    from shan.runtime import init_ray

    ray = init_ray(lambda s: None)
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    print(f"cluster: {cluster.get('CPU', 0):g} CPU, {gpus} GPU; {args.images} images, "
          f"input {args.size}, batch {args.batch}, {args.arch}")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        items = make_images(Path(d), args.images, args.size)
        if not gpus:
            spec = ExtractorSpec("grid", arch=args.arch, size=args.size, grid=7)
            rates = {}
            for n in (1, 2):
                res = plan_resources(cluster, actors=n)
                rates[n] = rate(items, spec, res, args.batch)
                threads = res.torch_threads
                print(f"grid on CPU, {n} actor(s) x {res.cpus_each:g} CPU, {threads} torch "
                      f"threads each: {rates[n]:.2f} images/s")  # fmt: skip
            print(f"ratio 2 actors / 1 actor: {rates[2] / rates[1]:.2f}")
        for name in args.extractors if gpus else []:
            spec = ExtractorSpec(name, arch=args.arch, size=args.size, grid=7)
            try:
                spec.check()
            except Exception as e:
                print(f"{name}: skipped ({e})")
                continue
            res = plan_resources(cluster)
            r = rate(items, spec, res, args.batch)
            print(f"{name} on {gpus} GPU(s), {res.count} actor(s): {r:.1f} images/s, "
                  f"{r / gpus:.1f} images/s per GPU")  # fmt: skip


if __name__ == "__main__":
    main()
