"""The images x captions matrix as tiles: the plan, the store that persists finished tiles
(local or ``s3://``), and the pool of Ray actors that scores them.

Images and captions are encoded once (a chunk per tile row or column, shared out among the
actors); a tile is scored from the encodings of its row and column, so an actor's memory is
bounded by the tile size, not by the split. Each finished tile is written under the output
location at once; a rerun with the same location skips the tiles already there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shan.data import fs
from shan.errors import JobError

SCORES = ("total", "l2l", "g2l", "g2g")


@dataclass
class Plan:
    """How the (images, captions) matrix is cut. Columns follow ``caption_order`` (captions
    sorted by length, so a tile carries little padding)."""

    n_images: int
    n_captions: int
    tile_images: int
    tile_captions: int
    caption_order: list[int]
    fingerprint: str  # model(s) + data: tiles of another evaluation are never reused

    @property
    def shape(self) -> tuple[int, int]:
        return -(-self.n_images // self.tile_images), -(-self.n_captions // self.tile_captions)

    def tiles(self) -> list[tuple[int, int]]:
        rows, cols = self.shape
        return [(r, c) for r in range(rows) for c in range(cols)]

    def rows(self, r: int) -> slice:
        return slice(r * self.tile_images, min(self.n_images, (r + 1) * self.tile_images))

    def cols(self, c: int) -> np.ndarray:
        order = self.caption_order
        return np.asarray(order[c * self.tile_captions : (c + 1) * self.tile_captions])


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:16]


class TileStore:
    """``ROOT/plan.json`` and one ``.npz`` per finished tile."""

    def __init__(self, root: str, plan: Plan):
        self.root, self.plan = root, plan
        out = root
        plan_file = fs.join(self.root, "plan.json")
        if fs.exists(plan_file):
            old = json.loads(fs.read_bytes(plan_file))
            if old != asdict(plan):
                raise JobError(
                    f"{out} holds tiles of another evaluation (other model, data or tile "
                    "sizes); use another --out or delete its tiles/ folder"
                )
        else:
            fs.write_bytes(plan_file, json.dumps(asdict(plan)).encode())

    def _path(self, r: int, c: int) -> str:
        return fs.join(self.root, f"tile-r{r:05d}-c{c:05d}.npz")

    def done(self, r: int, c: int) -> bool:
        return fs.exists(self._path(r, c))

    def save(self, r: int, c: int, sims: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **sims)
        path = self._path(r, c)
        if fs.is_remote(path):
            fs.write_bytes(path, buf.getvalue())  # an S3 put is atomic
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(buf.getvalue())
        os.replace(tmp, path)  # never a half-written tile

    def load(self, r: int, c: int) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(fs.read_bytes(self._path(r, c)))) as z:
            return {k: z[k] for k in SCORES}


class TileScorer:
    """A Ray actor holding one model; encodes chunks and scores tiles."""

    def __init__(
        self, checkpoints: list[dict[str, bytes]], threads: int, bf16: bool, block: int | None
    ):
        import torch

        from shan.checkpoint import load_model

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16, self.block, self.models = bf16, block, []
        import ray

        for files in checkpoints:
            files = ray.get(files) if isinstance(files, ray.ObjectRef) else files
            d = Path(tempfile.mkdtemp(prefix="shan-ckpt-"))
            for name, data in files.items():
                (d / name).write_bytes(data)
            self.models.append(load_model(d, self.device)[0])

    def pid(self) -> int:
        return os.getpid()

    def encode_images(self, m: int, features: np.ndarray, counts: np.ndarray):
        import torch

        from shan.evaluation import autocast

        with torch.no_grad(), autocast(self.device, self.bf16):
            f = torch.from_numpy(np.array(features)).to(self.device).float()
            im = self.models[m].encode_images(f, torch.from_numpy(np.array(counts)))
            return im.v.float().cpu().numpy(), im.mask.cpu().numpy()

    def encode_captions(self, m: int, tokens: list[list[int]]):
        import torch

        from shan.data.reader import pad_tokens
        from shan.evaluation import autocast

        toks, lens = pad_tokens(tokens)
        with torch.no_grad(), autocast(self.device, self.bf16):
            cap = self.models[m].encode_captions(toks.to(self.device), lens.to(self.device))
            return cap.t.float().cpu().numpy(), cap.mask.cpu().numpy()

    def score_tile(self, m: int, images, captions) -> dict[str, np.ndarray]:
        """images: (v (Bi, k, d), mask); captions: (t (Bc, n, d), mask) -> 4 (Bi, Bc) arrays."""
        import torch

        from shan.evaluation import autocast

        model = self.models[m]
        with torch.no_grad(), autocast(self.device, self.bf16):
            v, vm = (torch.as_tensor(np.array(x)).to(self.device) for x in images)
            t, tm = (torch.as_tensor(np.array(x)).to(self.device) for x in captions)
            sims = model.score(model.image_terms(v, vm), model.caption_terms(t, tm), self.block)
            return {k: sims[k].float().cpu().numpy() for k in SCORES}


class ProgressBar:
    """Tiles done, pairs per second and time left, on one line (or a line every 10%)."""

    def __init__(self, total: int, pairs_per_tile: float, skipped: int):
        self.total, self.pairs, self.done, self.skipped = total, pairs_per_tile, skipped, skipped
        self.t0, self.tty, self.last = time.perf_counter(), sys.stderr.isatty(), -1

    def update(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        new = self.done - self.skipped
        rate = new * self.pairs / max(elapsed, 1e-9)
        left = (self.total - self.done) * elapsed / max(new, 1)
        line = (
            f"tiles {self.done}/{self.total} ({self.skipped} already done) | "
            f"{rate:,.0f} pairs/s | {time.strftime('%H:%M:%S', time.gmtime(left))} left"
        )
        tenth = 10 * self.done // self.total
        if self.tty:
            print("\r" + line, end="\n" if self.done == self.total else "", file=sys.stderr)
        elif tenth != self.last or self.done == self.total:
            print(line, file=sys.stderr, flush=True)
        self.last = tenth


@dataclass
class Pool:
    """Actors and their resources."""

    actors: list
    refs: list  # the checkpoints in the object store, kept alive for actor restarts
    per_actor: int = 2  # tiles in flight per actor


def start_pool(
    checkpoints: list[dict[str, bytes]],
    n: int,
    cpus: float,
    gpus: float,
    threads: int,
    bf16: bool,
    block: int | None,
) -> Pool:
    import ray

    cls = ray.remote(TileScorer).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=2, max_task_retries=2
    )
    refs = [ray.put(files) for files in checkpoints]
    actors = [cls.remote(refs, threads, bf16, block) for _ in range(n)]
    return Pool(actors, refs)


def compute(
    pool: Pool,
    plan: Plan,
    store: TileStore,
    features: np.ndarray,
    counts: np.ndarray,
    tokens: list[list[int]],
    model_index: int = 0,
    on_tile: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Score every tile not yet in ``store`` and assemble the full matrices."""
    import ray
    from ray.exceptions import RayActorError

    rows, cols = plan.shape
    todo = [t for t in plan.tiles() if not store.done(*t)]
    need_r, need_c = {r for r, _ in todo}, {c for _, c in todo}
    a = pool.actors
    img = {
        r: a[r % len(a)].encode_images.remote(
            model_index, features[plan.rows(r)], counts[plan.rows(r)]
        )
        for r in need_r
    }
    cap = {
        c: a[c % len(a)].encode_captions.remote(model_index, [tokens[j] for j in plan.cols(c)])
        for c in need_c
    }
    bar = ProgressBar(
        len(plan.tiles()), plan.tile_images * plan.tile_captions, len(plan.tiles()) - len(todo)
    )
    queue, pending, finished = list(todo), {}, 0
    alive, failures = list(a), {id(x): 0 for x in a}

    def submit(actor) -> None:
        if queue:
            r, c = queue.pop(0)
            pending[actor.score_tile.remote(model_index, img[r], cap[c])] = (actor, (r, c))

    for actor in alive:
        for _ in range(pool.per_actor):
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor, tile = pending.pop(ready[0])
        try:
            sims = ray.get(ready[0])
        except RayActorError:
            queue.append(tile)  # the actor died mid-tile: the tile is redone
            failures[id(actor)] += 1
            if failures[id(actor)] > 3 and actor in alive:
                alive.remove(actor)  # restarted too often: give its work to the others
            if not alive:
                raise JobError("every evaluation actor died; see the Ray logs") from None
            submit(actor if actor in alive else min(alive, key=_load(pending)))
            continue
        store.save(*tile, sims)
        finished += 1
        bar.update()
        if on_tile is not None:
            on_tile(finished)
        submit(actor)
    return assemble(plan, store)


def _load(pending: dict):
    return lambda actor: sum(1 for a, _ in pending.values() if a is actor)


def assemble(plan: Plan, store: TileStore) -> dict[str, np.ndarray]:
    out = {k: np.empty((plan.n_images, plan.n_captions), dtype=np.float32) for k in SCORES}
    for r, c in plan.tiles():
        tile = store.load(r, c)
        rows, cols = plan.rows(r), plan.cols(c)
        for k in SCORES:
            out[k][rows, cols] = tile[k]
    return out
