"""Bad inputs of ``jobs/train.py``, each tried through the real command line.

Every case must be refused before Ray starts or an MLflow run is touched: the cases run with
an MLflow address where nobody listens and no Ray address, so a check that came too late would
show up as another error ("is unreachable"). None of them starts Ray: they run through the
job's ``main`` in this process (``tests.cli.run_main`` fails a case that reaches for Ray), one
as a subprocess of ``jobs/train.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from shan_stack import free_port

from tests.cli import Case, assert_user_error, last_line, run_case, run_main, snapshot
from tests.helpers import TINY, damage_row


def tiny(*args: str):
    """argv: the tiny config, data that does not exist (never reached), and ``args``."""
    return lambda tmp: ["--config", TINY, "--data", str(tmp / "no-data"), *args]


def foreign_checkpoint_folder(tmp: Path) -> list[str]:
    """``checkpoints/keep-me`` (under the job's working directory) holds a file of someone's."""
    folder = tmp / "checkpoints" / "keep-me"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "notes.txt").write_text("not a checkpoint file\n")
    return tiny("--name", "keep-me")(tmp)


def config_file(name: str, text: str, *args: str):
    """argv: a config file ``name`` holding ``text`` (written under tmp), and ``args``."""

    def argv(tmp: Path) -> list[str]:
        (tmp / name).write_text(text)
        return ["--config", str(tmp / name), "--data", str(tmp / "no-data"), *args]

    return argv


# nine aliases of nine aliases ... of nine strings: 9**9 strings once expanded
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
DEEP_LIST = "model:\n  d: " + "[" * 100_000 + "]" * 100_000 + "\n"


def num_regions_beyond(tmp: Path) -> list[str]:
    """A data set whose train row 1 says it has 10^9 regions (of 4)."""
    from shan.data.synthetic import generate_synthetic

    data = tmp / "data"
    generate_synthetic(str(data), images={"train": 8, "dev": 4}, regions=4, feature_dim=16,
                       concepts=10, log=lambda s: None)  # fmt: skip
    damage_row(data, "train", 1, num_regions=10**9)
    return ["--config", TINY, "--data", str(data)]


CASES: list[Case] = [
    Case("lr-negative", "train", "`optim.lr=-1`", tiny("optim.lr=-1"), ("optim.lr", "-1.0")),
    Case("lr-nan", "train", "`optim.lr=nan`", tiny("optim.lr=nan"), ("optim.lr", "nan")),
    Case("margin-inf", "train", "`loss.margin=inf`", tiny("loss.margin=inf"),
         ("loss.margin", "inf")),
    Case("grad-clip-negative", "train", "`optim.grad_clip=-1` (would flip the gradient)",
         tiny("optim.grad_clip=-1"), ("optim.grad_clip", "-1.0")),
    Case("margin-negative", "train", "`loss.margin=-5`", tiny("loss.margin=-5"),
         ("loss.margin", "-5.0")),
    Case("max-words-zero", "train", "`data.max_words=0`", tiny("data.max_words=0"),
         ("data.max_words", "0")),
    Case("seed-negative", "train", "`seed=-1`", tiny("seed=-1"), ("seed", "-1")),
    Case("log-every-zero", "train", "`tracking.log_every=0`", tiny("tracking.log_every=0"),
         ("tracking.log_every", "0")),
    Case("gpus-per-worker-zero", "train", "`scaling.gpus_per_worker=0`",
         tiny("scaling.gpus_per_worker=0"), ("scaling.gpus_per_worker", "0.0")),
    Case("batch-size-one", "train", "`optim.batch_size=1`", tiny("optim.batch_size=1"),
         ("optim.batch_size", ">= 2")),
    Case("several-bad-values", "train", "`optim.lr=-1 model.d=big model.colour=red` together",
         tiny("optim.lr=-1", "model.d=big", "model.colour=red"),
         ("optim.lr", "model.d", "'big'", "model.colour"), lines=3, subprocess=True),
    Case("flag-workers-zero", "train", "`--workers 0`", tiny("--workers", "0"),
         ("--workers", "0")),
    Case("flag-workers-range-reversed", "train", "`--workers 3-1` (an elastic range, min > max)",
         tiny("--workers", "3-1"), ("--workers", "1 <= MIN <= MAX", "3-1")),
    Case("workers-range-zero-and-upload", "train",
         "`scaling.num_workers=[0,2] tracking.checkpoint_upload=later` together",
         tiny("scaling.num_workers=[0,2]", "tracking.checkpoint_upload=later"),
         ("scaling.num_workers", "[0, 2]", "tracking.checkpoint_upload", "'later'"), lines=2),
    Case("flag-gpus-zero", "train", "`--gpus-per-worker 0`", tiny("--gpus-per-worker", "0"),
         ("--gpus-per-worker", "0")),
    Case("flag-gpus-fraction", "train", "`--gpus-per-worker 1.5`",
         tiny("--gpus-per-worker", "1.5"), ("scaling.gpus_per_worker", "1.5")),
    Case("flag-cpus-nan", "train", "`--cpus-per-worker nan`", tiny("--cpus-per-worker", "nan"),
         ("--cpus-per-worker", "nan")),
    Case("name-absolute-path", "train", "`--name /some/abs/folder` (a path, not a name)",
         lambda tmp: tiny("--name", str(tmp / "victim"))(tmp), ("tracking.run_name", "victim")),
    Case("name-dot-dot", "train", "`--name ../up`", tiny("--name", "../up"),
         ("tracking.run_name", "'../up'")),
    Case("name-too-long", "train", "`--name` of 101 characters", tiny("--name", "x" * 101),
         ("tracking.run_name", "at most 100")),
    Case("checkpoint-folder-foreign", "train",
         "`--name N` where `checkpoints/N` holds files this project did not write",
         foreign_checkpoint_folder, ("checkpoints/keep-me", "notes.txt", "another --name")),
    Case("model-d-huge", "train", "`model.d=100000000000`", tiny("model.d=100000000000"),
         ("model.d", "<= 16384", "100000000000")),
    Case("model-parameters-too-many", "train", "`model.d=16000` (3 billion parameters)",
         tiny("model.d=16000"), ("model.feature_dim, d, word_dim and d_a make", "over the limit")),
    Case("config-billion-laughs", "train", 'a config of nested YAML aliases ("billion laughs")',
         config_file("laughs.yaml", BILLION_LAUGHS), ("laughs.yaml", "line 2", "alias")),
    Case("config-billion-laughs-print", "train", '`--print-config` of a "billion laughs" config',
         config_file("laughs.yaml", BILLION_LAUGHS, "--print-config"), ("laughs.yaml", "alias")),
    Case("config-deep-list", "train", "a config value nested 100,000 lists deep",
         config_file("deep.yaml", DEEP_LIST), ("deep.yaml", "nested deeper than 20 levels")),
    Case("config-too-large", "train", "a config file over 1 MB",
         config_file("big.yaml", "# padding\n" * 120_000), ("big.yaml", "over the limit of")),
    Case("override-alias", "train", "an override holding a YAML alias (`model.d=&a [*a]`)",
         tiny("model.d=&a [1, *a]"), ("override model.d", "alias")),
    Case("data-num-regions-beyond", "train",
         "a training row whose `num_regions` says 10⁹ of its 4 regions", num_regions_beyond,
         ("train/part-00000.parquet", "row 1", "num_regions 1000000000 not in 1..4")),
]  # fmt: skip


def case_env() -> dict:
    """A tracking server nobody answers and no Ray address: a late check fails differently."""
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "RAY_ADDRESS": ""}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path):
    r = run_case(case, *case.argv(tmp_path), env={**case_env(), **case.env},
                 cwd=tmp_path, timeout=120)  # fmt: skip
    assert_user_error(r, *case.names, lines=case.lines)
    assert "unreachable" not in r.stderr and "Ray:" not in r.stdout + r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_path_as_name_leaves_that_folder_alone(tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a.txt").write_text("mine\n")
    (victim / "sub" / "b.bin").write_bytes(b"\x00\x01")
    before = snapshot(victim)
    r = run_main("train", *tiny("--name", str(victim))(tmp_path), env=case_env(), cwd=tmp_path)
    assert_user_error(r, "tracking.run_name", str(victim))
    assert snapshot(victim) == before and len(before) == 2


def test_a_foreign_checkpoint_folder_is_left_alone(tmp_path):
    argv = foreign_checkpoint_folder(tmp_path)
    folder = tmp_path / "checkpoints" / "keep-me"
    before = snapshot(folder)
    r = run_main("train", *argv, env=case_env(), cwd=tmp_path)
    assert_user_error(r, "notes.txt")
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    ("extra", "message"), [((), "is unreachable"), (("model.feature_dim=32",), "feature_dim=16")]
)
def test_a_real_data_set_meets_the_checks_before_ray(extra, message, synthetic_small, tmp_path):
    """With a data set there: an MLflow server nobody answers, and a model that does not fit the
    data's features, are each the job's last line, before Ray starts."""
    r = run_main("train", "--config", TINY, "--data", synthetic_small, *extra, env=case_env(),
                 cwd=tmp_path)  # fmt: skip
    assert_user_error(r, message)
    assert last_line(r.stderr).startswith("error: ") and message in last_line(r.stderr)


@pytest.mark.parametrize("name", ["2024", "yes", "null"])
def test_name_flag_is_always_a_name(name, tmp_path):
    """``--name 2024`` is the run "2024" (not an int, bool or a fresh run): the job goes past
    the config to the next check, the missing data set."""
    r = run_main("train", *tiny("--name", name)(tmp_path), env=case_env(), cwd=tmp_path)
    assert_user_error(r, "no-data")
    assert "tracking.run_name" not in r.stderr
