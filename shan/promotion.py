"""Scheduled promotion of registered model versions: the better model takes the alias.

A version's result on a split and protocol is kept as a tag of the version
(``shan.eval.<split>.<protocol>.rsum``), so a scheduled job skips a version it has already
evaluated, and a candidate is compared with the alias's holder on the same split and protocol.
``evaluate`` is given by the caller (the evaluation job), so this module never imports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shan.errors import JobError
from shan.tracking import refs
from shan.tracking.runs import check_reachable, client, tracking_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

Evaluate = Callable[[str], tuple[float, str | None]]  # model ref -> (total rsum, eval run id)


def eval_tag(split: str, protocol: str) -> str:
    return f"shan.eval.{split}.{protocol}.rsum"


def promote(
    candidate: str,
    alias: str,
    evaluate: Evaluate,
    where: tuple[str, str],
    *,
    log: Callable[[str], None] = print,
    c: MlflowClient | None = None,
) -> dict[str, Any]:
    """Evaluate ``candidate`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``), compare it
    with the version holding ``alias`` on the same split and protocol, and move the alias when
    the candidate's rsum is higher. ``evaluate(ref) -> (rsum, eval run id)``; ``where`` is
    (split, protocol); ``c`` an MLflow client (default: one for ``MLFLOW_TRACKING_URI``). A
    candidate that already holds ``alias`` is "unchanged" (never reported as promoted), not
    evaluated again."""
    from mlflow.exceptions import MlflowException

    if not candidate.startswith("models:/"):
        raise JobError("--promote needs a registered model: --model models:/NAME@ALIAS")
    split, protocol = where
    if c is None:
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
    rsum, run_id = evaluate(f"models:/{name}/{cand.version}")
    champion = _holder(c, name, alias)
    if champion is not None and champion.version != cand.version:
        ch_tag = (champion.tags or {}).get(tag)
        if ch_tag is None:
            ch_rsum, _ = evaluate(f"models:/{name}/{champion.version}")
            ch_tag = f"{ch_rsum:.4f}"
            c.set_model_version_tag(name, champion.version, tag, ch_tag)
        ch_rsum = float(ch_tag)
    else:
        ch_rsum = None
    # tagged only now: a comparison that failed above leaves the candidate to be tried again
    c.set_model_version_tag(name, cand.version, tag, f"{rsum:.4f}")
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


def _holder(c: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
