"""The first stage of retrieve-then-rerank, measured: how often each query's match is among the
first stage's top K, for several ways of making the vectors, and what each costs.

    PYTHONPATH=. .venv/bin/python benchmarks/first_stage.py --model DIR --data ROOT \\
        [--split test] [--distill 5x128-attention 5x128 5x128@256 3x128+kl] \\
        [--exhaustive EVAL_DIR [--rerank-k 100]]

``--model`` is a checkpoint trained with a first stage (``model.first_stage_dim`` > 0), e.g. the
demo's; ``--data`` the data set it was trained on. The variants, each giving a (N, D) image and
a (C, D) caption matrix of unit vectors, scored by inner product:

- ``mean(v), mean(t)``: no parameters: the masked mean of SHAN's region and word embeddings.
- ``mean(vp), mean(tp)``: no parameters: the same of SHAN's L2L projections.
- ``joint``: the checkpoint's own head, trained beside SHAN on detached encodings
  (``shan.loss.first_stage_loss``, what training does; its pool is the checkpoint's).
- ``distilled`` (``--distill EPOCHSxBATCH[-max|-attention][@D]``): a fresh head fitted
  afterwards on the frozen SHAN's encodings of the train split, with the same loss: ``2x16`` is
  the joint head's budget (2 epochs of the demo's batch of 16), on the final encodings instead
  of moving ones; ``-max`` (the default) the max pool of projected fragments, ``-attention``
  the attention pool (``shan.model.FirstStage``); ``@D`` its size (default: the model's).
- ``distilled + KL`` (``EPOCHSxBATCH+kl``): the same, plus the KL divergence from SHAN's own
  in-batch total scores (softmax over each caption's images and each image's captions).

Recall is over the split: a caption query finds its image in the top K of the N images; an
image query finds any of its captions in the top K of the C captions. Cost: ``joint`` adds its
head's step to each of training's steps (measured here on the demo's batch of 16 and multiplied
by the recipe's steps, in CPU time: the machine may be shared); ``distilled`` is its fitting
time; the split's encoding is the same for every variant.

``--exhaustive DIR`` (the model's ``shan evaluate --split test --out DIR``, or any model with
the same SHAN weights: a head fitted afterwards leaves them as they are) adds a second table:
each variant's rerank recall at ``--rerank-k``, minus the exhaustive recall, computed from
``DIR/sims_total.npy`` without rescoring (:func:`rerank_from_exhaustive`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shan.checkpoint import load_model
from shan.data.reader import pad_tokens, read_split
from shan.loss import first_stage_loss
from shan.metrics import recall_metrics, sparse_recall_metrics
from shan.model import SHAN, FirstStage, l2norm, masked_mean

KS = (1, 5, 10, 50, 100)
Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # v, v_mask, t, t_mask


@torch.no_grad()
def encode(model: SHAN, root: str, split: str, max_words: int) -> tuple[Encoded, np.ndarray]:
    """The split's encodings, v (N, k, d), v_mask (N, k), t (C, n, d), t_mask (C, n), and each
    caption's image row (C,)."""
    s = read_split(root, split, max_words=max_words)
    feats = torch.from_numpy(np.asarray(s.features, dtype=np.float32))
    v, v_mask = model.embed_images(feats, torch.from_numpy(np.asarray(s.num_regions)))
    tokens, lengths = pad_tokens(s.tokens)  # (C, n): every caption as wide
    parts = [model.embed_captions(tokens[c0 : c0 + 2048], lengths[c0 : c0 + 2048])
             for c0 in range(0, len(tokens), 2048)]  # fmt: skip
    t, t_mask = torch.cat([x for x, _ in parts]), torch.cat([m for _, m in parts])
    return (v, v_mask, t, t_mask), np.asarray(s.caption_image)


def means(enc: Encoded, model: SHAN, projected: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """No parameters: masked means of v and t (or of their L2L projections), unit length."""
    v, v_mask, t, t_mask = enc
    if projected:
        v, t = l2norm(model.proj_v(v)), l2norm(model.proj_t(t))
    images = l2norm(masked_mean(v, v_mask[..., None], 1))  # (N, d)
    return images, l2norm(masked_mean(t, t_mask[..., None], 1))  # (C, d)


@torch.no_grad()
def head_vectors(head: FirstStage, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image and (C, D) caption vectors of a head."""
    v, v_mask, t, t_mask = enc
    return head.images(v, v_mask), head.captions(t, t_mask)


def recall(images: torch.Tensor, captions: torch.Tensor, caption_image: np.ndarray) -> dict:
    """Recall@K of caption queries (their image in the top K of N) and image queries (any of
    their captions in the top K of C), in percent."""
    sims = (captions @ images.T).numpy()  # (C, N)
    rows = np.arange(len(sims))
    own = sims[rows, caption_image][:, None]
    t2i_rank = (sims > own).sum(1)  # (C,) images scored above the caption's own
    i2t = sims.T  # (N, C)
    best = np.full(len(i2t), np.inf)
    for c, i in enumerate(caption_image):  # rank of each caption among its image's queries
        best[i] = min(best[i], (i2t[i] > i2t[i, c]).sum())
    return {
        "t2i": {k: 100.0 * float((t2i_rank < k).mean()) for k in KS},
        "i2t": {k: 100.0 * float((best < k).mean()) for k in KS},
    }


@dataclass(frozen=True)
class Spec:
    """One distilled variant: ``EPOCHSxBATCH``, ``+kl`` for the KL term, ``-attention`` for
    the attention-pool head (default: ``-max``), ``@D`` for its size (default: the model's
    first_stage_dim): ``5x128``, ``3x128+kl-attention``, ``5x128@256``."""

    epochs: int
    batch: int
    kl: bool
    pool: str = "max"
    dim: int | None = None

    @classmethod
    def parse(cls, text: str) -> Spec:
        m = re.fullmatch(r"(\d+)x(\d+)(\+kl)?(?:-(max|attention))?(?:@(\d+))?", text)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 2 or m.group(5) == "0":
            raise argparse.ArgumentTypeError(
                f"not EPOCHSxBATCH[+kl][-max|-attention][@D]: {text!r}"
            )
        dim = int(m.group(5)) if m.group(5) else None
        return cls(int(m.group(1)), int(m.group(2)), bool(m.group(3)), m.group(4) or "max", dim)

    def __str__(self) -> str:
        size = f", D {self.dim}" if self.dim else ""
        kl = " + KL" if self.kl else ""
        return f"distilled{kl}, {self.pool}{size}, {self.epochs} epochs of {self.batch}"


def batches(caption_image: np.ndarray, batch: int, rng: np.random.Generator):
    """Shuffled caption rows in batches of ``batch`` (the last, short one dropped)."""
    order = rng.permutation(len(caption_image))
    for b0 in range(0, len(order) - batch + 1, batch):
        yield torch.from_numpy(order[b0 : b0 + batch])


def kl_to_shan(
    model: SHAN, enc: Encoded, rows: torch.Tensor, caption_image: np.ndarray, logits: torch.Tensor
) -> torch.Tensor:
    """KL(SHAN's in-batch total scores || the head's), both directions: the batch's captions
    ``rows`` against their images; ``logits`` (B, B) the head's, caption by image."""
    v, v_mask, t, t_mask = enc
    img = torch.from_numpy(caption_image[rows.numpy()])
    with torch.no_grad():
        scores = model.score(model.image_terms(v[img], v_mask[img]),
                             model.caption_terms(t[rows], t_mask[rows]))["total"]  # fmt: skip
        teacher = scores.T / 0.05  # (B captions, B images), SHAN's scores at the head's tau
    kl = F.kl_div(
        F.log_softmax(logits, 1), F.log_softmax(teacher, 1), reduction="batchmean", log_target=True
    )
    kl_t = F.kl_div(
        F.log_softmax(logits.T, 1),
        F.log_softmax(teacher.T, 1),
        reduction="batchmean",
        log_target=True,
    )
    return 0.5 * (kl + kl_t)


def distill(model: SHAN, train: tuple[Encoded, np.ndarray], spec: Spec, args) -> FirstStage:
    """A fresh head fitted on the frozen model's train encodings: ``spec.epochs`` passes of
    ``spec.batch`` pairs, Adam at ``--lr``, the first stage's loss (plus the KL to SHAN's
    in-batch scores when ``spec.kl``)."""
    enc, caption_image = train
    v, v_mask, t, t_mask = enc
    cfg = model.cfg
    torch.manual_seed(args.seed)
    head = FirstStage(cfg.d, cfg.d_a, spec.dim or cfg.first_stage_dim, spec.pool)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    tau = args.tau
    for _ in range(spec.epochs):
        for rows in batches(caption_image, spec.batch, rng):
            img = torch.from_numpy(caption_image[rows.numpy()])
            im, cap = head.images(v[img], v_mask[img]), head.captions(t[rows], t_mask[rows])
            loss = first_stage_loss(im, cap, img, tau)
            if spec.kl:
                loss = loss + kl_to_shan(model, enc, rows, caption_image, cap @ im.T / tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def joint_step_cost(model: SHAN, train: tuple[Encoded, np.ndarray], batch: int) -> float:
    """CPU seconds of one training step's head work (forward, backward, Adam) on ``batch``
    pairs: what training with a first stage adds to each step."""
    enc, caption_image = train
    v, v_mask, t, t_mask = enc
    m = model.cfg
    head = FirstStage(m.d, m.d_a, m.first_stage_dim, m.first_stage_pool)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    n, t0 = 0, 0.0
    for i, rows in enumerate(batches(caption_image, batch, rng)):
        if i == 20:
            t0 = time.process_time()  # after a warm-up
        img = torch.from_numpy(caption_image[rows.numpy()])
        loss = first_stage_loss(
            head.images(v[img], v_mask[img]), head.captions(t[rows], t_mask[rows]), img, 0.05
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += i >= 20
        if n == 200:
            break
    return (time.process_time() - t0) / max(n, 1)


RERANK_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def rerank_from_exhaustive(
    sims: np.ndarray, caption_image: np.ndarray, images: torch.Tensor, captions: torch.Tensor,
    k: int,
) -> dict[str, float]:  # fmt: skip
    """The recall of a rerank at ``k`` without rescoring: sims (N, C) SHAN's exhaustive total
    scores (``shan evaluate``'s sims_total.npy), images (N, D) and captions (C, D) the first
    stage's vectors. A rerank only changes which rows are a query's candidates; each candidate
    keeps its exhaustive score, so its metrics are :func:`shan.metrics.sparse_recall_metrics`
    of the first stage's top ``k`` with those scores (checked against a real ``shan evaluate
    --rerank 100``: the same to the digit, benchmarks/results/first_stage_cpu.txt)."""
    s = captions @ images.T  # (C, N)
    t2i = torch.topk(s, min(k, s.shape[1]), 1).indices.numpy()  # (C, k) image rows
    i2t = torch.topk(s.T, min(k, s.shape[0]), 1).indices.numpy()  # (N, k) caption rows
    t2i_scores = np.take_along_axis(sims.T, t2i, 1)
    i2t_scores = np.take_along_axis(sims, i2t, 1)
    return sparse_recall_metrics((t2i, t2i_scores), (i2t, i2t_scores), caption_image)


def rerank_row(name: str, got: dict, exhaustive: dict) -> str:
    diffs = " | ".join(f"{got[k] - exhaustive[k]:+.2f}" for k in RERANK_KEYS)
    return f"| {name} | {diffs} |"


def table_row(name: str, r: dict, cost: str) -> str:
    t2i = " | ".join(f"{r['t2i'][k]:5.1f}" for k in KS)
    i2t = " | ".join(f"{r['i2t'][k]:5.1f}" for k in KS)
    return f"| {name} | {t2i} | {i2t} | {cost} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint folder with a first stage")
    p.add_argument("--data", required=True, help="its data set's root")
    p.add_argument("--split", default="test")
    p.add_argument(
        "--distill",
        nargs="*",
        type=Spec.parse,
        default=[Spec(5, 128, False, "attention"), Spec(5, 128, False)],
        metavar="EPOCHSxBATCH[+kl][-max|-attention][@D]",
        help="distilled variants (default: 5x128-attention 5x128)",
    )
    p.add_argument(
        "--exhaustive",
        metavar="DIR",
        help="the model's exhaustive `shan evaluate` of the split (sims_total.npy): adds each "
        "variant's rerank recall at --rerank-k, minus the exhaustive's",
    )
    p.add_argument("--rerank-k", type=int, default=100, metavar="K")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, cfg = loaded.model, loaded.config
    if model.first_stage is None:
        print(f"error: {args.model} has no first stage (model.first_stage_dim is 0)")
        return 2
    args.tau = cfg.loss.first_stage_temperature
    print(f"# {' '.join(['benchmarks/first_stage.py', *sys.argv[1:]])}")
    load = os.getloadavg()[0]
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"threads, torch {torch.__version__}; load average {load:.1f} at the start")  # fmt: skip
    m, o = cfg.model, cfg.optim
    print(f"# model: {args.model} (d {m.d}, first_stage_dim {m.first_stage_dim}, tau "
          f"{args.tau}, trained {o.epochs} epochs of batch {o.batch_size})")  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    test = encode(model, args.data, args.split, cfg.data.max_words)
    enc_s, enc_cpu = time.perf_counter() - t0, time.process_time() - c0
    n, c = len(test[0][0]), len(test[0][2])
    print(f"# split {args.split}: {n} images, {c} captions; encoded (SHAN's encoders) in "
          f"{enc_s:.1f} s ({enc_cpu:.1f} CPU-s)")  # fmt: skip
    rows = []
    for name, projected in (("mean(v), mean(t)", False), ("mean(vp), mean(tp)", True)):
        with torch.no_grad():
            rows.append(table_row(name, recall(*means(test[0], model, projected), test[1]), "0"))
    train = encode(model, args.data, "train", cfg.data.max_words)
    steps = math.ceil(len(train[1]) / cfg.optim.batch_size) * cfg.optim.epochs
    per_step = joint_step_cost(model, train, cfg.optim.batch_size)
    cost = f"{per_step * 1e3:.1f} CPU-ms x {steps} steps = {per_step * steps:.1f} CPU-s in training"
    sims = np.load(Path(args.exhaustive) / "sims_total.npy") if args.exhaustive else None
    exhaustive = recall_metrics(sims, test[1]) if sims is not None else {}
    reranks = []

    def add(name: str, head: FirstStage, cost: str) -> None:
        vectors = head_vectors(head, test[0])
        rows.append(table_row(name, recall(*vectors, test[1]), cost))
        if sims is not None:
            got = rerank_from_exhaustive(sims, test[1], *vectors, args.rerank_k)
            reranks.append(rerank_row(name, got, exhaustive))

    add(f"joint ({model.cfg.first_stage_pool})", model.first_stage, cost)
    for spec in args.distill:
        t0, c0 = time.perf_counter(), time.process_time()
        head = distill(model, train, spec, args)
        fit, cpu = time.perf_counter() - t0, time.process_time() - c0
        add(str(spec), head, f"{fit:.1f} s ({cpu:.1f} CPU-s) after training")
    ks = " | ".join(f"R@{k}" for k in KS)
    print(f"\n| first stage | t2i {ks} | i2t {ks} | cost |")
    print("|---" * (2 + 2 * len(KS)) + "|")
    print("\n".join(rows))
    if sims is not None:
        ex = " | ".join(f"{exhaustive[k]:.2f}" for k in RERANK_KEYS)
        print(f"\n# rerank at K={args.rerank_k} minus exhaustive (points), from {args.exhaustive}"
              f"/sims_total.npy; exhaustive: {ex}")  # fmt: skip
        print("\n| first stage | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |")
        print("|---" * 8 + "|")
        print("\n".join(reranks))
    print(f"\n# load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
