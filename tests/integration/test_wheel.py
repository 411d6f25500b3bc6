"""The wheel, built and installed into a fresh virtual environment, works outside the source tree.

The wheel is built from a copy of the checkout (no ``build/`` or ``*.egg-info`` left in it, no
stale build folder of the checkout in the wheel) without build isolation (no download). The
fresh environment gets the project environment's site-packages through a ``.pth`` file, so
torch, Ray and MLflow resolve without a download; only that directory is added, so the
project environment's own ``.pth`` files (its editable install of ``shan``) are not read, and
``shan`` is the wheel's. The commands run from a temporary folder with ``PYTHONPATH`` unset:
the version, a tiny synthetic data set and its validation, and the packaged ``demo`` config
resolved around it.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import shan

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOT_COPIED = (
    ".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", "*.pyc",
    "build", "dist", "*.egg-info", "mlruns", "mlartifacts", "mlflow.db", "checkpoints",
)  # fmt: skip
# the caller's settings that would point the commands elsewhere than the fresh environment,
# a local Ray and a local MLflow store (Ray's token authentication settings stay)
DROPPED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "RAY_ADDRESS")
DROPPED_PREFIXES = ("MLFLOW_", "AWS_")


@dataclass
class Fresh:
    root: Path  # the virtual environment
    python: Path
    shan: Path  # the console script, written from the wheel's entry point
    site: Path  # its site-packages, where the wheel is unpacked


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building without isolation needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(work / "dist"), str(src)],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (built,) = (work / "dist").glob("shan-*.whl")
    return built


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in DROPPED and not k.startswith(DROPPED_PREFIXES)
    }
    env.update(PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def entry_points(whl: Path) -> configparser.ConfigParser:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser()
        parser.read_string(z.read(name).decode())
    return parser


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> Fresh:
    root = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
    )
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, env=clean_env(),
        ).stdout.strip()
    )  # fmt: skip
    # the project environment's packages (torch, ray, mlflow, ...), after the fresh ones
    (site / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    module, _, func = entry_points(wheel)["console_scripts"]["shan"].partition(":")
    script = root / "bin" / "shan"
    script.write_text(
        f"#!{python}\nimport sys\nfrom {module.strip()} import {func.strip()}\n"
        f"sys.exit({func.strip()}())\n"
    )
    script.chmod(0o755)
    return Fresh(root, python, script, site)


def run(args: list, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=clean_env(**env),
    )  # fmt: skip
    return r


def check(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r.stdout


# -- the wheel ------------------------------------------------------------------------------------
def test_the_wheel_holds_the_packages_and_their_data(wheel):
    assert wheel.name == f"shan-{shan.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{info}/METADATA").decode()
    for name in (
        "shan/__init__.py", "shan/py.typed", "shan/configs/demo.yaml", "shan/configs/f30k.yaml",
        "shan/configs/coco.yaml", "shan/eval/tiles.py", "shan/train/worker.py",
        "shan/tracking/refs.py", "shan_cli/__init__.py", "shan_cli/main.py",
    ):  # fmt: skip
        assert name in names, name
    tops = {n.split("/")[0] for n in names}
    assert tops == {"shan", "shan_cli", info}, tops  # no tests/, jobs/, cluster/, benchmarks/
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert f"\nVersion: {shan.__version__}\n" in metadata
    assert "\nName: shan\n" in metadata
    assert entry_points(wheel)["console_scripts"]["shan"].strip() == "shan_cli.main:run"


def test_the_fresh_environment_imports_the_wheel(fresh, tmp_path):
    code = (
        "import json, shan, shan_cli.main, shan.config as c, torch, ray; "
        "print(json.dumps([shan.__file__, shan_cli.main.__file__, str(c.CONFIG_DIR), "
        "shan.__version__]))"
    )
    got = json.loads(check(run([fresh.python, "-c", code], tmp_path)).splitlines()[-1])
    for path in got[:3]:
        assert Path(path).is_relative_to(fresh.site), (path, fresh.site)
    assert got[3] == shan.__version__


def test_shan_version(fresh, tmp_path):
    assert check(run([fresh.shan, "--version"], tmp_path)).strip() == f"shan {shan.__version__}"
    usage = run([fresh.shan], tmp_path)
    assert usage.returncode == 2 and "commands:" in usage.stdout


def test_python_m_shan_cli_main_version(fresh, tmp_path):
    out = check(run([fresh.python, "-m", "shan_cli.main", "--version"], tmp_path))
    assert out.strip() == f"shan {shan.__version__}"


def test_data_and_the_packaged_config_outside_the_source_tree(fresh, tmp_path):
    """The installed package generates and validates a data set, and its packaged ``demo``
    config resolves with a relative ``--data`` (``--print-config``: nothing starts). The
    trainings of test_train and test_multinode run from the checkout; one more here cost a
    minute of CI."""
    out = check(
        run(
            [fresh.shan, "data", "synthetic", "--out", "./tiny", "--train", "40", "--dev", "10",
             "--test", "10", "--regions", "4", "--feature-dim", "16", "--concepts", "8",
             "--captions-per-image", "2"],
            tmp_path,
        )
    )  # fmt: skip
    assert "wrote ./tiny" in out and (tmp_path / "tiny" / "dataset.json").is_file()
    out = check(run([fresh.shan, "data", "validate", "./tiny"], tmp_path))
    assert out.strip().endswith("./tiny: valid")
    out = check(
        run([fresh.shan, "train", "--config", "demo", "--data", "./tiny", "--print-config",
             "model.feature_dim=16"], tmp_path)
    )  # fmt: skip
    import yaml

    cfg = yaml.safe_load(out)
    assert cfg["name"] == "demo" and cfg["data"]["path"] == "./tiny"
    assert cfg["model"]["feature_dim"] == 16
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "mlflow.db").exists()
