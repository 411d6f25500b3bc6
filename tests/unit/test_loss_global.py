"""The paper's recipe on several workers (``loss.negatives_from``): each worker's share of the
global batch, with negatives mined over the whole global batch, gives the one-worker loss and
gradients; mined inside each share (``local``), it gives each share's own loss.

The split of the loss is checked on score matrices alone; the training step is checked with a
real process group: two processes (``torch.multiprocessing`` spawn, gloo on 127.0.0.1), the
worker's model wrapped in DDP as Ray's ``prepare_model`` wraps it, float64 throughout.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import shan.train.worker as worker
from shan.config import Config, LossConfig, ModelConfig, OptimConfig, ScalingConfig
from shan.data.reader import Batch, pad_tokens
from shan.loss import TripletLoss, gather_rows, share_triplet_loss, triplet_loss
from shan.train.worker import LoopSettings, forward, make_worker, train_epoch
from shan.vocab import Vocabulary

WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "woman", "sits"]
IMAGE_OF = [0, 0, 1, 2, 1, 3, 3, 2]  # example -> image: positives inside and across the shares
WORLD, STEPS = 2, 2
UNEVEN = 7  # a global batch that does not divide over the WORLD workers


# -- the split of the loss, on score matrices -----------------------------------------------------
def scores_and_ids(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, b, generator=g, dtype=torch.float64)
    ids = torch.tensor(IMAGE_OF)[torch.randperm(b, generator=g)]
    return scores, ids


@pytest.mark.parametrize("negatives", ["hardest", "all"])
@pytest.mark.parametrize("shares", [1, 2, 4, 8])
def test_the_shares_losses_and_gradients_sum_to_the_global_batchs(negatives, shares):
    s, ids = scores_and_ids()
    s.requires_grad_(True)
    whole = triplet_loss(s, ids, margin=0.5, negatives=negatives)
    (g_whole,) = torch.autograd.grad(whole, s)
    b = len(ids) // shares
    parts = [
        share_triplet_loss(
            s[r * b : (r + 1) * b], s[:, r * b : (r + 1) * b], ids, r * b, margin=0.5,
            negatives=negatives,
        )
        for r in range(shares)
    ]  # fmt: skip
    (g_parts,) = torch.autograd.grad(sum(parts), s)
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)
    assert whole.item() > 0  # the margin makes every term count
    torch.testing.assert_close(g_parts, g_whole, rtol=1e-12, atol=1e-12)


def test_a_share_mines_the_other_shares_captions_and_images():
    """The hardest negative of share 0's image is share 1's caption, and the hardest negative
    of share 0's caption is share 1's image: both count in share 0's loss."""
    s = torch.tensor([[0.5, 0.1, 0.4, 0.9], [0.1, 0.5, 0.1, 0.1], [0.8, 0.1, 0.5, 0.1],
                      [0.1, 0.1, 0.1, 0.5]])  # fmt: skip
    ids = torch.arange(4)
    part = share_triplet_loss(s[:2], s[:, :2], ids, 0, margin=0.2)
    # image 0: hardest caption 3 (0.9) -> 0.6; image 1: 0.1 -> 0; caption 0: hardest image 2
    # (0.8) -> 0.5; caption 1: 0.1 -> 0
    assert part.item() == pytest.approx(0.6 + 0.5)
    assert triplet_loss(s[:2, :2], ids[:2], margin=0.2).item() == pytest.approx(0.0)  # local


def test_per_step_shares_sum_to_the_global_batchs_too():
    s, ids = scores_and_ids()
    steps = {k: s + i for i, k in enumerate(("total", "l2l", "g2l", "g2g"))}
    loss = TripletLoss(LossConfig(per_step=True, margin=0.5))
    rows = {k: v[:4] for k, v in steps.items()}
    cols = {k: v[:, :4] for k, v in steps.items()}
    rest_rows, rest_cols = (
        {k: v[4:] for k, v in steps.items()},
        {k: v[:, 4:] for k, v in steps.items()},
    )
    total = loss.share(rows, cols, ids, 0) + loss.share(rest_rows, rest_cols, ids, 4)
    assert total.item() == pytest.approx(loss(steps, ids).item(), rel=1e-12)
    only_total = TripletLoss(LossConfig(margin=0.5)).share(rows, cols, ids, 0)
    assert loss.share(rows, cols, ids, 0).item() > only_total.item()


def test_share_shapes_are_checked():
    s, ids = scores_and_ids()
    with pytest.raises(ValueError, match="expected rows"):
        share_triplet_loss(s[:4], s[:, :3], ids, 0)
    with pytest.raises(ValueError, match="expected rows"):
        share_triplet_loss(s[:4], s[:, :4], ids, 5)


def test_without_a_process_group_gather_is_the_identity():
    x = torch.randn(3, 2)
    assert gather_rows(x) is x


# -- a training step on two workers ---------------------------------------------------------------
def config(negatives_from: str, batch: int = len(IMAGE_OF)) -> Config:
    """No clipping that acts (it would hide a wrong gradient scale), several score blocks."""
    return Config(
        name="global",
        seed=5,
        model=ModelConfig(feature_dim=12, d=16, word_dim=6, d_a=8),
        loss=LossConfig(margin=0.5, negatives_from=negatives_from),
        optim=OptimConfig(batch_size=batch, lr=1e-2, grad_clip=1e9),
        scaling=ScalingConfig(score_block=3),
    ).validate()


def settings(cfg: Config) -> LoopSettings:
    return LoopSettings(
        config=cfg, vocab=Vocabulary(WORDS), glove=None, mlflow_uri="", mlflow_run_id="",
        fit_token="", data_root="", torch_threads=1, train_captions=0,
    )  # fmt: skip


def examples(rows: list[int]) -> Batch:
    """The examples ``rows`` of the global batch, padded to their own longest caption (share
    1 holds the longest one, so the shares' token widths differ)."""
    vocab = Vocabulary(WORDS)
    rng = np.random.default_rng(11)
    images = rng.normal(size=(4, 5, 12))
    counts = np.array([5, 3, 4, 2])
    sizes = [2, 3, 4, 2, 3, 4, 8, 3]  # words of each caption; example 6 is the longest
    captions = [
        [vocab("<start>"), *rng.integers(4, len(vocab), size=n).tolist(), vocab("<end>")]
        for n in sizes
    ]
    tokens, lengths = pad_tokens([captions[i] for i in rows])
    image = np.array(IMAGE_OF)[rows]
    return Batch(
        features=torch.from_numpy(images[image]),  # float64
        num_regions=torch.from_numpy(counts[image]),
        tokens=tokens,
        lengths=lengths,
        image_ids=torch.from_numpy(100 + image),
    )


def share(rank: int, batch: int = len(IMAGE_OF)) -> list[int]:
    """Rank ``rank``'s examples of a global batch of the first ``batch`` examples, shared out as
    the training does (``OptimConfig.batch_shares``: rank 0 takes one more when it is odd)."""
    sizes = OptimConfig(batch_size=batch).batch_shares(WORLD)
    start = sum(sizes[:rank])
    return list(range(start, start + sizes[rank]))


class NoLogger:
    def __init__(self, uri: str, run_id: str) -> None:
        pass


def steps(w: worker.Worker, batch: Batch) -> list[tuple[float, list[torch.Tensor]]]:
    """The loss and the (DDP-averaged) gradients of STEPS steps of the worker's loop."""
    out = []
    for _ in range(STEPS):
        (loss,) = train_epoch(w, [batch], steps_hint=1).losses
        out.append((loss, [p.grad.clone() for p in w.core.parameters() if p.requires_grad]))
    return out


def one_worker(cfg: Config) -> worker.Worker:
    w = make_worker(settings(cfg), torch.device("cpu"), rank=1, world=1)  # rank 1: no MLflow
    w.core.double()
    return w


def two_workers_child(rank: int, port: int, out: str) -> None:
    """One of the two ranks: STEPS steps on its share in each mode, saved to ``out``."""
    torch.set_num_threads(1)
    worker.MetricLogger = NoLogger  # rank 0 would reach MLflow
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        results = {}
        for mode in ("global", "local"):
            w = make_worker(settings(config(mode)), torch.device("cpu"), rank, WORLD,
                            wrap=lambda m: DistributedDataParallel(m.double()))  # fmt: skip
            results[mode] = steps(w, examples(share(rank)))
        w = make_worker(settings(config("global", UNEVEN)), torch.device("cpu"), rank, WORLD,
                        wrap=lambda m: DistributedDataParallel(m.double()))  # fmt: skip
        results["uneven"] = steps(w, examples(share(rank, UNEVEN)))  # 4 + 3 examples
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> list[dict]:
    """Both ranks' results (spawned once for the module's tests)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(two_workers_child, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_global_negatives_on_two_workers_are_one_worker_on_the_whole_batch(two_workers):
    """Each rank logs the whole batch's loss, and DDP's averaged gradient is the one-worker
    gradient of the whole batch, step after step."""
    alone = steps(one_worker(config("global")), examples(list(range(len(IMAGE_OF)))))
    assert alone[1][0] != alone[0][0]  # the first step changed the weights
    for rank in range(WORLD):
        for (loss, grads), (want_loss, want_grads) in zip(two_workers[rank]["global"], alone):
            assert loss == pytest.approx(want_loss, rel=1e-9)
            assert_same(grads, want_grads)


def test_unequal_shares_are_one_worker_on_the_whole_batch_too(two_workers):
    """A global batch of 7 on 2 workers (shares of 4 and 3, as an elastic group splits it):
    the gather pads and cuts the shares, each rank mines the whole batch, and the loss and the
    averaged gradient are one worker's on the 7 examples."""
    assert [len(share(r, UNEVEN)) for r in range(WORLD)] == [4, 3]
    alone = steps(one_worker(config("global", UNEVEN)), examples(list(range(UNEVEN))))
    for rank in range(WORLD):
        for (loss, grads), (want_loss, want_grads) in zip(two_workers[rank]["uneven"], alone):
            assert loss == pytest.approx(want_loss, rel=1e-9)
            assert_same(grads, want_grads)


def test_local_negatives_are_each_shares_own_loss(two_workers):
    """``local``: each rank logs the sum of the shares' own losses, and the averaged gradient is
    the gradient of that sum; it is not the global batch's loss (its hardest negatives lie in
    the other share)."""
    parts = []
    for rank in range(WORLD):
        w = one_worker(config("local"))
        loss = forward(w, examples(share(rank)))
        loss.backward()
        parts.append((loss.item(), [p.grad for p in w.core.parameters() if p.requires_grad]))
    want_loss = sum(loss for loss, _ in parts)
    want_grads = [a + b for a, b in zip(parts[0][1], parts[1][1])]
    global_loss = two_workers[0]["global"][0][0]
    for rank in range(WORLD):
        loss, grads = two_workers[rank]["local"][0]
        assert loss == pytest.approx(want_loss, rel=1e-9)
        assert_same(grads, want_grads)
        assert loss < global_loss - 1e-3  # mined in half the batch: fewer violations


def test_one_worker_is_the_same_in_both_modes():
    """With one worker there is nothing to gather: both modes are today's loss."""
    batch = examples(list(range(len(IMAGE_OF))))
    glob, local = (steps(one_worker(config(m)), batch) for m in ("global", "local"))
    for (a, ga), (b, gb) in zip(glob, local):
        assert a == b
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_the_batch_of_each_share_is_padded_to_its_own_longest_caption():
    """(The test's own data: the shares' token widths differ, so the gather must pad them.)"""
    widths = {examples(share(r)).tokens.shape[1] for r in range(WORLD)}
    assert len(widths) == WORLD
