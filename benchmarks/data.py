"""Data benchmarks: converter throughput and peak memory, and the training reader's throughput.

    python benchmarks/data.py [--images 7000] [--work /tmp/shan-bench-data] [--keep]

1. Writes a precomp split of ``--images`` x 36 x 2048 float32 features (7,000 images: 2.06 GB)
   with 5 captions each (real Flickr30K captions when ../shared is there), converts it in a
   child process and reports MB/s of features read and the child's peak resident memory.
2. Reads the converted split through Ray Data (a local instance) into training batches of 128
   with one consumer, as one training worker does, and reports examples per second.
3. When ../shared/data/scan_precomp is there: converts f30k_test_caps.txt with generated
   (1000, 36, 2048) features and f30k_precomp_vocab.json, and checks the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "scan_precomp"


def caption_source() -> list[str]:
    path = SHARED / "f30k_test_caps.txt"
    if path.is_file():
        return path.read_text().split("\n")[:5000]
    rng = np.random.default_rng(0)
    words = "a man woman dog runs on the grass with red ball in park sits near".split()
    return [" ".join(rng.choice(words, size=rng.integers(6, 16))) + " ." for _ in range(5000)]


def write_precomp(folder: Path, n: int, split: str = "train", chunk: int = 250) -> int:
    """Features written chunk by chunk through a memory map; returns their size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    ims = np.lib.format.open_memmap(
        folder / f"{split}_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, 2048)
    )
    rng = np.random.default_rng(0)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        ims[r0:r1] = rng.random((r1 - r0, 36, 2048), dtype=np.float32) * 4
    ims.flush()
    del ims
    caps = caption_source()
    lines = [caps[i % len(caps)] for i in range(5 * n)]
    (folder / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return n * 36 * 2048 * 4


def convert_in_child(src: Path, dest: Path, extra: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `jobs/prepare_data.py precomp` in a child process.

    The peak is the child's VmHWM (high-water mark since exec), polled every 50 ms.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "jobs/prepare_data.py"),
            "precomp",
            str(src),
            "--out",
            str(dest),
            "--overwrite",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
    )
    peak_kb = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"conversion failed with status {proc.returncode}")
    return time.perf_counter() - t0, peak_kb / 1024


def reader_throughput(root: Path, batch_size: int = 128) -> float:
    """One full epoch (stopping early leaves Ray Data's prefetch threads behind)."""
    import ray

    from shan.data.reader import ExampleStream, open_split

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = open_split(str(root), "train")
        stream = ExampleStream(batch_size=batch_size, buffer=1024, seed=0)
        rows = ds.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=4)
        batches = stream(rows)
        next(batches)  # start-up (task launch, first read) is not counted
        t0, n = time.perf_counter(), 0
        for b in batches:
            n += len(b)
        return n / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


def check_real_captions(work: Path) -> None:
    from shan.data.reader import read_split
    from shan.vocab import Vocabulary

    src = work / "f30k_real"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED / "f30k_test_caps.txt", src / "test_caps.txt")
    shutil.copy(SHARED / "f30k_precomp_vocab.json", src / "f30k_precomp_vocab.json")
    rng = np.random.default_rng(1)
    np.save(src / "test_ims.npy", rng.random((1000, 36, 2048), dtype=np.float32))
    dest = work / "f30k_real_out"
    convert_in_child(src, dest, [])
    data = read_split(str(dest), "test")
    lines = (SHARED / "f30k_test_caps.txt").read_text().split("\n")
    lines = lines[:-1] if lines[-1] == "" else lines
    vocab = Vocabulary.load(SHARED / "f30k_precomp_vocab.json")
    per_image = np.bincount(data.caption_image)
    same_text = data.captions == lines
    same_ids = all(t == vocab.encode(c) for t, c in zip(data.tokens, lines))
    unk = sum(t.count(3) for t in data.tokens) / sum(len(t) - 2 for t in data.tokens)
    print(
        f"real captions: {len(data.image_ids)} images, captions per image "
        f"{per_image.min()}..{per_image.max()}, {len(data.captions)} captions; text identical "
        f"to f30k_test_caps.txt: {same_text}; token ids = f30k vocab encoding: {same_ids}; "
        f"vocab size {len(vocab)}; <unk> share {100 * unk:.2f}%; last caption: "
        f"{data.captions[-1]!r}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=7000)
    p.add_argument("--work", default="/tmp/shan-bench-data")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "precomp"
        nbytes = write_precomp(src, args.images)
        seconds, peak = convert_in_child(src, work / "converted", [])
        out_mb = sum(f.stat().st_size for f in (work / "converted").rglob("*.parquet")) / 1e6
        print(
            f"converter: {nbytes / 1e9:.2f} GB of float32 features ({args.images} x 36 x 2048) "
            f"in {seconds:.1f} s = {nbytes / 1e6 / seconds:.0f} MB/s; peak memory "
            f"{peak:.0f} MB; Parquet output {out_mb:.0f} MB (float16, zstd)"
        )
        rate = reader_throughput(work / "converted")
        print(f"reader: {rate:.0f} examples/s for one consumer (batch 128, 36 x 2048 float16)")
        if SHARED.is_dir():
            check_real_captions(work)
        print(
            json.dumps(
                {
                    "converter_mb_s": nbytes / 1e6 / seconds,
                    "peak_mb": peak,
                    "reader_examples_s": rate,
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
