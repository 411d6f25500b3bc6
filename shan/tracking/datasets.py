"""The data set a run read, as an MLflow dataset input (the run page's "Datasets")."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from typing import TYPE_CHECKING

from shan.data.format import DatasetCard

if TYPE_CHECKING:
    from mlflow.entities import Dataset
    from mlflow.tracking import MlflowClient

DIGEST_CHARS = 32  # MLflow's stores keep at most 36 characters of a digest


def digest(card: DatasetCard) -> str:
    """The card's content digest (sha256 over its files' checksums), shortened; for a card
    written without one, a digest of the card itself."""
    full = card.digest or hashlib.sha256(card.to_json().encode()).hexdigest()
    return full[:DIGEST_CHARS]


def profile(card: DatasetCard) -> dict:
    """What the UI shows of the data set: images and captions per split, region features."""
    return {
        "splits": {s: {"images": i.images, "captions": i.captions} for s, i in card.splits.items()},
        "regions": card.regions,
        "feature_dim": card.feature_dim,
        "vocab_size": card.vocab_size,
    }


def dataset(card: DatasetCard, source: str) -> Dataset:
    """The MLflow dataset of ``card`` read from ``source`` (a local path or an ``s3://`` URL,
    as the user gave it)."""
    from mlflow.entities import Dataset

    scheme = urllib.parse.urlsplit(source).scheme
    kind = scheme if len(scheme) > 1 else "local"  # "C:" is a drive, not a scheme
    return Dataset(
        name=card.name,
        digest=digest(card),
        source_type=kind,
        source=json.dumps({"uri": source}),
        profile=json.dumps(profile(card)),
    )


def log_dataset(c: MlflowClient, run_id: str, card: DatasetCard, source: str, context: str) -> None:
    """Log the data set as an input of the run, tagged with ``context`` (``training``,
    ``evaluation``). Logging the same data set again adds nothing."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    c.log_inputs(run_id, datasets=[DatasetInput(dataset(card, source), tags=tags)])
