"""Rerank recall against exhaustive at K = 10, 50, 100, 500, and a COCO-5K-sized evaluation's
CPU time with K = 100 against exhaustive.

    python benchmarks/rerank_recall.py demo --model DIR --data ROOT [--ks 10 50 100 500]
    python benchmarks/rerank_recall.py whole --model DIR --data SYNTHETIC_5K_ROOT --ks 100
    python benchmarks/rerank_recall.py coco5k --model DIR [--images 5000] [--slice-images 8]
        [--slice-captions 40] [--ks 100] [--derived-ks 10 50]

Every number comes from the evaluation job itself (``shan.eval.job.evaluate``, the options of
``shan evaluate``, a local Ray instance sized from the machine):

demo (or whole, on any split, e.g. coco5k's synthetic one when the machine has the time):
``--rerank K`` for each K (each into WORK/demo-rerank-K), then the exhaustive
evaluation of the split (``--exhaustive DIR``, or WORK/demo, kept and reused by a rerun), and
the difference per metric.

coco5k: a synthetic split of IMAGES images x 36 regions x 5 captions (COCO 5K's sizes) in the
demo data set's world (the same vocabulary, so the demo checkpoint reads it). Neither whole
evaluation fits this machine's time, so both CPU times are ESTIMATES from parts measured on the
evaluation's own actors (``shan.eval.tiles``, the job's sizing):
* exhaustive: every image and caption encoded as the tiles do (measured whole) + every pair
  at the rate of one whole tile (measured);
* rerank K (``--timed-k``): every image and caption encoded with its first-stage vector and
  the exact top K (measured whole) + each direction's queries at the time per query measured
  on ``--timed-queries`` of them (``shan.scoring.rerank_scores`` on the actor).
Recall: SLICE_IMAGES images and SLICE_CAPTIONS captions drawn at random get their exact ranks
(those images against every caption, every image against those captions) and their rerank
at the largest K (smaller K: its first K candidates); the differences are over those queries
only. The first stage's candidate recall (ground truth among the K) is over every query.

The results go to stdout and to ``--results`` (the command line on top).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "rerank_recall_cpu.txt"
SCORES = ("total", "l2l", "g2l", "g2g")
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


SIZING: dict = {}  # --actors, --cpus-per-actor when given


def opts(**kw):
    from shan.eval.job import EvalOptions

    return EvalOptions(split="test", **SIZING, **kw)


def quiet(_: str) -> None:
    pass


def row(name: str, values: dict, fmt: str = "{:.2f}") -> str:
    return f"| {name} | " + " | ".join(fmt.format(values[m]) for m in METRICS) + " |"


HEAD = "| | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |\n" + "|---" * 8 + "|"


# -- demo ------------------------------------------------------------------------------------
def demo(args: argparse.Namespace, say) -> None:
    from shan.eval.job import evaluate
    from shan.eval.rerank import differences

    exhaustive_dir = Path(args.exhaustive or Path(args.work) / "demo")
    runs = {}  # K: (metrics, seconds, how)
    for k in args.ks:  # each K in a folder of its own (kept: a rerun reuses a finished one)
        out = Path(args.work) / f"demo-rerank-{k}"
        doc = finished(out / "rerank" / "metrics.json", args, k)
        if doc is None:
            r = evaluate([args.model], args.data, str(out), opts(rerank=k), log=quiet)
            doc = r.doc
        runs[k] = ({s: doc[s] for s in SCORES}, doc["meta"]["seconds"], "")
        say(f"rerank K={k}: {runs[k][1]:.1f} s")
        for kk in [x for x in args.derived_ks if x < k and x not in runs]:
            runs[kk] = (truncated(out / "rerank", kk), float("nan"), f"K={k}'s first {kk}")
    if args.skip_exhaustive:  # the reranks' times and recall only
        for k, (m, seconds, how) in sorted(runs.items()):
            say(row(f"rerank K={k} ({how or f'{seconds:.1f} s'})", m["total"]))
        return
    done = exhaustive_dir / "metrics.json"
    if args.exhaustive is None and not done.exists():
        evaluate([args.model], args.data, str(exhaustive_dir), opts(), log=quiet)
    while not done.exists():  # --exhaustive: another process may still be writing it
        time.sleep(30)
    exhaustive = json.loads(done.read_text())
    meta = exhaustive["meta"]
    assert meta["model"] == [args.model] and meta["data"] == args.data, meta
    say(f"split: {args.data} [test], {meta['images']} images x {meta['captions']} captions")
    say(f"exhaustive: {exhaustive_dir} ({meta['seconds']:.1f} s)\n\n{HEAD}")
    say(row("exhaustive", exhaustive["total"]))
    for k, (m, seconds, how) in sorted(runs.items()):
        say(row(f"rerank K={k} ({how or f'{seconds:.1f} s'})", m["total"]))
    say("\nrerank - exhaustive (points; goal at K=100: R@1/5/10 within 0.5)\n\n" + HEAD)
    for k, (m, _, _) in sorted(runs.items()):
        theirs = {s: exhaustive[s] for s in m}
        say(row(f"K={k}", differences(m, theirs)["total"], "{:+.2f}"))
    say("\ntime, both measured whole (actor start, encoding, scoring; not the data's reading):")
    for k, (_, seconds, how) in sorted(runs.items()):
        if not how:
            say(f"  rerank K={k}: {seconds:.1f} s, {meta['seconds'] / seconds:.1f}x faster than "
                f"exhaustive ({meta['seconds']:.1f} s)")  # fmt: skip


def finished(path: Path, args: argparse.Namespace, k: int) -> dict | None:
    """A finished rerank's metrics.json of this model, data and K (None: none)."""
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    meta = doc["meta"]
    same = meta["model"] == [args.model] and meta["data"] == args.data and meta["rerank_k"] == k
    return doc if same else None


def truncated(folder: Path, k: int) -> dict[str, dict[str, float]]:
    """The recall of a rerank's first ``k`` candidates (what ``--rerank k`` scores: the same
    first stage, best first, and the same scores)."""
    from shan.metrics import sparse_recall_metrics

    index = json.loads((folder / "index.json").read_text())
    row_of = {iid: r for r, iid in enumerate(index["image_ids"])}
    caption_image = np.array([row_of[i] for i in index["caption_image_ids"]])
    out = {}
    for s in SCORES:
        t2i = (
            np.load(folder / "t2i_candidates.npy")[:, :k],
            np.load(folder / f"t2i_{s}.npy")[:, :k],
        )
        i2t = (
            np.load(folder / "i2t_candidates.npy")[:, :k],
            np.load(folder / f"i2t_{s}.npy")[:, :k],
        )
        out[s] = sparse_recall_metrics(t2i, i2t, caption_image)
    return out


# -- coco5k -----------------------------------------------------------------------------------
def coco5k(args: argparse.Namespace, say) -> None:
    from shan.data.reader import read_split
    from shan.data.synthetic import generate_synthetic

    Path(args.work).mkdir(parents=True, exist_ok=True)
    data = Path(args.work) / f"synthetic-{args.images}"
    if not (data / "dataset.json").exists():
        generate_synthetic(str(data), images={"test": args.images}, regions=36, feature_dim=64,
                           concepts=120, seed=0, log=quiet)  # fmt: skip
    split = read_split(str(data), "test")
    n, c = len(split.image_ids), len(split.tokens)
    say(f"split: synthetic, {n} images x 36 regions x 64-d, {c} captions (the demo's world)")
    m = measure(args, split, say)
    ref = sampled_metrics(m["i2t_ranks"], m["t2i_ranks"])
    rows, cols = m["rows"], m["cols"]
    say(f"\nrecall on sampled queries ({len(rows)} images i2t, {len(cols)} captions t2i, drawn "
        "at random: a few points of sampling noise)\n\n" + HEAD)  # fmt: skip
    say(row("exhaustive", ref))
    ci, diffs = split.caption_image, []
    t_c, t_s, i_c, i_s = m["sampled"]  # at the largest K, best first
    for k in sorted(args.ks):
        truth_i = ci[i_c[:, :k]] == rows[:, None]
        truth_t = t_c[:, :k] == ci[cols][:, None]
        ri = np.where(truth_i.any(1), sparse_ranks_(i_c[:, :k], i_s[:, :k], truth_i), 10**9)
        rt = np.where(truth_t.any(1), sparse_ranks_(t_c[:, :k], t_s[:, :k], truth_t), 10**9)
        got = sampled_metrics(ri, rt)
        say(row(f"rerank K={k}", got))
        diffs.append((k, {key: got[key] - ref[key] for key in METRICS}))
    say("\nrerank - exhaustive on the sampled queries (points)\n\n" + HEAD)
    for k, d in diffs:
        say(row(f"K={k}", d, "{:+.2f}"))
    say("\nground truth among the first stage's K candidates (every query of the split):")
    for k, (t_in, i_in) in sorted(m["found"].items()):
        say(f"  K={k}: t2i {t_in:.2f} % of captions, i2t {i_in:.2f} % of images")
    say(f"\nCOCO-5K-sized evaluation, {n} x {c} = {n * c / 1e6:.0f} M pairs, seconds on "
        f"{m['actors']}; ESTIMATED from measured parts, neither run whole (encodings: the "
        "pool's wall time, every actor busy at once):")  # fmt: skip
    ex = m["encode_s"] + n * c / m["pairs_per_s"]
    say(
        f"  exhaustive: {ex:.0f} s ({ex / 3600:.2f} h) = encoding every image and caption "
        f"{m['encode_s']:.1f} s (measured whole) + {n * c / 1e6:.0f} M pairs at "
        f"{m['pairs_per_s']:.0f} pairs/s (measured on a whole tile per actor, {m['pairs']:,} pairs)"
    )
    k = m["timed_k"]
    rr = m["first_stage_s"] + m["topk_s"] + c * m["t2i_query_s"] + n * m["i2t_query_s"]
    say(f"  rerank K={k}: {rr:.0f} s = encoding and first-stage vectors {m['first_stage_s']:.1f}"
        f" s + exact top K {m['topk_s']:.1f} s (both measured whole) + {c} t2i queries at "
        f"{1000 * m['t2i_query_s']:.2f} ms + {n} i2t queries at {1000 * m['i2t_query_s']:.2f} "
        f"ms (the pool's rate on {m['timed_q'][0]}, {m['timed_q'][1]} queries each)")  # fmt: skip
    say(f"  ratio: {ex / rr:.1f}x faster (goal: K=100 at least 20x)")


def sparse_ranks_(cands: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from shan.metrics import sparse_ranks

    return sparse_ranks(cands, scores, truth)


def sampled_metrics(ri: np.ndarray, rt: np.ndarray) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", ri), ("t2i", rt)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
    out["rsum"] = sum(out[m] for m in METRICS[:6])
    return out


def measure(args: argparse.Namespace, split, say) -> dict:
    """Every part of both evaluations on the evaluation's own actors (see the docstring)."""
    import ray

    from shan.checkpoint import load_checkpoint
    from shan.eval import rerank, tiles
    from shan.eval.job import actor_request
    from shan.runtime import init_ray, plan_group

    o = opts()
    init_ray(quiet)
    res = plan_group(actor_request(o), ray.cluster_resources())
    pool = tiles.start_pool([load_checkpoint(args.model).weights_only()], res, o.bf16, o.block)
    a, n, c = pool.actors, len(split.image_ids), len(split.tokens)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=args.slice_images, replace=False))
    cols = np.sort(rng.choice(c, size=args.slice_captions, replace=False))
    out: dict = {"rows": rows, "cols": cols, "actors": res.describe("actor"), "n_actors": len(a)}

    def on(i: int):
        return a[i % len(a)]

    def timed(refs: list) -> float:
        t0 = time.perf_counter()
        ray.wait(refs, num_returns=len(refs))
        return time.perf_counter() - t0

    try:
        tiles.device_kinds(pool, 600)
        order = np.argsort([len(t) for t in split.tokens], kind="stable")
        chunks = [order[c0 : c0 + o.tile_captions] for c0 in range(0, c, o.tile_captions)]
        starts = range(0, n, o.tile_images)
        feats = [(split.features[r : r + o.tile_images], split.num_regions[r : r + o.tile_images])
                 for r in starts]  # fmt: skip
        toks = [[split.tokens[j] for j in ch] for ch in chunks]
        # the exhaustive tiles' encoding (v, mask; t, mask), every image and caption
        caps = [on(i).encode_captions.remote(0, t) for i, t in enumerate(toks)]
        imgs = [on(i).encode_images.remote(0, *f) for i, f in enumerate(feats)]
        out["encode_s"] = timed(caps + imgs)
        # exhaustive scoring: sampled images x every caption, every image x sampled captions
        few = on(0).encode_images.remote(0, split.features[rows], split.num_regions[rows])
        some = on(0).encode_captions.remote(0, [split.tokens[j] for j in cols])
        ray.wait([few, some], num_returns=2)
        a_parts = ray.get([on(i).score_tile.remote(0, few, cap) for i, cap in enumerate(caps)])
        b_parts = ray.get([on(i).score_tile.remote(0, im, some) for i, im in enumerate(imgs)])
        # the pool's scoring rate: a whole tile on each actor at once (the first images x the
        # captions of median length and after)
        mid = len(chunks) // 2
        t0 = time.perf_counter()
        ray.get([on(i).score_tile.remote(0, imgs[i], caps[mid + i]) for i in range(len(a))])
        out["pairs"] = sum(len(feats[i][0]) * len(chunks[mid + i]) for i in range(len(a)))
        out["pairs_per_s"] = out["pairs"] / (time.perf_counter() - t0)
        del caps, imgs
        # the rerank: encodings with first-stage vectors (every image and caption), exact top K
        plain = [split.tokens[c0 : c0 + o.tile_captions] for c0 in range(0, c, o.tile_captions)]
        rc = [on(i).rerank_captions.remote(0, t) for i, t in enumerate(plain)]
        ri_ = [on(i).rerank_images.remote(0, *f) for i, f in enumerate(feats)]
        out["first_stage_s"] = timed(rc + ri_)
        vec_i = np.concatenate([v for _, v in ray.get(ri_)])
        vec_c = np.concatenate([v for _, v in ray.get(rc)])
        parts = [ri_, rc]
        kmax, k = max(args.ks), args.timed_k
        t0 = time.perf_counter()
        t2i, i2t = rerank.top_k(vec_c, vec_i, k), rerank.top_k(vec_i, vec_c, k)
        out["topk_s"] = time.perf_counter() - t0
        ci = split.caption_image
        out["found"] = {}
        t2i_max, i2t_max = rerank.top_k(vec_c, vec_i, kmax), rerank.top_k(vec_i, vec_c, kmax)
        for kk in sorted(args.ks):
            t_in = 100 * (t2i_max[:, :kk] == ci[:, None]).any(1).mean()
            i_in = 100 * (ci[i2t_max[:, :kk]] == np.arange(n)[:, None]).any(1).mean()
            out["found"][kk] = (t_in, i_in)
        # rerank scoring, timed on the first queries of each direction (the held encodings
        # are gathered by a first small call, as an evaluation's first tile does)
        one = np.arange(1)
        ray.get(
            [on(i).rerank_tile.remote(0, "caption", one, t2i[:1], parts) for i in range(len(a))]
        )
        qt, qi = args.timed_queries  # per actor, all actors at once (the pool's rate)
        for name, by, cands, q in (("t2i", "caption", t2i, qt), ("i2t", "image", i2t, qi)):
            t0 = time.perf_counter()
            ray.get([on(i).rerank_tile.remote(0, by, np.arange(i * q, (i + 1) * q),
                                              cands[i * q : (i + 1) * q], parts)
                     for i in range(len(a))])  # fmt: skip
            out[f"{name}_query_s"] = (time.perf_counter() - t0) / (q * len(a))
        out["timed_k"], out["timed_q"] = k, (qt, qi)
        # the sampled queries reranked at the largest K (smaller K: its first K candidates)
        st = ray.get(on(0).rerank_tile.remote(0, "caption", cols, t2i_max[cols], parts))
        si = ray.get(on(0).rerank_tile.remote(0, "image", rows, i2t_max[rows], parts))
        out["sampled"] = (st["candidates"], st["total"], si["candidates"], si["total"])
    finally:
        for x in pool.actors:
            ray.kill(x)
    a_sims = np.empty((len(rows), c), np.float32)
    for ch, part in zip(chunks, a_parts, strict=True):
        a_sims[:, ch] = part["total"]
    b_sims = np.concatenate([p["total"] for p in b_parts])  # (N, S')
    gt = ci[None, :] == rows[:, None]  # (S, C)
    best = np.where(gt, a_sims, -np.inf).max(1)
    out["i2t_ranks"] = ((a_sims >= best[:, None]) & ~gt).sum(1)
    own = b_sims[ci[cols], np.arange(len(cols))]
    out["t2i_ranks"] = (b_sims >= own[None, :]).sum(0) - 1
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("demo", "whole", "coco5k"), help="whole: demo's steps")
    p.add_argument("--model", required=True, help="a checkpoint folder with a first stage")
    p.add_argument("--data", help="demo: the data set root")
    p.add_argument(
        "--exhaustive",
        metavar="DIR",
        help="demo: the exhaustive evaluation's --out (waited for when another process is\n"
        "still writing it; default: WORK/demo, evaluated here when missing)",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100, 500])
    p.add_argument(
        "--derived-ks",
        type=int,
        nargs="*",
        default=[],
        help="K' whose recall is read from a larger run's first K' candidates",
    )
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--slice-images", type=int, default=8, help="coco5k: sampled i2t queries")
    p.add_argument("--slice-captions", type=int, default=40, help="coco5k: sampled t2i queries")
    p.add_argument("--timed-k", type=int, default=100, help="coco5k: the K timed")
    p.add_argument(
        "--timed-queries",
        type=int,
        nargs=2,
        default=[256, 64],
        metavar=("T2I", "I2T"),
        help="coco5k: queries of each direction the rerank's scoring is timed on",
    )
    p.add_argument("--work", default="/tmp/shan-bench-rerank", help="kept between runs")
    p.add_argument("--results", default=str(RESULTS), help="appended to (default %(default)s)")
    p.add_argument("--skip-exhaustive", action="store_true", help="demo, whole: reranks only")
    p.add_argument("--actors", type=int, help="the evaluation's --actors (default: sized)")
    p.add_argument("--cpus-per-actor", type=float, help="the evaluation's --cpus-per-actor")
    args = p.parse_args()
    if args.actors:
        SIZING["actors"] = args.actors
    if args.cpus_per_actor:
        SIZING["cpus_per_actor"] = args.cpus_per_actor
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    say(f"# benchmarks/rerank_recall.py {' '.join(sys.argv[1:])}")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    say(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.1f} at the start; {when}"
    )
    say(f"model: {args.model}")
    (coco5k if args.what == "coco5k" else demo)(args, say)
    say(f"load average {os.getloadavg()[0]:.1f} at the end")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
