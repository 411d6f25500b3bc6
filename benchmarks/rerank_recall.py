"""Rerank recall against exhaustive at K = 10, 50, 100, 500, and a COCO-5K-sized evaluation's
CPU time with K = 100 against exhaustive.

    python benchmarks/rerank_recall.py demo --model DIR --data ROOT [--ks 10 50 100 500]
    python benchmarks/rerank_recall.py coco5k --model DIR [--images 5000] [--slice-images 8]
        [--slice-captions 40] [--ks 100] [--derived-ks 10 50]

Every number comes from the evaluation job itself (``shan.eval.job.evaluate``, the options of
``shan evaluate``, a local Ray instance sized from the machine):

demo: ``--rerank K`` for each K (each into WORK/demo-rerank-K), then the exhaustive
evaluation of the split (``--exhaustive DIR``, or WORK/demo, kept and reused by a rerun), and
the difference per metric.

coco5k: a synthetic split of IMAGES images x 36 regions x 5 captions (COCO 5K's sizes) in the
demo data set's world (the same vocabulary, so the demo checkpoint reads it), ``--rerank K``
for each K (timed whole: actor start, first stage, candidates and scoring; ``--derived-ks``:
smaller K read from a run's first K' candidates, which are what ``--rerank K'`` scores). The
exhaustive matrix (IMAGES x 5 IMAGES pairs) is too long for this machine, so its time is an
ESTIMATE from the evaluation's own actors (``shan.eval.tiles``, the same sizing): every caption
and every image encoded as the exhaustive tiles do (measured whole), plus every pair at the
scoring rate measured on two slices, which also give exact ranks for sampled queries:
* SLICE_IMAGES images (the first) against every caption: their image-to-text ranks;
* every image against SLICE_CAPTIONS captions drawn at random: their text-to-image ranks.
The recall differences on this split are over those sampled queries only.

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


def opts(**kw):
    from shan.eval.job import EvalOptions

    return EvalOptions(split="test", **kw)


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
    from shan.eval.job import evaluate
    from shan.metrics import sparse_ranks

    Path(args.work).mkdir(parents=True, exist_ok=True)
    data = Path(args.work) / f"synthetic-{args.images}"
    if not (data / "dataset.json").exists():
        generate_synthetic(str(data), images={"test": args.images}, regions=36, feature_dim=64,
                           concepts=120, seed=0, log=quiet)  # fmt: skip
    split = read_split(str(data), "test")
    n, c = len(split.image_ids), len(split.tokens)
    rng = np.random.default_rng(0)
    rows = np.arange(min(args.slice_images, n))
    cols = np.sort(rng.choice(c, size=min(args.slice_captions, c), replace=False))
    say(f"split: synthetic, {n} images x 36 regions x 64-d, {c} captions (the demo's world)")
    out = Path(args.work) / f"coco5k-{args.images}"
    ci = split.caption_image
    times, runs, found = {}, {}, {}
    for k in args.ks:  # the reranks first: their times are the measured half of the ratio
        r = evaluate([args.model], str(data), str(out), opts(rerank=k), log=quiet)
        times[k] = r.doc["meta"]["seconds"]
        say(f"rerank K={k}: {times[k]:.1f} s; recall on the whole split: "
            + ", ".join(f"{m} {r.metrics['total'][m]:.2f}" for m in METRICS))  # fmt: skip
        folder = out / "rerank"
        tc, ic = np.load(folder / "t2i_candidates.npy"), np.load(folder / "i2t_candidates.npy")
        ts, is_ = np.load(folder / "t2i_total.npy"), np.load(folder / "i2t_total.npy")
        for kk in [x for x in args.derived_ks if x < k] + [k]:
            runs[kk] = (k, tc[cols, :kk], ts[cols, :kk], ic[rows, :kk], is_[rows, :kk])
            t_in = (tc[:, :kk] == ci[:, None]).any(1).mean()
            i_in = (ci[ic[:, :kk]] == np.arange(n)[:, None]).any(1).mean()
            found[kk] = (100 * t_in, 100 * i_in)
    ex = exhaustive_slices(args.model, split, rows, cols, say)
    ref = sampled_metrics(ex["i2t_ranks"], ex["t2i_ranks"])
    say(f"\nrecall on the sampled queries ({len(rows)} images i2t, {len(cols)} captions t2i,"
        " drawn at random: a few points of sampling noise)\n\n" + HEAD)  # fmt: skip
    say(row("exhaustive", ref))
    diffs = []
    for kk, (k, t_c, t_s, i_c, i_s) in sorted(runs.items()):
        truth_i = ci[i_c] == rows[:, None]
        truth_t = t_c == ci[cols][:, None]
        ri = np.where(truth_i.any(1), sparse_ranks(i_c, i_s, truth_i), 10**9)
        rt = np.where(truth_t.any(1), sparse_ranks(t_c, t_s, truth_t), 10**9)
        m = sampled_metrics(ri, rt)
        what = f"({times[k]:.1f} s)" if kk == k else f"(K={k}'s first {kk})"
        say(row(f"rerank K={kk} {what}", m))
        diffs.append((kk, {key: m[key] - ref[key] for key in METRICS}))
    say("\nrerank - exhaustive on the sampled queries (points)\n\n" + HEAD)
    for kk, d in diffs:
        say(row(f"K={kk}", d, "{:+.2f}"))
    say("\nground truth among the K candidates (the whole split; the rerank's ceiling):")
    for kk, (t_in, i_in) in sorted(found.items()):
        say(f"  K={kk}: t2i {t_in:.2f}% of captions, i2t {i_in:.2f}% of images")
    full = ex["estimate_s"]
    say(f"\nCOCO-5K-sized evaluation, {n} x {c} = {n * c / 1e6:.0f} M pairs, CPU time:")
    say(
        f"  exhaustive: {full:.0f} s ({full / 3600:.2f} h), ESTIMATED, not measured whole: every "
        f"caption encoded {ex['captions_s']:.1f} s + every image encoded {ex['images_s']:.1f} s "
        f"(both measured whole) + {n * c / 1e6:.0f} M pairs at the scoring rate measured on "
        f"{ex['pairs']:,} pairs ({ex['scoring_s']:.1f} s, {ex['pairs'] / ex['scoring_s']:.0f} "
        "pairs/s), scaled linearly"
    )
    for k in args.ks:
        say(f"  rerank K={k}: {times[k]:.1f} s measured whole -> {full / times[k]:.1f}x faster")
    say("  goal: K=100 at least 20x faster than exhaustive")


def sampled_metrics(ri: np.ndarray, rt: np.ndarray) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", ri), ("t2i", rt)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((r < k).mean())
    out["rsum"] = sum(out[m] for m in METRICS[:6])
    return out


def exhaustive_slices(model: str, split, rows: np.ndarray, cols: np.ndarray, say) -> dict:
    """The exact ranks of the sampled queries and the exhaustive time estimate (see above)."""
    import ray

    from shan.checkpoint import load_checkpoint
    from shan.eval import tiles
    from shan.eval.job import actor_request
    from shan.runtime import init_ray, plan_group

    o = opts()
    init_ray(quiet)
    res = plan_group(actor_request(o), ray.cluster_resources())
    say(f"actors: {res.describe('actor')}")
    ckpt = load_checkpoint(model).weights_only()
    pool = tiles.start_pool([ckpt], res, o.bf16, o.block)
    a = pool.actors
    n, c, ti, tc = len(split.image_ids), len(split.tokens), o.tile_images, o.tile_captions

    def on(i: int):
        return a[i % len(a)]

    try:
        tiles.device_kinds(pool, 600)
        # every caption and every image encoded as the exhaustive tiles do (timed whole)
        order = np.argsort([len(t) for t in split.tokens], kind="stable")
        chunks = [order[c0 : c0 + tc] for c0 in range(0, c, tc)]
        t0 = time.perf_counter()
        caps = [
            on(i).encode_captions.remote(0, [split.tokens[j] for j in ch])
            for i, ch in enumerate(chunks)
        ]
        ray.wait(caps, num_returns=len(caps))
        captions_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        imgs = [
            on(i).encode_images.remote(
                0, split.features[r0 : r0 + ti], split.num_regions[r0 : r0 + ti]
            )
            for i, r0 in enumerate(range(0, n, ti))
        ]
        ray.wait(imgs, num_returns=len(imgs))
        images_s = time.perf_counter() - t0
        few = on(0).encode_images.remote(0, split.features[rows], split.num_regions[rows])
        some = on(0).encode_captions.remote(0, [split.tokens[j] for j in cols])
        ray.wait([few, some], num_returns=2)
        # scoring alone (timed): the sampled images x every caption, every image x the captions
        t0 = time.perf_counter()
        a_parts = ray.get([on(i).score_tile.remote(0, few, cap) for i, cap in enumerate(caps)])
        b_parts = ray.get([on(i).score_tile.remote(0, im, some) for i, im in enumerate(imgs)])
        scoring_s = time.perf_counter() - t0
    finally:
        for x in pool.actors:
            ray.kill(x)
    a_sims = np.empty((len(rows), c), np.float32)
    for ch, part in zip(chunks, a_parts, strict=True):
        a_sims[:, ch] = part["total"]
    b_sims = np.concatenate([p["total"] for p in b_parts])  # (N, S')
    ci = split.caption_image
    gt = ci[None, :] == rows[:, None]  # (S, C)
    best = np.where(gt, a_sims, -np.inf).max(1)
    i2t = ((a_sims >= best[:, None]) & ~gt).sum(1)
    own = b_sims[ci[cols], np.arange(len(cols))]
    t2i = (b_sims >= own[None, :]).sum(0) - 1
    pairs = len(rows) * c + n * len(cols)
    estimate = captions_s + images_s + n * c * scoring_s / pairs
    return {"i2t_ranks": i2t, "t2i_ranks": t2i, "captions_s": captions_s, "images_s": images_s,
            "scoring_s": scoring_s, "pairs": pairs, "estimate_s": estimate}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("demo", "coco5k"))
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
    p.add_argument("--slice-images", type=int, default=8)
    p.add_argument("--slice-captions", type=int, default=40)
    p.add_argument("--work", default="/tmp/shan-bench-rerank", help="kept between runs")
    p.add_argument("--results", default=str(RESULTS), help="appended to (default %(default)s)")
    args = p.parse_args()
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
    (demo if args.what == "demo" else coco5k)(args, say)
    say(f"load average {os.getloadavg()[0]:.1f} at the end")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
