"""README command 1 timed as a new user meets it: ``python jobs/train.py`` in a fresh temporary
working directory (a fresh ``SHAN_DEMO_DATA``, the local MLflow store ``./mlflow.db``, no
``MLFLOW_TRACKING_URI``, a local Ray, Ray Train's storage in that folder), its output
time-stamped line by line, then the phases parsed from that output: start-up, data generation,
MLflow set-up, Ray start-up, Ray Train start-up, each epoch's steps and validation, the end
(best model logged, recall table) and the exit. Prints the phases, the total wall time and the
final dev rsum.

    python benchmarks/demo.py [--keep] [--log FILE] [key=value ...]

Overrides go to the job as they are (``optim.epochs=1``). An epoch's step time is its training
captions over the examples/s that the job prints; the rest of the epoch (validation and the
checkpoint report) is counted as validation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EPOCH = re.compile(
    r"epoch (\d+)/(\d+): loss [\d.]+, dev rsum ([\d.]+) .*?, ([\d.]+) examples/s per worker"
)
BEST = re.compile(r"^Dev recall of the best epoch \((\d+)\)")


def run_demo(work: Path, overrides: list[str]) -> tuple[list[tuple[float, str]], float, int]:
    """Run the demo in ``work``: its time-stamped lines (seconds from the start), the total
    wall time and the exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["SHAN_DEMO_DATA"] = str(work / "demo")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "cluster")])
    env["PYTHONUNBUFFERED"] = "1"
    # Ray Train's storage in the folder too (else ~/ray_results), so that nothing is left
    storage = f"tracking.storage_path={work / 'ray_results'}"
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), storage, *overrides]
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    with subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            print(f"[{t:7.1f}] {line}", end="", flush=True)
        rc = proc.wait()
    return lines, time.perf_counter() - t0, rc


def first(lines: list[tuple[float, str]], pattern: str, after: float = -1.0) -> float | None:
    """The time of the first line after ``after`` that ``pattern`` matches (search)."""
    rx = re.compile(pattern)
    return next((t for t, s in lines if t > after and rx.search(s)), None)


def phases(
    lines: list[tuple[float, str]], total: float, train_captions: int
) -> tuple[list[tuple[str, float]], float | None]:
    """(phase, seconds) in order, and the best epoch's dev rsum."""
    out: list[tuple[str, float]] = []
    gen = first(lines, r"^generating the demo data set")
    gen_end = max((t for t, s in lines if re.search(r"^generate \w+:", s)), default=gen)
    mlflow = first(lines, r"^MLflow: run")
    ray = first(lines, r"^Ray: (starting|connecting)")
    ray_train = first(lines, r"^Ray Train:")
    worker = first(lines, r"rank 0 of \d+ on node")
    best = next((m for _, s in lines if (m := BEST.search(s))), None)
    table = first(lines, BEST.pattern)
    marks = [gen, gen_end, mlflow, ray, ray_train, worker, table]
    if any(m is None for m in marks):
        return [("(run incomplete: phases not found)", total)], None
    assert None not in marks and gen is not None and gen_end is not None and mlflow is not None
    assert ray is not None and ray_train is not None and worker is not None and table is not None
    out.append(("python start-up, imports, config", gen))
    out.append(("data generation", gen_end - gen))
    out.append(("MLflow store and run set-up", mlflow - gen_end))
    out.append(("(driver, to Ray start)", ray - mlflow))
    out.append(("Ray start-up (ray.init)", ray_train - ray))
    out.append(("Ray Train start-up, to the worker's first line", worker - ray_train))
    prev, rsums = worker, {}
    for t, s in lines:
        m = EPOCH.search(s)
        if not m:
            continue
        e, rate = int(m.group(1)), float(m.group(4))
        rsums[e] = float(m.group(3))
        steps = train_captions / rate if rate > 0 else t - prev
        out.append((f"epoch {e}: steps", steps))
        out.append((f"epoch {e}: validation + checkpoint report", t - prev - steps))
        prev = t
    out.append(("end: Ray Train teardown, model logged to MLflow, table", table - prev))
    out.append(("exit: table to process exit", total - table))
    return out, rsums.get(int(best.group(1))) if best else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    p.add_argument("--log", help="also write the time-stamped output to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shan-demo-"))
    load0 = os.getloadavg()
    try:
        lines, total, rc = run_demo(work, args.overrides)
        card = json.loads((work / "demo" / "dataset.json").read_text())
        train_captions = card["splits"]["train"]["captions"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    if args.log:
        Path(args.log).write_text("".join(f"[{t:7.1f}] {s}\n" for t, s in lines))
    table, rsum = phases(lines, total, train_captions)
    print(f"\n# python jobs/train.py {' '.join(args.overrides)}".rstrip())
    print(f"# in {work}{' (kept)' if args.keep else ''}; exit status {rc}")
    loads = " ".join(f"{x:.2f}" for x in load0), " ".join(f"{x:.2f}" for x in load1)
    print(f"# load average (1, 5, 15 min): start {loads[0]}, end {loads[1]}")
    for name, seconds in table:
        print(f"{name:55s} {seconds:7.1f} s")
    print(f"{'total wall time':55s} {total:7.1f} s")
    print(f"final dev rsum (best epoch): {rsum if rsum is not None else 'n/a'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
