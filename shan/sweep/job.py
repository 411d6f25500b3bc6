"""The sweep job: one MLflow parent run, a Ray Tune trial per point of the space, each trial a
training through ``shan.train.driver.run_training`` (the code of ``shan train``) as a child
run, ASHA stopping the trials whose ``val/rsum`` lags.

Every trial is sized alike (the training config's ``scaling``, planned once here) and Tune runs
as many at once as the cluster holds now (:func:`concurrency`: each with a CPU for its reads),
or the sweep file's ``max_concurrent_trials``. A trial's function asks Tune for a hundredth of a
CPU: its ``TorchTrainer`` asks Ray for the workers. Each epoch's metrics reach Tune through Ray
Train's ``TuneReportCallback``; when ASHA stops a trial, Tune ends the trial's actor, and with
it the Ray Train controller and workers it owns. The job then closes what the stopped trials left
open (their child runs: FINISHED, tagged ``shan.sweep.stopped_early``), writes the table as the
parent's description and the plot as its artifact, and registers the best trial's model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shan.config import Config
from shan.data import fs
from shan.errors import USER_ERRORS, JobError
from shan.runtime import Resources, failure_line, init_ray, on_cluster, plan_group, training_request
from shan.sweep import report
from shan.sweep.report import Trial
from shan.sweep.spec import Sweep, with_values
from shan.tracking import context, notes, runs
from shan.train.driver import (
    check_data,
    check_local_gpus,
    ensure_demo_data,
    new_run_name,
    storage_root,
)

PARENT_TAG = "mlflow.parentRunId"  # MLflow's nested runs
SWEEP_TAG = "shan.sweep"  # on the parent: "parent"; on a child: the parent's run name
TRIAL_TAG = "shan.sweep.trial"  # a child's Tune trial id
ROW_TAG = "shan.sweep.row"  # a child's row name (named trials)
STOPPED_TAG = "shan.sweep.stopped_early"  # "true" on a child that ASHA stopped
BEST_TAG = "shan.sweep.best_run"  # on the parent: the best child's run id
PLOT = "sweep.png"
TRIAL_CPU = 0.01  # a trial's own function (Tune refuses none); its workers ask for their own


@dataclass
class SweepResult:
    run_name: str
    mlflow_run_id: str
    mlflow_uri: str
    trials: list[Trial]
    best: Trial | None
    table: str
    registered: str | None = None  # "NAME version N"


@dataclass(kw_only=True)
class TrialJob:
    """What each trial gets (Tune's ``with_parameters``)."""

    sweep: Sweep
    base: Config  # every trial's config before its values: scaling planned, epochs set
    data: str  # the data set: s3://, or a local path made absolute (trials run elsewhere)
    parent_id: str
    parent_name: str
    uri: str  # MLflow
    ray_address: str | None  # the cluster the driver joined (None: a local instance)
    quiet_downloads: bool = False  # MLflow's download bars off (the driver writes to a log)
    source: dict[str, str] | None = None  # the parent's source tags (a child's too)


def trial_name(parent: str, trial_id: str) -> str:
    """``<parent>-t03``: the child run of Tune trial ``..._00002`` (numbered from 1)."""
    number = trial_id.rsplit("_", 1)[-1]
    return f"{parent}-t{int(number) + 1:02d}" if number.isdigit() else f"{parent}-{trial_id}"


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """A Tune trial: the training of the trial's values as a child run of the sweep.

    Each epoch but the last reaches Tune as the workers report it (:class:`EpochsToTune`),
    so that ASHA can stop the trial between epochs; the last is reported once the training
    has logged its outcome (model, table), which Tune's stop at ``max_t`` would cut short."""
    from ray import tune

    from shan.train.driver import run_training

    os.environ["MLFLOW_TRACKING_URI"] = job.uri
    if job.quiet_downloads:  # as the driver's (shan_cli.run_job: no bars in a log)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if job.ray_address:  # the trial's training joins the same cluster, as the driver did
        os.environ.setdefault("RAY_ADDRESS", job.ray_address)
    trial_id = tune.get_context().get_trial_id()
    row, values = job.sweep.values_of(config)
    cfg = with_values(job.base, values)
    cfg.tracking.run_name = name = trial_name(job.parent_name, trial_id)
    tags = {**(job.source or {}), PARENT_TAG: job.parent_id, SWEEP_TAG: job.parent_name,
            TRIAL_TAG: trial_id}  # fmt: skip
    if row is not None:
        tags[ROW_TAG] = row
    short = name[len(job.parent_name) + 1 :]  # t01: the trial's lines on the driver's console
    result = run_training(cfg, data=job.data, log=lambda line: print(f"[{short}] {line}"),
                          tags=tags, callbacks=(epochs_to_tune(cfg.optim.epochs),))  # fmt: skip
    best = {k: v for k, v in result.best_metrics.items() if isinstance(v, int | float)}
    tune.report({**best, "epoch": cfg.optim.epochs, "best_epoch": best.get("epoch", 0)})


def epochs_to_tune(last: int) -> Any:
    """Ray Train's ``TuneReportCallback`` that passes each epoch's metrics to Tune but the
    ``last`` one's (the trial reports that itself, after the training's outcome is logged)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if metrics and metrics[0].get("epoch", 0) >= last:
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochsToTune()


def concurrency(res: Resources, cluster: dict[str, float]) -> int:
    """How many trials of ``res`` the cluster holds at once, at least 1: each needs its
    workers' CPUs (and GPUs) and a whole CPU besides for its data set's reads. Ray Data shares
    the CPUs that no worker holds among the running data sets in whole CPUs, so that on 2 CPUs
    two trials' reads would both get none and wait for ever."""
    cpus = float(cluster.get("CPU", 0))
    slots = math.floor(cpus / (res.count * res.cpus_each + 1.0) + 1e-9)
    if res.use_gpu:
        slots = min(slots, math.floor(float(cluster.get("GPU", 0)) / (res.count * res.gpus_each)))
    return max(1, slots)


def plan_base(cfg: Config, sweep: Sweep, res: Resources) -> Config:
    """The config every trial starts from: ``cfg`` with its workers as planned (``res``) and
    the trial's epochs (``asha.max_t``); checked."""
    values: dict[str, Any] = {"optim.epochs": sweep.epochs(cfg)}
    sc = cfg.scaling
    if sc.num_workers is None:
        values["scaling.num_workers"] = res.count
    if sc.cpus_per_worker is None:
        values["scaling.cpus_per_worker"] = res.cpus_each
    if sc.use_gpu is None:
        values["scaling.use_gpu"] = res.use_gpu
    base = with_values(cfg, values)
    base.optim.worker_batch(res.count)  # a ConfigError before any trial
    return base


def run_sweep(
    cfg: Config,
    sweep: Sweep,
    data: str | None = None,
    register: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run ``sweep`` over the training config ``cfg`` on the data set ``data`` (default:
    cfg.data.path, else the demo set). Everything is checked before Ray starts or a run is
    made: the config, the data set, the tracking server, the parent run's name."""
    cfg.validate()
    check_local_gpus(cfg.scaling)
    given = data or cfg.data.path or ensure_demo_data(log)
    cfg.data.path = given
    root = given if fs.is_remote(given) else str(Path(given).absolute())
    check_data(cfg, root)
    uri = runs.tracking_uri()
    runs.check_reachable(uri)
    c = runs.client(uri)
    exp_id = runs.experiment_id(c, cfg.tracking.experiment)
    name = parent_name(cfg, sweep, lambda n: bool(runs.runs_named(c, exp_id, n)))
    ray = init_ray(log)
    cluster = ray.cluster_resources()
    res = plan_group(training_request(cfg.scaling), cluster)
    base = plan_base(cfg, sweep, res)
    at_once = sweep.max_concurrent or concurrency(res, cluster)
    log(f"sweep: {sweep.trial_count()} trial(s), up to {at_once} at once, each {res.describe()}")
    parent = runs.start_run(uri, cfg.tracking.experiment, name, parent_params(base, sweep),
                            parent_tags(base, sweep, root))  # fmt: skip
    log(f"MLflow: parent run {parent} ({name}) at {runs.redact(uri)}")
    address = os.environ.get("RAY_ADDRESS") if on_cluster() else None
    quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "").lower() == "false"
    job = TrialJob(sweep=sweep, base=base, data=root, parent_id=parent, parent_name=name,
                   uri=uri, ray_address=address, quiet_downloads=quiet,
                   source=context.source_tags("sweep", "jobs/sweep.py"))  # fmt: skip
    with runs.Heartbeat(uri, parent):
        try:
            results = _tune(job, at_once, storage_root(base))
            out = _conclude(job, results, register, log)
        except BaseException as e:
            _end_parent_failed(uri, parent, e, log)
            raise
    runs.end_run(uri, parent, "FINISHED")
    return out


def parent_name(cfg: Config, sweep: Sweep, taken: Callable[[str], bool]) -> str:
    """``--name`` (refused when a run has it), else ``sweep-<name>-<time>-<8 hex digits>``."""
    if cfg.tracking.run_name:
        if taken(cfg.tracking.run_name):
            raise JobError(
                f"a run named {cfg.tracking.run_name!r} exists: a sweep is a new parent run, "
                "choose another --name"
            )
        return cfg.tracking.run_name
    return new_run_name(cfg, taken, prefix="sweep", label=(sweep.name or cfg.name)[:40])


def parent_params(base: Config, sweep: Sweep) -> dict[str, Any]:
    """The shared config (less the swept keys) and the sweep's settings."""
    swept = set(sweep.keys())
    shared = {k: v for k, v in base.flat().items() if k not in swept}
    return {**shared, **sweep.params()}


def parent_tags(base: Config, sweep: Sweep, root: str) -> dict[str, str]:
    return {**context.source_tags("sweep", "jobs/sweep.py"), "shan.data": root,
            "shan.config": base.name, SWEEP_TAG: "parent"}  # fmt: skip


def _tune(job: TrialJob, at_once: int, storage: str) -> Any:
    """Tune's ``ResultGrid`` of every trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    # the console is the sweep's: no trial tables, no tracebacks of failed trials (each failed
    # trial's error is its child run's and the table's)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    sweep = job.sweep
    scheduler: Any = FIFOScheduler()
    if sweep.asha is not None:
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=sweep.asha.max_t,
            grace_period=sweep.asha.grace_period,
            reduction_factor=sweep.asha.reduction_factor,
        )
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"CPU": TRIAL_CPU})
    tuner = tune.Tuner(
        trainable,
        param_space=sweep.param_space(),
        tune_config=tune.TuneConfig(
            metric="val/rsum",
            mode="max",
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=at_once,
        ),
        run_config=tune.RunConfig(name=job.parent_name, storage_path=storage, verbose=0),
    )
    return tuner.fit()


def _children(c: Any, job: TrialJob) -> dict[str, Any]:
    """Tune trial id -> the child run it made."""
    exp = c.get_run(job.parent_id).info.experiment_id
    found = c.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = {runs.quote(job.parent_id)}")
    return {r.data.tags[TRIAL_TAG]: r for r in found if TRIAL_TAG in r.data.tags}


def _trial_of(result: Any, children: dict[str, Any], job: TrialJob) -> Trial:
    """A :class:`Trial` of Tune's ``Result`` and its child run (if the trial made one)."""
    tid = (result.metrics or {}).get("trial_id") or next(
        (t for t in children if t in Path(str(result.path)).name), None
    )
    child = children.get(tid) if tid else None
    row, values = job.sweep.values_of(result.config)
    frame = result.metrics_dataframe
    rsums = [] if frame is None or "val/rsum" not in frame else list(frame["val/rsum"].dropna())
    epochs = 0 if frame is None or "epoch" not in frame else int(frame["epoch"].max() or 0)
    error = None
    if result.error is not None:
        tags = child.data.tags if child is not None else {}
        error = tags.get(runs.ERROR_TAG) or error_line(result.error)
    name = row or (trial_name(job.parent_name, tid)[len(job.parent_name) + 1 :] if tid else "?")
    return Trial(
        name=name,
        values=values,
        rsum=max(rsums) if rsums else None,
        epochs=epochs,
        stopped=error is None and epochs < job.base.optim.epochs,
        run_id=child.info.run_id if child is not None else None,
        error=error,
    )


def error_line(e: BaseException) -> str:
    """One line for a failed trial's error: a user error's own first line (Ray wraps it in a
    ``RayTaskError`` with the trial's traceback), else :func:`failure_line`'s."""
    cause = getattr(e, "cause", None)
    for error in (cause, e):
        if isinstance(error, USER_ERRORS) and not hasattr(error, "cause"):
            return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return failure_line(cause if isinstance(cause, BaseException) else e)


def _close_stopped(c: Any, job: TrialJob, trial: Trial, child: Any) -> None:
    """A child run that its trial could not end (ASHA stopped it): FINISHED and tagged, or
    FAILED when its trial failed without ending it."""
    if child is None or child.info.status != "RUNNING":
        return
    run_id = child.info.run_id
    if trial.stopped:
        c.set_tag(run_id, STOPPED_TAG, "true")
        rsum = "no epoch" if trial.rsum is None else f"best val/rsum {trial.rsum:.1f}"
        text = f"### Stopped early by ASHA after epoch {trial.epochs} ({rsum})\n\n"
        notes.set_note(c, run_id, text + f"A trial of sweep `{job.parent_name}`.\n")
        runs.end_run(job.uri, run_id, "FINISHED")
    else:
        runs.end_run(job.uri, run_id, "FAILED", error=trial.error or "the trial ended",
                     kind="JobError")  # fmt: skip


def _conclude(
    job: TrialJob, results: Any, register: str | None, log: Callable[[str], None]
) -> SweepResult:
    """Close the stopped trials' runs; the parent's table, plot and best trial; register."""
    c = runs.client(job.uri)
    children = _children(c, job)
    trials = []
    for result in results:
        trial = _trial_of(result, children, job)
        child = next((r for r in children.values() if r.info.run_id == trial.run_id), None)
        _close_stopped(c, job, trial, child)
        trials.append(trial)
    order = {r.name: i for i, r in enumerate(job.sweep.rows)}
    trials.sort(key=lambda t: order.get(t.name, 0) if order else t.name)
    top = report.best(trials)
    if top is None:
        first = next((t.error for t in trials if t.error), "no trial ended an epoch")
        raise JobError(f"every trial of the sweep failed; the first: {first}")
    table = report.table(job.sweep, trials, job.base)
    notes.set_note(c, job.parent_id, report.note(job.sweep, trials, job.base, job.parent_name))
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / PLOT
        png.write_bytes(report.plot(job.sweep, trials, f"sweep {job.parent_name}: best val/rsum"))
        c.log_artifact(job.parent_id, str(png))
    c.set_tag(job.parent_id, BEST_TAG, str(top.run_id))
    c.log_metric(job.parent_id, "best/val_rsum", float(top.rsum or 0.0))
    out = SweepResult(job.parent_name, job.parent_id, job.uri, trials, top, table)
    if register:
        out.registered = _register(c, job, trials, register, log)
    return out


def _register(
    c: Any, job: TrialJob, trials: list[Trial], name: str, log: Callable[[str], None]
) -> str:
    """Register the model of the best trial that logged one (a trial that ran to the end)."""
    from shan.tracking import pyfunc

    for t in report.ranked(trials):
        outputs = c.get_run(t.run_id).outputs if t.run_id else None
        models = outputs.model_outputs if outputs is not None else []
        if t.error or not models:
            continue
        model_uri = f"models:/{models[0].model_id}"
        version = pyfunc.register(job.uri, model_uri, name, t.run_id)
        log(f"registered {name} version {version} ({model_uri}, trial {t.name})")
        return f"{name} version {version}"
    raise JobError(f"no trial of the sweep logged a model to register as {name!r}")


def _end_parent_failed(
    uri: str, run_id: str, error: BaseException, log: Callable[[str], None]
) -> None:
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    line = "; ".join(str(error).splitlines()) or type(error).__name__
    if not isinstance(error, USER_ERRORS + (KeyboardInterrupt,)):
        line = failure_line(error)
    try:
        runs.end_run(uri, run_id, status, error=line, kind=type(error).__name__)
    except Exception as e:  # the sweep's own error matters more
        log(f"could not mark MLflow run {run_id} {status}: {type(e).__name__}")
