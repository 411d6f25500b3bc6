"""An evaluation's own MLflow run, and scheduled promotion of registered model versions.

A version's result on a split and protocol is kept as a tag of the version
(``shan.eval.<split>.<protocol>.rsum``), so a scheduled job skips a version it has already
evaluated, and a candidate is compared with the champion on the same split and protocol.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

from shan.errors import JobError
from shan.eval import outputs, refs
from shan.train.tracking import check_reachable, client, experiment_id, log_params, tracking_uri


def flat_eval_metrics(metrics: dict[str, dict], split: str) -> dict[str, float]:
    out = {}
    for score, m in metrics.items():
        for k, v in m.items():
            out[f"{split}/{k}" if score == "total" else f"{split}/{score}/{k}"] = v
    return out


def log_evaluation(result: dict, out: str, opts, extra_tags: dict | None = None) -> str:
    """A run in ``opts.experiment`` tagged with the model (and its training run and version)."""
    uri = tracking_uri()
    check_reachable(uri)
    c = client(uri)
    exp_id = experiment_id(c, opts.experiment)
    models: list[refs.ModelRef] = result["models"]
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
    run = c.create_run(exp_id, run_name=f"eval-{opts.split}-{opts.protocol}", tags=tags)
    rid = run.info.run_id
    try:
        meta = result["doc"]["meta"]
        log_params(c, rid, {k: v for k, v in meta.items() if k != "model"} | {"out": out})
        for k, v in flat_eval_metrics(result["metrics"], opts.split).items():
            c.log_metric(rid, k, v)
        local, kept = outputs.local_copy(out, result["names"], int(opts.log_matrices_mb * 2**20))
        c.log_artifacts(rid, local)
        shutil.rmtree(local, ignore_errors=True)
        skipped = sorted(set(result["names"]) - set(kept))
        if skipped:
            c.set_tag(rid, "shan.not_logged", f"{', '.join(skipped)} (too large; in {out})")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    c.set_terminated(rid, "FINISHED")
    return rid


def eval_tag(split: str, protocol: str) -> str:
    return f"shan.eval.{split}.{protocol}.rsum"


def promote(
    candidate: str,
    alias: str,
    evaluate: Callable[[str], tuple[dict, str]],
    split: str,
    protocol: str,
    log=print,
) -> dict:
    """Evaluate ``candidate`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``), compare it
    with the version holding ``alias`` on the same split and protocol, and move the alias when
    the candidate's rsum is higher. ``evaluate(ref) -> (result, eval run id)``. A candidate that
    already holds ``alias`` is "unchanged" (never reported as promoted), not evaluated again."""
    from mlflow.exceptions import MlflowException

    if not candidate.startswith("models:/"):
        raise JobError("--promote needs a registered model: --model models:/NAME@ALIAS")
    uri = tracking_uri()
    check_reachable(uri)
    c = client(uri)
    name = refs.parse_registered(candidate)[0]
    try:
        cand = refs.registered_version(c, candidate)
    except MlflowException as e:
        raise JobError(f"{candidate}: not found in the registry ({e})") from e
    tag = eval_tag(split, protocol)
    holder = _holder(c, name, alias)
    if holder is not None and holder.version == cand.version:
        log(f"{name} version {cand.version} already holds {alias!r}; nothing to promote")
        return {"decision": "unchanged", "version": cand.version, "alias": alias}
    if tag in (cand.tags or {}):
        log(
            f"{name} version {cand.version} was already evaluated on {split} ({protocol}): "
            f"rsum {cand.tags[tag]}; skipped"
        )
        return {"decision": "skipped", "version": cand.version}
    result, run_id = evaluate(f"models:/{name}/{cand.version}")
    rsum = result["metrics"]["total"]["rsum"]
    c.set_model_version_tag(name, cand.version, tag, f"{rsum:.4f}")
    champion = _holder(c, name, alias)
    if champion is not None and champion.version != cand.version:
        ch_tag = (champion.tags or {}).get(tag)
        if ch_tag is None:
            ch_result, _ = evaluate(f"models:/{name}/{champion.version}")
            ch_tag = f"{ch_result['metrics']['total']['rsum']:.4f}"
            c.set_model_version_tag(name, champion.version, tag, ch_tag)
        ch_rsum = float(ch_tag)
    else:
        ch_rsum = None
    better = ch_rsum is None or rsum > ch_rsum
    if better:
        c.set_registered_model_alias(name, alias, cand.version)
    decision = {
        "decision": "promoted" if better else "kept",
        "model": name,
        "candidate_version": cand.version,
        "candidate_rsum": rsum,
        "alias": alias,
        "previous_version": None if champion is None else champion.version,
        "previous_rsum": ch_rsum,
        "split": split,
        "protocol": protocol,
    }
    if run_id:
        c.set_tag(run_id, "shan.promotion", decision["decision"])
        c.log_dict(run_id, decision, "promotion.json")
    log(json.dumps(decision))
    return decision


def _holder(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
