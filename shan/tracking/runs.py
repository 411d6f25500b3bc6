"""MLflow: where runs go, one run per training run (also across restarts), and logging.

Credentials come from MLflow's own environment variables (``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``, or ``MLFLOW_TRACKING_TOKEN``), which the MLflow client honours;
:func:`check_reachable` sends the same. :func:`redact` hides a password in a URI before it is
printed, and :func:`quote` makes a string literal for an MLflow filter string.

A training run keeps the tag ``shan.heartbeat`` fresh while its driver lives; a second training
of the same name is refused while the first one's heartbeat is fresh, and a run is continued
only with the config it was started with (:func:`config_differences`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shan.errors import JobError
from shan.tracking.context import missing

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

RUN_TAG = "shan.run_name"
HEARTBEAT_TAG = "shan.heartbeat"  # seconds since the epoch, refreshed while the driver runs
OWNER_TAG = "shan.owner"  # a token of the driver that last claimed the run
FATAL_TAG = "shan.fatal"  # a user error a worker raised (JSON: token, type, message)
ERROR_TAG, ERROR_TYPE_TAG = "shan.error", "shan.error_type"  # why a run FAILED, one line

# the experiment tag the MLflow UI reads to open an experiment in its model-training view
# (not the GenAI one); the value as the UI's bundle spells it
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"

HEARTBEAT_EVERY = 30.0  # seconds between heartbeats
HEARTBEAT_STALE = 120.0  # a RUNNING run whose heartbeat is older than this counts as dead

# keys that may differ when a run is continued: naming, resources (a fixed or an elastic
# group alike: the global batch is the same at any size), logging, checkpoint upload, and the
# number of epochs (continuing a finished run to train it longer)
RESUME_MAY_DIFFER = (
    "tracking.run_name", "tracking.log_every", "tracking.keep_checkpoints",
    "tracking.max_failures", "tracking.system_metrics_every", "tracking.checkpoint_upload",
    "optim.epochs", "scaling.",
)  # fmt: skip


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` in the block, for the MLflow calls that take
    no URI; then what it was, ``MLFLOW_TRACKING_URI`` of the environment included (MLflow's own
    ``_use_tracking_uri`` would remove that variable when no URI had been set)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # type: ignore[arg-type]  # None unsets it
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


# MLflow's own retry and timeout variables for a lookup (a model to download): a server that is
# gone fails in seconds, not after MLflow's default of 7 retries with backoff (about 4 min).
LOOKUP_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@contextmanager
def bounded_lookups() -> Iterator[None]:
    """:data:`LOOKUP_HTTP` in the environment within the block, where the user has not set
    those variables; then as before."""
    added = [k for k in LOOKUP_HTTP if k not in os.environ]
    os.environ.update({k: LOOKUP_HTTP[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def redact(uri: str) -> str:
    """``uri`` with the password of ``user:password@`` (or a lone ``token@``) replaced by
    ``***``, so it can be printed."""
    text = str(uri)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        return text
    if "@" not in parts.netloc:
        return text
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, sep, _ = userinfo.partition(":")
    hidden = f"{user}:***" if sep else "***"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{hidden}@{host}"))


def quote(value: str) -> str:
    """``value`` as a string literal of an MLflow filter string (``tags.x = {quote(v)}``).

    MLflow takes the text between the quotes as it is (no escapes), so the value is enclosed
    in whichever quote it does not contain; a value holding both is refused (ValueError)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both kinds of quote and cannot be matched by MLflow")


def _auth_request(url: str) -> tuple[urllib.request.Request, ssl.SSLContext | None]:
    """A request for ``url`` with MLflow's credentials: the environment's username/password or
    token, else the URL's own ``user:password@`` (taken out of the URL)."""
    parts = urllib.parse.urlsplit(url)
    user = password = None
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = (urllib.parse.unquote(p) for p in userinfo.partition(":"))
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    headers = {}
    env = os.environ
    if env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    if env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    elif user:
        pair = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        headers["Authorization"] = f"Basic {pair}"
    context = None
    if url.startswith("https://"):
        if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            context = ssl._create_unverified_context()
        elif env.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            context = ssl.create_default_context(cafile=env["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    return urllib.request.Request(url, headers=headers), context


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """A tracking server must answer ``/health`` (asked with MLflow's credentials); a clear
    JobError otherwise. The URI is printed without its password."""
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact(uri)
    try:
        request, context = _auth_request(f"{uri.rstrip('/')}/health")
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            if r.status == 200:
                return
            raise JobError(f"MLflow tracking server {shown} answered /health with {r.status}")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JobError(
                f"MLflow tracking server {shown} refused the credentials ({e.code}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
            ) from None
        raise JobError(f"MLflow tracking server {shown} answered /health with {e.code}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise JobError(f"MLflow tracking server {shown} is unreachable ({reason})") from None


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist yet; marked as a
    model-training experiment (:data:`KIND_TAG`) unless it has a kind already. Two jobs that
    create it at once get the same one."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={KIND_TAG: KIND})
        except MlflowException:  # created by another job since (else the error stands)
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def runs_named(c: MlflowClient, exp_id: str, run_name: str) -> list[Run]:
    """The MLflow runs of Ray Train run ``run_name`` in the experiment, oldest first."""
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = {quote(run_name)}")
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def heartbeat_age(run: Run, now: float | None = None) -> float | None:
    """Seconds since the run's driver last said it was alive; None if it never did."""
    try:
        beat = float(run.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return None
    return max(0.0, (time.time() if now is None else now) - beat)


def is_alive(run: Run, now: float | None = None) -> bool:
    """RUNNING with a heartbeat younger than :data:`HEARTBEAT_STALE`."""
    age = heartbeat_age(run, now)
    return run.info.status == "RUNNING" and age is not None and age < HEARTBEAT_STALE


def config_differences(
    stored: dict[str, str], params: dict[str, Any], may_differ: tuple[str, ...] = RESUME_MAY_DIFFER
) -> list[tuple[str, str, str]]:
    """(key, stored value, new value) for each parameter of the run that ``params`` changes,
    leaving out the keys that may differ on resume (a key stored without a value is new)."""
    out: list[tuple[str, str, str]] = []
    for key in sorted(params):
        if key.startswith(may_differ) or key not in stored:
            continue
        new = _param(params[key])
        if stored[key] != new:
            out.append((key, stored[key], new))
    return out


def _param(value: object) -> str:
    return str(value)[:6000]


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    *,
    settle: float = 0.5,
) -> str:
    """The MLflow run of Ray Train run ``run_name``: the existing one (continued) or a new one.

    Refused (JobError) while another training of that name is alive, or when the existing
    run was started with another config. ``settle`` seconds after claiming the run, the claim
    is read back, so that of two trainings started at once only one goes on. A continued run
    gets only the ``tags`` it does not have yet."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    owner = secrets.token_hex(8)
    found = runs_named(c, exp_id, run_name)
    if found:
        run = found[0]
        run_id = run.info.run_id
        if is_alive(run):
            raise JobError(
                f"run {run_name!r} is running (MLflow run {run_id}, last heartbeat "
                f"{heartbeat_age(run):.0f} s ago): wait for it to end, or choose another --name"
            )
        diff = config_differences(run.data.params, params)
        if diff:
            changes = ", ".join(f"{k} ({old} there, {new} here)" for k, old, new in diff)
            raise JobError(
                f"run {run_name!r} was started with another config: {changes}; use the same "
                "values to continue it, or choose another --name for a new run"
            )
        c.update_run(run_id, status="RUNNING")
        for key, value in missing(tags, run.data.tags).items():
            c.set_tag(run_id, key, value)
        _claim(c, run_id, owner)
        time.sleep(settle)
        if c.get_run(run_id).data.tags.get(OWNER_TAG) != owner:
            raise JobError(f"run {run_name!r} was continued by another training at the same time")
        return run_id
    run = c.create_run(
        exp_id,
        run_name=run_name,
        tags={RUN_TAG: run_name, HEARTBEAT_TAG: f"{time.time():.0f}", OWNER_TAG: owner, **tags},
    )
    run_id = run.info.run_id
    time.sleep(settle)
    first = runs_named(c, exp_id, run_name)
    if first and first[0].info.run_id != run_id:  # another training created it first
        c.delete_run(run_id)
        raise JobError(f"run {run_name!r} was started by another training at the same time")
    log_params(c, run_id, params)
    return run_id


def _claim(c: MlflowClient, run_id: str, owner: str) -> None:
    c.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
    c.set_tag(run_id, OWNER_TAG, owner)


def log_params(c: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def end_run(uri: str, run_id: str, status: str, error: str | None = None, kind: str = "") -> None:
    """Mark the run ended; a FAILED run gets its one error line as the tag ``shan.error``."""
    c = client(uri)
    if error is not None:
        c.set_tag(run_id, ERROR_TAG, error[:5000])
        c.set_tag(run_id, ERROR_TYPE_TAG, kind)
    c.set_terminated(run_id, status=status)


class Heartbeat:
    """While in its ``with`` block, a thread refreshes the run's ``shan.heartbeat`` tag."""

    def __init__(self, uri: str, run_id: str, every: float = HEARTBEAT_EVERY) -> None:
        self.uri, self.run_id, self.every = uri, run_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="shan-heartbeat", daemon=True)

    def _beat(self) -> None:
        c = client(self.uri)
        while not self._stop.wait(self.every):
            try:
                c.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception:  # a missed beat is retried at the next one
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class FatalBox:
    """Where a worker leaves the user error that ends the run (a tag of the MLflow run), for
    the driver to raise as the same type. ``token`` is the driver's, so that an error left by
    an earlier training of the same run is not mistaken for one of this training."""

    def __init__(self, uri: str, run_id: str, token: str) -> None:
        self.uri, self.run_id, self.token = uri, run_id, token

    def write(self, record: dict[str, Any]) -> None:
        record = {"type": str(record.get("type")), "message": str(record.get("message"))[:4000]}
        value = json.dumps({"token": self.token, **record})
        client(self.uri).set_tag(self.run_id, FATAL_TAG, value)

    def read(self) -> dict[str, Any] | None:
        """``{"type": ..., "message": ...}`` left by this training's workers, or None."""
        raw = client(self.uri).get_run(self.run_id).data.tags.get(FATAL_TAG)
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("token") != self.token:
            return None
        return {"type": record.get("type"), "message": record.get("message")}


class MetricLogger:
    """Batched metric logging to one run (used by rank 0 only)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = client(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)
