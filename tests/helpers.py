"""Small builders shared by the unit and integration tests."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from shan.config import ModelConfig
from shan.model import SHAN

ROOT = Path(__file__).resolve().parent.parent  # the repository
TINY = str(ROOT / "tests" / "configs" / "tiny.yaml")  # the tests' tiny config (16-d features)


def known_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` for ``parser``, less ``--wait-timeout SECONDS`` where the parser does not have
    that flag yet (the manifests pass it)."""
    # --wait-timeout: added by the resources change
    if "--wait-timeout" in parser._option_string_actions or "--wait-timeout" not in argv:
        return list(argv)
    i = argv.index("--wait-timeout")
    return argv[:i] + argv[i + 2 :]


def quiet(_line: str) -> None:
    """A ``log`` that says nothing."""


def save_untrained(
    folder: Path, vocab, config: str = TINY, seed: int = 0, overrides: tuple[str, ...] = ()
) -> Path:
    """A freshly initialised SHAN of ``config`` (with ``overrides``, e.g.
    ``model.first_stage_dim=8``) for ``vocab`` saved as a checkpoint in ``folder`` (weights
    only, epoch 0, step 0)."""
    from shan.checkpoint import Checkpoint, save_checkpoint
    from shan.config import load_config

    cfg = load_config(config, list(overrides))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(vocab))
    return save_checkpoint(folder, Checkpoint(weights=model.state_dict(), config=cfg, vocab=vocab))


def untrained_on_synthetic(folder: Path, test_images: int) -> dict[str, Path]:
    """``{"data": ..., "ckpt": ...}``: a tiny synthetic data set of ``test_images`` test images
    under ``folder`` and a freshly initialised tiny checkpoint for its vocabulary."""
    from shan.data.format import load_vocab
    from shan.data.synthetic import generate_synthetic

    data = folder / "data"
    generate_synthetic(
        str(data), images={"test": test_images}, regions=4, feature_dim=16, concepts=10,
        log=lambda s: None,
    )  # fmt: skip
    return {"data": data, "ckpt": save_untrained(folder / "ckpt", load_vocab(str(data)))}


def tiny_config(**kw) -> ModelConfig:
    base = dict(feature_dim=12, d=16, word_dim=6, d_a=8)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, vocab_size: int = 30, **kw) -> SHAN:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(tiny_config(**kw), vocab_size).double()
    model.eval()
    return model


def encode(model: SHAN, features, counts, tokens, lengths):
    """(encoded images, encoded captions) of a :func:`random_batch`."""
    return model.encode_images(features, counts), model.encode_captions(tokens, lengths)


def random_batch(ni=3, nc=4, k=5, n=7, feature_dim=12, vocab_size=30, seed=1):
    """features (ni, k, F), counts (ni,), tokens (nc, n), lengths (nc,); padding is random."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(ni, k, feature_dim, generator=g, dtype=torch.float64)
    counts = torch.randint(1, k + 1, (ni,), generator=g)
    counts[0] = k
    lengths = torch.randint(1, n + 1, (nc,), generator=g)
    lengths[0] = n
    tokens = torch.randint(1, vocab_size, (nc, n), generator=g)
    return features, counts, tokens, lengths


WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "woman", "sits"]


def make_precomp(folder: Path, splits=("train", "dev"), n=12, per=5, k=4, f=6, seed=0) -> Path:
    """A small SCAN precomp folder: features, captions (c*i .. c*i+c-1), no final newline."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in splits:
        np.save(folder / f"{s}_ims.npy", rng.normal(size=(n, k, f)).astype(np.float32))
        caps = [
            f"{' '.join(rng.choice(WORDS, size=rng.integers(2, 7)))} image {i} caption {j}"
            for i in range(n)
            for j in range(per)
        ]
        (folder / f"{s}_caps.txt").write_text("\n".join(caps))
    return folder


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SHAPES = ("circle", "square")


def make_images(folder: Path, n: int = 6, size: tuple[int, int] = (72, 56), split=None) -> Path:
    """``n`` small PNG/JPEG pictures of a coloured shape on grey (Pillow) in ``folder``, and
    ``folder/captions.csv`` with two captions each (``image,caption[,split]``)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,caption" + (",split" if split else "")]
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % 3], SHAPES[(i // 3) % 2]
        im = Image.new("RGB", size, (128, 128, 128))
        d = ImageDraw.Draw(im)
        box = (8 + i, 8, size[0] - 10, size[1] - 8 - i % 5)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        im.save(folder / name)
        s = "" if not split else f",{split(i)}"
        rows += [f"{name},a {colour} {shape}{s}", f"{name},the {shape} is {colour}{s}"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder


def convert_images_here(tmp: Path, n: int = 6, split=None) -> tuple[Path, Path]:
    """(images folder, data set): ``n`` pictures of :func:`make_images` converted in this
    process (grid extractor, random resnet50 at 64 x 64: 4 regions of 2048-d)."""
    from shan.extract import convert_images
    from shan.features import ExtractorSpec

    imgs = make_images(tmp / "imgs", n, split=split)
    out = tmp / "data"
    spec = ExtractorSpec(arch="resnet50", size=64, grid=2)
    convert_images(str(imgs), str(imgs / "captions.csv"), str(out), spec=spec, min_count=1,
                   local=True, log=quiet)  # fmt: skip
    return imgs, out


def log_tiny_model(
    tmp: Path, name: str = "shan-test", alias: str = "champion", uri: str | None = None
) -> dict:
    """An untrained tiny checkpoint (:func:`save_untrained`, 16-d features) logged as the MLflow
    model of a RUNNING run, registered as ``name`` version 1 with ``alias``; in the tracking
    server ``uri``, else in a SQLite store of ``tmp`` (artifacts in ``tmp/artifacts``). Returns
    its uri, run_id, model_uri, checkpoint folder, vocab and experiment id."""
    import secrets

    from mlflow.tracking import MlflowClient

    from shan.tracking import pyfunc
    from shan.vocab import Vocabulary

    vocab = Vocabulary(WORDS)
    ckpt = save_untrained(tmp / "ckpt", vocab)
    where = None if uri else (tmp / "artifacts").as_uri()
    uri = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(f"shan-pyfunc-{secrets.token_hex(4)}", artifact_location=where)
    run_id = c.create_run(exp).info.run_id
    model_uri = pyfunc.log_model(uri, run_id, ckpt, step=2)
    assert pyfunc.register(uri, model_uri, name, run_id) == "1"
    c.set_registered_model_alias(name, alias, "1")
    return {"uri": uri, "run_id": run_id, "model_uri": model_uri, "ckpt": ckpt, "vocab": vocab,
            "exp": exp}  # fmt: skip


CAPTIONS = ["a dog runs on the grass", "the red ball", "a zebra sits", "woman"]  # zebra: <unk>


def scoring_request(n: int = 3, r: int = 4, dim: int = 16, seed: int = 5) -> dict:
    """A request for the MLflow model of :func:`log_tiny_model`: n images, four captions."""
    rng = np.random.default_rng(seed)
    return {
        "features": rng.normal(size=(n, r, dim)).astype(np.float32),
        "counts": np.array([r, 2, 1][:n], dtype=np.int64),
        "captions": np.array(CAPTIONS),
    }


def library_scores(ckpt: Path, req: dict) -> dict[str, np.ndarray]:
    """The scores of evaluation's scorer, called directly."""
    from shan.checkpoint import load_model
    from shan.scoring import score_matrix

    loaded = load_model(ckpt)
    tokens = [loaded.vocab.encode(c, loaded.config.data.max_words) for c in req["captions"]]
    return score_matrix(loaded.model, req["features"], req["counts"], tokens, torch.device("cpu"))


def register_checkpoint(c, run_id: str, name: str) -> str:
    """A model version of ``name`` whose source is the run's ``checkpoint/`` artifact: the
    layout before the MLflow model (:func:`shan.tracking.pyfunc.register`), which evaluation
    still resolves. ``c``: an ``MlflowClient``."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    source = f"{c.get_run(run_id).info.artifact_uri}/checkpoint"
    return c.create_model_version(name, source=source, run_id=run_id).version


def damage_row(
    root: Path,
    split: str,
    row: int = 0,
    *,
    num_regions: int | None = None,
    caption_words: int | None = None,
) -> Path:
    """Rewrite ``split``'s first shard of the data set at ``root`` with row ``row`` changed:
    its ``num_regions``, or its first caption made ``caption_words`` words long (its text and
    its tokens: the second token repeated). Returns the shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(root) / split / "part-00000.parquet"
    table = pq.read_table(path)
    if num_regions is not None:
        counts = table.column("num_regions").to_pylist()
        counts[row] = num_regions
        i = table.schema.get_field_index("num_regions")
        table = table.set_column(i, table.schema.field(i), pa.array(counts, pa.int32()))
    if caption_words is not None:
        caps, toks = table.column("captions").to_pylist(), table.column("tokens").to_pylist()
        t = toks[row][0]
        toks[row][0] = [t[0], *[t[1]] * caption_words, t[-1]]
        caps[row][0] = " ".join([caps[row][0].split()[0]] * caption_words)
        for name, values in (("captions", caps), ("tokens", toks)):
            i = table.schema.get_field_index(name)
            field = table.schema.field(i)
            table = table.set_column(i, field, pa.array(values, field.type))
    pq.write_table(table, path)
    return path


@contextmanager
def mounted_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (made) for the block, then unmounted: a small
    disk to fill. The test is skipped, saying why, where mounting is not permitted."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a small file system cannot be made here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield folder
    finally:  # lazily when a file is still open there (a failed test's): never left mounted
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def first_stage_config(folder: Path, dim: int = 8) -> str:
    """The tiny config with a first stage of ``dim`` dimensions, written into ``folder``."""
    import yaml

    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["model"]["first_stage_dim"] = dim
    path = Path(folder) / f"tiny-first-stage-{dim}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def untrained_with_first_stage(folder: Path, test_images: int, dim: int = 8) -> dict[str, Path]:
    """:func:`untrained_on_synthetic`, the checkpoint with a first-stage head of ``dim``."""
    from shan.data.format import load_vocab

    made = untrained_on_synthetic(folder, test_images)
    config = first_stage_config(folder, dim)
    ckpt = save_untrained(folder / "ckpt-first-stage", load_vocab(str(made["data"])), config)
    return {"data": made["data"], "ckpt": ckpt, "plain": made["ckpt"]}
