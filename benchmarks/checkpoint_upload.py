"""The per-epoch stall of a checkpoint to S3: how long a training worker is blocked in
``ray.train.report`` with ``tracking.checkpoint_upload: sync`` against ``async``.

A real Ray Train run (one worker, a local Ray instance) reports a real SHAN checkpoint (weights,
Adam state, config, vocabulary: :func:`shan.train.worker.report`) after each "epoch" to a
real S3 endpoint (moto's server on 127.0.0.1, as ``cluster/shan_stack.py`` starts it). An
epoch is ``--epoch-seconds`` of sleep, standing for the steps of a GPU epoch that leave the
CPUs free. ``--d`` sizes the model, and so the checkpoint (the f30k model is ``--d 1024``).
Both modes run in one invocation, one after the other, so that their ratio is measured under
the same load. It also checks that every checkpoint of the async run reached S3 and that
``result.best_checkpoints`` lists them.

    python benchmarks/checkpoint_upload.py [--d 512] [--epochs 4] [--epoch-seconds 4]
        [--out benchmarks/results/checkpoint_upload_cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import shan_stack

from shan.config import Config, ModelConfig, TrackingConfig
from shan.runtime import keep_ray_on_loopback
from shan.vocab import Vocabulary


def loop(config: dict) -> None:
    """One worker: ``epochs`` times, sleep for an epoch's steps, then report a checkpoint and
    record the seconds spent in ``report``."""
    import torch

    from shan.train import worker

    cfg: Config = config["cfg"]
    settings = worker.LoopSettings(
        config=cfg, vocab=config["vocab"], glove=None, mlflow_uri="", mlflow_run_id="",
        fit_token="", data_root="", torch_threads=1, train_captions=0,
    )  # fmt: skip
    w = worker.make_worker(settings, torch.device("cpu"), rank=0, world=1)
    w.logger = None  # nothing goes to MLflow here
    for p in w.core.parameters():  # Adam's state, as after a real step: a full-size checkpoint
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    w.optimizer.step()
    stalls = []
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_seconds"])  # the epoch's steps
        w.state.epoch, w.state.step = epoch, epoch * 100
        t0 = time.perf_counter()
        worker.report(w, {"epoch": epoch, "step": epoch * 100, "val/rsum": float(epoch)})
        stalls.append(time.perf_counter() - t0)
    Path(config["out"]).write_text(json.dumps(stalls))


def run(mode: str, args: argparse.Namespace, storage: str, work: Path) -> dict:
    """One training with ``tracking.checkpoint_upload: mode``: its stalls and checkpoints."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = Config(
        name="bench",
        model=ModelConfig(feature_dim=2048, d=args.d, word_dim=300, d_a=256),
        tracking=TrackingConfig(checkpoint_upload=mode),
    ).validate()
    out = work / f"{mode}.json"
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "cfg": cfg,
            "vocab": Vocabulary([f"w{i}" for i in range(args.vocab)]),
            "epochs": args.epochs,
            "epoch_seconds": args.epoch_seconds,
            "out": str(out),
        },  # fmt: skip
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(
            name=f"bench-{mode}-{secrets.token_hex(3)}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # moto keeps them in memory
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    kept = sorted(m["epoch"] for _, m in result.best_checkpoints)
    return {
        "stalls": json.loads(out.read_text()), "wall": wall, "kept": kept,
        "latest": result.checkpoint.path,
    }  # fmt: skip


def checkpoint_mb(path: str) -> float:
    """The size of the checkpoint at ``path`` in S3 (bucket/key), in MB."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1", scheme="http"
    )
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size or 0 for i in infos) / 1e6


def report_text(args: argparse.Namespace, results: dict[str, dict], size: float) -> str:
    sync, asyn = (statistics.mean(results[m]["stalls"]) for m in ("sync", "async"))
    lines = [
        f"# benchmarks/checkpoint_upload.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"# machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}; "
        f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"# one worker, local Ray; storage s3:// on moto_server (127.0.0.1); model d={args.d} "
        f"(checkpoint {size:.0f} MB: weights, Adam state, config, vocabulary); {args.epochs} "
        f"epochs of {args.epoch_seconds:g} s of sleep each",
        "",
        "mode   stall per epoch (s): mean  each epoch                     run wall (s)",
    ]
    for mode in ("sync", "async"):
        r = results[mode]
        each = " ".join(f"{s:.2f}" for s in r["stalls"])
        lines.append(
            f"{mode:<6} {statistics.mean(r['stalls']):>26.2f}  {each:<30} {r['wall']:>12.1f}"
        )
    lines += [
        "",
        f"async stalls {sync / asyn:.1f} times less than sync ({sync:.2f} s -> {asyn:.2f} s an "
        "epoch: the local save and Ray's barrier are left; the upload runs beside the steps)",
        f"async: result.best_checkpoints lists epochs {results['async']['kept']} (num_to_keep "
        f"2); the last one listed in S3: {size:.0f} MB",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=512, help="model.d (the checkpoint's size)")
    p.add_argument("--vocab", type=int, default=10000, help="vocabulary size")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--epoch-seconds", type=float, default=4.0)
    p.add_argument("--out", help="also write the results to this file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shan-bench-ckpt-"))
    env, s3_pid = shan_stack.start_s3(work)
    os.environ.update(env)  # the local Ray instance and its workers inherit them
    keep_ray_on_loopback()
    try:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        storage = f"s3://{shan_stack.BUCKET}/bench-checkpoints"
        results = {mode: run(mode, args, storage, work) for mode in ("sync", "async")}
        text = report_text(args, results, checkpoint_mb(results["async"]["latest"]))
    finally:
        import ray

        ray.shutdown()
        os.killpg(s3_pid, signal.SIGTERM)  # moto runs in a session of its own
        shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
