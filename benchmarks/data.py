"""Data benchmarks: converter throughput and peak memory, and the training reader's throughput.

    python benchmarks/data.py [--images 7000] [--work /tmp/shan-bench-data] [--keep]

1. Writes a precomp split of ``--images`` x 36 x 2048 float32 features (7,000 images: 2.06 GB)
   with 5 captions each (real Flickr30K captions when ../shared is there), converts it in a
   child process and reports MB/s of features read and the child's peak resident memory.
2. Reads the converted split through Ray Data (a local instance) into training batches of 128
   with one consumer, as one training worker does, and reports examples per second.
3. When ../shared/data/scan_precomp is there: converts f30k_test_caps.txt with generated
   (1000, 36, 2048) features and f30k_precomp_vocab.json, and checks the result.
4. When ../shared/data/scan_precomp is there (also alone, with --tokenizer): over every caption
   of its *_caps.txt files, the share whose tokens equal NLTK's word_tokenize, and the <unk>
   rate under SCAN's vocabulary files with shan's tokenizer and the regex one it replaced
   (benchmarks/results/tokenizer_agreement.txt).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
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
    """(seconds, peak RSS in MB) of `shan data precomp` (its shim, `jobs/prepare_data.py`) in a
    child process.

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


# -- tokenizer agreement -------------------------------------------------------------------------
# The library's tokenizer before it used NLTK (regexes imitating word_tokenize), frozen here for
# comparison only.
_OLD_CLITICS = re.compile(r"(?i)\b(can)(not)\b|(\w)(n't)\b|(\w)('s|'re|'ve|'ll|'d|'m)\b")
_OLD_OPEN_QUOTE = re.compile(r'(^|[\s(\[{<])"')
_OLD_TOKEN = re.compile(
    r"``|''|n't|'s|'re|'ve|'ll|'d|'m|\.\.\.|[\w]+(?:[-'][\w]+)*|[^\w\s]", re.UNICODE
)


def old_regex_tokenize(text: str) -> list[str]:
    """shan.vocab.tokenize as it was before NLTK (3.5 -> '3', '.', '5')."""
    text = text.lower().strip()
    text = _OLD_CLITICS.sub(_old_split_clitic, text)
    text = _OLD_OPEN_QUOTE.sub(r"\1 `` ", text).replace('"', " '' ")
    return _OLD_TOKEN.findall(text)


def _old_split_clitic(m: re.Match) -> str:
    if m.group(1):
        return f"{m.group(1)} {m.group(2)}"
    if m.group(3):
        return f"{m.group(3)} {m.group(4)}"
    return f"{m.group(5)} {m.group(6)}"


def reference_tokenizer():
    """(name, function): NLTK's full word_tokenize when Punkt's data loads, else None."""
    import nltk

    try:
        nltk.word_tokenize("A test. Another one.")
    except LookupError:
        return None
    return "nltk.word_tokenize(caption.lower()) with Punkt's English model", (
        lambda c: nltk.word_tokenize(c.lower().strip())
    )


def _tokenize_file(path: str) -> dict:
    """Per caption file: the tokens of every caption under each tokenizer (one worker's job)."""
    from nltk.tokenize import NLTKWordTokenizer

    from shan.vocab import tokenize

    words = NLTKWordTokenizer()
    ref = reference_tokenizer()
    caps = [c for c in Path(path).read_text(encoding="utf-8").split("\n") if c.strip()]
    out, seconds = {}, {}
    funcs = {
        "ours": tokenize,
        "old": old_regex_tokenize,
        "treebank_only": lambda c: words.tokenize(c.lower().strip()),
    }
    if ref is not None:
        funcs["reference"] = ref[1]
    for name, f in funcs.items():
        t0 = time.process_time()  # CPU time: the machine may be shared
        out[name] = [f(c) for c in caps]
        seconds[name] = time.process_time() - t0
    return {"captions": caps, "tokens": out, "seconds": seconds}


def tokenizer_report(folder: Path = SHARED) -> str:
    """Agreement with NLTK's word_tokenize and <unk> rates under SCAN's vocabulary files, over
    every caption file of ``folder`` (``{f30k,coco}_*_caps.txt``, ``*_precomp_vocab.json``)."""
    from multiprocessing import Pool

    from shan.vocab import Vocabulary, tokenize

    files = sorted(folder.glob("*_caps.txt"))
    t0 = time.perf_counter()
    with Pool(2) as pool:
        results = pool.map(_tokenize_file, [str(f) for f in files])
    wall = time.perf_counter() - t0
    ref = reference_tokenizer()
    lines = [
        f"tokenizer agreement over every caption of {folder.name} ({len(files)} files), "
        f"{time.strftime('%Y-%m-%d')}",
        "reference: "
        + (
            ref[0]
            if ref
            else "Punkt's English model is not installed (NLTK data is never downloaded), so "
            "NLTK's full word_tokenize cannot run here; shan's tokenizer IS NLTKWordTokenizer "
            "after Punkt (untrained, shan.vocab.ABBREVIATIONS), so it is the reference and the "
            "'treebank only' line shows what the sentence split changes"
        ),
    ]
    total = {"n": 0, "ours": 0, "old": 0, "treebank_only": 0}
    for f, r in zip(files, results):
        prefix = f.name.split("_")[0]
        vocab = Vocabulary.load(folder / f"{prefix}_precomp_vocab.json")
        toks = r["tokens"]
        refs = toks.get("reference", toks["ours"])
        n = len(r["captions"])
        total["n"] += n
        same = {k: sum(a == b for a, b in zip(toks[k], refs)) for k in total if k != "n"}
        for k, v in same.items():
            total[k] += v
        unk = {k: _unk_rate(toks[k], vocab) for k in ("ours", "old")}
        lines.append(
            f"{f.name}: {n} captions; tokens equal to the reference: ours {_pct(same['ours'], n)}, "
            f"old regex {_pct(same['old'], n)}, treebank without sentence split "
            f"{_pct(same['treebank_only'], n)}; <unk> under {prefix}_precomp_vocab.json: ours "
            f"{unk['ours']}, old regex {unk['old']}; "
            f"CPU per caption: ours {1e6 * r['seconds']['ours'] / n:.0f} us, old regex "
            f"{1e6 * r['seconds']['old'] / n:.0f} us"
        )
    n = total["n"]
    lines.append(
        f"all: {n} captions; equal to the reference: ours {_pct(total['ours'], n)}, old regex "
        f"{_pct(total['old'], n)}, treebank without sentence split "
        f"{_pct(total['treebank_only'], n)}; {wall:.1f} s wall on 2 processes"
    )
    lines += _examples(files, results)
    for prefix in sorted({f.name.split("_")[0] for f in files}):
        vocab = Vocabulary.load(folder / f"{prefix}_precomp_vocab.json")
        words = vocab.idx2word[4:]
        lost = [w for w in words if tokenize(f"a {w} b") != ["a", w, "b"]]
        lines.append(
            f"{prefix}_precomp_vocab.json: {len(words) - len(lost)} of {len(words)} words come "
            f"out of our tokenizer as one token (in 'a WORD b'); not: {lost}"
        )
    return "\n".join(lines)


def _pct(k: int, n: int) -> str:
    return f"{k} ({100 * k / max(n, 1):.3f}%)"


def _unk_rate(tokens: list[list[str]], vocab) -> str:
    from shan.vocab import UNK

    words = sum(len(t) for t in tokens)
    unk = sum(w not in vocab.word2idx or w == UNK for t in tokens for w in t)
    caps = sum(any(w not in vocab.word2idx for w in t) for t in tokens)
    return f"{100 * unk / max(words, 1):.3f}% of {words} words ({caps} captions with one)"


def _examples(files, results, limit: int = 8) -> list[str]:
    """Captions where the old regex tokenizer and ours differ, with both token lists."""
    out = ["examples where the old regex tokenizer differed (old -> ours):"]
    for r in results:
        for cap, old, ours in zip(r["captions"], r["tokens"]["old"], r["tokens"]["ours"]):
            if old != ours and len(out) <= limit:
                only_old = list((Counter(old) - Counter(ours)).elements())
                only_ours = list((Counter(ours) - Counter(old)).elements())
                out.append(f"  {cap.strip()!r}: {only_old} -> {only_ours}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=7000)
    p.add_argument("--work", default="/tmp/shan-bench-data")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--tokenizer", action="store_true", help="only the tokenizer agreement (4.)")
    args = p.parse_args()
    if args.tokenizer:
        print(tokenizer_report())
        return
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
            print(tokenizer_report())
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
