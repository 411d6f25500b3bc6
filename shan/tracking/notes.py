"""A run's description (the ``mlflow.note.content`` tag, markdown): the best epoch's recall
table of a training, the results and origin of an evaluation (links into the MLflow UI).

A description someone edited in the UI is kept: the digest of the text this project wrote is
kept beside it (``shan.note_digest``), and only that text is replaced.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from shan.tracking.refs import ModelRef

DIGEST_TAG = "shan.note_digest"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def note_tags(text: str) -> dict[str, str]:
    """The tags that make ``text`` a run's description (for a run being created)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    return {MLFLOW_RUN_NOTE: text, DIGEST_TAG: _digest(text)}


def set_note(c: MlflowClient, run_id: str, text: str) -> bool:
    """Make ``text`` the run's description, unless it has one this project did not write
    (False then)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    tags = c.get_run(run_id).data.tags
    old = tags.get(MLFLOW_RUN_NOTE)
    if old and tags.get(DIGEST_TAG) != _digest(old):
        return False
    for key, value in note_tags(text).items():
        c.set_tag(run_id, key, value)
    return True


def training_note(run_name: str, epoch: object, table: str, scope: str = "") -> str:
    """Markdown: the dev recall table (:func:`shan.metrics.format_table`) of the best epoch;
    ``scope``: what it covers when not the whole split (`` on the first 250 dev images ...``)."""
    return (
        f"### Dev recall of the best epoch ({epoch}){scope}\n\n"
        f"Run `{run_name}`; recalls in percent. The checkpoint is the run's logged model "
        f"`model` (an MLflow pyfunc model).\n\n{table}\n"
    )


def describe_training(
    c: MlflowClient, run_id: str, run_name: str, best: dict, table: str, *, scope: str = ""
) -> None:
    """The best epoch's recall table (``best``: its metrics, with ``epoch``) as the run's
    description."""
    set_note(c, run_id, training_note(run_name, best.get("epoch"), table, scope))


def model_links(c: MlflowClient, model: ModelRef) -> list[str]:
    """Markdown links to the model's registered version and training run (where known)."""
    links = []
    if model.model_name and model.version:
        url = f"#/models/{model.model_name}/versions/{model.version}"
        links.append(f"model [{model.model_name} version {model.version}]({url})")
    if model.train_run_id:
        try:
            exp = c.get_run(model.train_run_id).info.experiment_id
            links.append(f"training run [{model.train_run_id}](#/experiments/{exp}/runs/"
                         f"{model.train_run_id})")  # fmt: skip
        except Exception:  # a run of another server, or deleted: named, not linked
            links.append(f"training run `{model.train_run_id}`")
    return links


def evaluation_note(c: MlflowClient, title: str, models: list[ModelRef], table: str) -> str:
    """Markdown: ``title``, each model with its links, and the recall table."""
    lines = [f"### {title}", ""]
    for m in models:
        lines.append(f"- `{m.ref}`" + "".join(f"; {link}" for link in model_links(c, m)))
    return "\n".join([*lines, "", "Recalls in percent.", "", table, ""])
