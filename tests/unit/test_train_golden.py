"""Golden losses: 20 real training steps of a tiny SHAN on a fixed batch (CPU, float32, one
thread) must give the losses recorded in ``golden_losses.json``.

A change to the model, the loss, the optimizer step, the schedule or the worker's step changes
them. When such a change is meant, regenerate the file and commit it with the change::

    python tests/unit/test_train_golden.py        # from the repository root; writes the JSON
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

if __name__ == "__main__":  # a script: this checkout's shan, not an installed one
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shan.config import (  # noqa: E402
    Config,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScalingConfig,
    config_from_dict,
)
from shan.data.reader import Batch, pad_tokens  # noqa: E402
from shan.train.worker import LoopSettings, make_worker, train_epoch  # noqa: E402
from shan.vocab import Vocabulary  # noqa: E402

GOLDEN = Path(__file__).with_name("golden_losses.json")
STEPS, STEPS_PER_EPOCH = 20, 5
# float32 on another CPU (other SIMD kernels) drifts: up to 4.3e-5 relative over the 20 steps
# on an AVX-512 AMD EPYC against the recording machine; a change to the recipe moves them more
RTOL = 1e-4
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "woman", "sits"]
BATCH = {"images": 4, "captions_per_image": 2, "regions": 5, "seed": 1234}


def golden_config() -> Config:
    """Small enough for a second of CPU; a warm-up, a decay and more than one score block, so
    the schedule and the blocked scorer take part."""
    return Config(
        name="golden",
        seed=7,
        model=ModelConfig(feature_dim=12, d=16, word_dim=6, d_a=8),
        loss=LossConfig(margin=0.2, negatives="hardest"),
        optim=OptimConfig(
            epochs=STEPS // STEPS_PER_EPOCH,
            batch_size=8,
            lr=2e-3,
            lr_decay_epoch=2,
            lr_decay=0.1,
            warmup_steps=3,
            grad_clip=2.0,
        ),
        scaling=ScalingConfig(score_block=4),
    ).validate()


def golden_batch(cfg: Config, vocab: Vocabulary) -> Batch:
    """Captions_per_image examples per image (positives of each other), padded regions and
    captions of several lengths."""
    rng = np.random.default_rng(BATCH["seed"])
    ni, per, k = BATCH["images"], BATCH["captions_per_image"], BATCH["regions"]
    images = rng.normal(size=(ni, k, cfg.model.feature_dim)).astype(np.float32)
    counts = rng.integers(2, k + 1, size=ni)
    start, end = vocab("<start>"), vocab("<end>")
    captions = [
        [start, *rng.integers(4, len(vocab), size=int(rng.integers(2, 7))).tolist(), end]
        for _ in range(ni * per)
    ]
    tokens, lengths = pad_tokens(captions)
    rows = np.repeat(np.arange(ni), per)
    return Batch(
        features=torch.from_numpy(images[rows]),
        num_regions=torch.from_numpy(counts[rows]),
        tokens=tokens,
        lengths=lengths,
        image_ids=torch.from_numpy(100 + rows),
    )


@contextmanager
def deterministic_cpu():
    """One thread and deterministic kernels while the steps run; the previous settings after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def compute_losses(
    cfg: Config | None = None, steps: int = STEPS, device: str = "cpu"
) -> list[float]:
    """The losses of ``steps`` steps of the worker's epoch loop, ``STEPS_PER_EPOCH`` of the
    batch an epoch (``device="cuda"``: the GPU check compares them with the recorded CPU
    ones)."""
    cfg = cfg or golden_config()
    vocab = Vocabulary(WORDS)
    settings = LoopSettings(
        config=cfg,
        vocab=vocab,
        glove=None,
        mlflow_uri="",
        mlflow_run_id="",
        fit_token="",
        data_root="",
        torch_threads=1,
        train_captions=0,
    )
    batch = golden_batch(cfg, vocab)
    with deterministic_cpu() if device == "cpu" else nullcontext():
        # rank 1: no MetricLogger, so no MLflow; world 1: no process group, no DDP
        w = make_worker(settings, torch.device(device), rank=1, world=1)
        assert w.logger is None
        losses: list[float] = []
        while len(losses) < steps:
            w.state.epoch = len(losses) // STEPS_PER_EPOCH
            n = min(STEPS_PER_EPOCH, steps - len(losses))
            losses += train_epoch(w, [batch] * n, steps_hint=n).losses
    return losses


def record() -> dict:
    cfg = golden_config()
    return {
        "about": "regenerate with `python tests/unit/test_train_golden.py`",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "steps": STEPS,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "batch": BATCH,
        "vocab": WORDS,
        "config": cfg.to_dict(),
        "losses": compute_losses(cfg),
    }


def mismatch(got: list[float], want: list[float]) -> str | None:
    """Why ``got`` is not ``want`` within RTOL (None: it is)."""
    if len(got) != len(want):
        return f"{len(got)} losses, {len(want)} recorded"
    bad = [
        f"step {i}: {g!r} != {w!r}"
        for i, (g, w) in enumerate(zip(got, want))
        if not np.isclose(g, w, rtol=RTOL, atol=0.0)
    ]
    return None if not bad else f"{len(bad)} of {len(want)} losses differ: " + "; ".join(bad[:5])


# -- tests ----------------------------------------------------------------------------------------
def test_the_recorded_run_is_this_run():
    """The JSON describes the config and batch this file builds (else it is stale)."""
    doc = json.loads(GOLDEN.read_text())
    assert config_from_dict(doc["config"]) == golden_config()
    assert (doc["steps"], doc["steps_per_epoch"], doc["batch"], doc["vocab"]) == (
        STEPS,
        STEPS_PER_EPOCH,
        BATCH,
        WORDS,
    )
    losses = doc["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # it learns the batch


def test_losses_match_the_golden_record():
    doc = json.loads(GOLDEN.read_text())
    why = mismatch(compute_losses(), doc["losses"])
    assert why is None, (
        f"{why}\nrecorded with torch {doc['torch']}, numpy {doc['numpy']}; running torch "
        f"{torch.__version__}, numpy {np.__version__}. If the change is meant (or only torch "
        "changed), regenerate: python tests/unit/test_train_golden.py"
    )


def test_the_comparison_notices_a_small_change(monkeypatch):
    """The same run with the loss margin moved by 0.01 does not pass (the check has teeth)."""
    import shan.loss

    original = shan.loss.triplet_loss

    def shifted(scores, image_ids, margin=0.2, negatives="hardest"):
        return original(scores, image_ids, margin + 0.01, negatives)

    monkeypatch.setattr(shan.loss, "triplet_loss", shifted)
    doc = json.loads(GOLDEN.read_text())
    assert mismatch(compute_losses(steps=3), doc["losses"][:3]) is not None


if __name__ == "__main__":
    doc = record()
    GOLDEN.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {len(doc['losses'])} losses, torch {doc['torch']}")
    print(" ".join(f"{x:.6g}" for x in doc["losses"]))
