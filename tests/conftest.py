"""Shared fixtures. Integration fixtures start real services on 127.0.0.1 through
``cluster/shan_stack.py`` (the same code as ``cluster/local.sh``), once per test session.
``shan``, ``shan_cli``, ``tests`` and ``shan_stack`` import through pytest's ``pythonpath``
(``pyproject.toml``)."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Bytecode caches for what the tests import, in this process and in every job, Ray worker and
# server they start: with PYTHONDONTWRITEBYTECODE set, each of those would compile what it
# imports from source again, every time.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# Ray reads its authentication settings once per process, at first use: set them before any
# test imports Ray, with a token file of this session that the session's head will use too.
_TOKEN_DIR = tempfile.mkdtemp(prefix="shan-tests-")
atexit.register(shutil.rmtree, _TOKEN_DIR, True)
_TOKEN = Path(_TOKEN_DIR, "ray_auth_token")
_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)
# and Ray on 127.0.0.1 only, as the local stack and local runs have it
from shan.runtime import keep_ray_on_loopback  # noqa: E402

keep_ray_on_loopback()


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """A Ray head (token auth), an MLflow server and an S3 endpoint; their variables are set."""
    import shan_stack as svc_mod

    state = tmp_path_factory.mktemp("services")
    svc = svc_mod.up(str(state), num_cpus=2)
    saved = dict(os.environ)
    os.environ.update(svc.env)
    try:
        yield svc
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            svc_mod.down(str(state))
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_client(services):
    """This process connected to the session's Ray head."""
    import ray

    ray.init(address=services.env["RAY_ADDRESS"], log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def s3_root(services):
    return "s3://shan/tests"


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small local synthetic data set (train 120, dev 40, test 60 images): the tiny config
    (a global batch of 32) takes 18 steps an epoch."""
    from shan.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(
        str(root),
        images={"train": 120, "dev": 40, "test": 60},
        regions=6,
        feature_dim=16,
        concepts=30,
        rows_per_file=100,
        chunk_rows=50,
        log=lambda s: None,
    )
    return str(root)


@pytest.fixture(scope="session")
def converted_images(tmp_path_factory):
    """(images folder, data set): 6 small pictures (4 train, 2 test) converted in this process
    by the grid extractor (random resnet50 at 64 x 64: 4 regions of 2048-d)."""
    from tests.helpers import convert_images_here

    tmp = tmp_path_factory.mktemp("images")
    return convert_images_here(tmp, 6, split=lambda i: "train" if i < 4 else "test")
