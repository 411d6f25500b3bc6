"""An evaluation's own MLflow run: its tags, parameters, metrics and output files (the
pictures at the top, where the UI previews them), the evaluated data set as its input, and a
description with the recall table and links to the model's version and training run."""

from __future__ import annotations

import shutil

from shan.eval import outputs
from shan.eval.job import EvalOptions, EvalResult
from shan.tracking import context, datasets, notes
from shan.tracking.names import flat_metrics
from shan.tracking.runs import check_reachable, client, experiment_id, log_params, tracking_uri


def log_evaluation(
    result: EvalResult, out: str, opts: EvalOptions, extra_tags: dict[str, str] | None = None
) -> str:
    """A run in ``opts.experiment`` tagged with the model (and its training run and version)."""
    uri = tracking_uri()
    check_reachable(uri)
    c = client(uri)
    exp_id = experiment_id(c, opts.experiment)
    models = result.models
    m0 = models[0]
    tags = {
        "shan.model_ref": ",".join(m.ref for m in models),
        "shan.split": opts.split,
        "shan.protocol": opts.protocol,
        **({"shan.train_run_id": m0.train_run_id} if m0.train_run_id else {}),
        **(
            {"shan.model_name": m0.model_name, "shan.model_version": m0.version}
            if m0.model_name
            else {}
        ),
        **(extra_tags or {}),
    }
    meta = result.doc["meta"]
    title = f"Recall on {meta['data']} [{opts.split}], protocol {opts.protocol}"
    standard = {
        **context.source_tags("evaluate", "jobs/evaluate.py"),
        **notes.note_tags(notes.evaluation_note(c, title, models, result.table)),
    }
    tags = {**standard, **tags}  # the caller's tags win
    name = f"eval-{opts.split}-{opts.protocol}" + (f"-rerank{opts.rerank}" if opts.rerank else "")
    run = c.create_run(exp_id, run_name=name, tags=tags)
    rid = run.info.run_id
    try:
        if result.card is not None:
            datasets.log_dataset(c, rid, result.card, meta["data"], "evaluation")
        log_params(c, rid, {k: v for k, v in meta.items() if k != "model"} | {"out": out})
        for k, v in flat_metrics(result.metrics, opts.split).items():
            c.log_metric(rid, k, v)
        if "vs_exhaustive" in result.doc:  # a rerank beside an exhaustive evaluation
            diff = {"vs_exhaustive": result.doc["vs_exhaustive"]["total"]}
            for k, v in flat_metrics(diff, opts.split).items():
                c.log_metric(rid, k, v)  # e.g. test/vs_exhaustive/rsum
        folder = result.folder or out
        local, kept = outputs.local_copy(folder, result.names, int(opts.log_matrices_mb * 2**20))
        try:
            c.log_artifacts(rid, local)
        finally:  # the copy is ours to remove, whether the upload worked or not
            shutil.rmtree(local, ignore_errors=True)
        skipped = sorted(set(result.names) - set(kept))
        if skipped:
            c.set_tag(rid, "shan.not_logged", f"{', '.join(skipped)} (too large; in {folder})")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    c.set_terminated(rid, "FINISHED")
    return rid
