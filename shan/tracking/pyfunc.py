"""The trained model as an MLflow model: ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` and
``mlflow models serve`` score with it.

Layout of a logged model (``models:/m-...``): MLflow's ``MLmodel``, the pickled
:class:`ShanModel`, and the checkpoint folder as its artifact ``checkpoint`` (``model.pt``,
``config.yaml``, ``vocab.json``: :mod:`shan.checkpoint`'s format; ``MLmodel`` says where, and
:func:`shan.tracking.refs.checkpoint_in` finds it for evaluation). Input and output:
:mod:`shan.serving`, which checks types, shapes and sizes; the signature names the tensors
without typing them (:func:`signature` says why), with an input example (:func:`input_example`).

Environment: a process that loads the model needs the ``shan`` package installed (the project's
image has it; ``pip install`` of its wheel elsewhere), and is expected to run in that
environment (``mlflow models serve --env-manager local``). The model does not carry shan's code
(``code_paths``): MLflow would put a second copy of ``shan`` in front of the installed one, and in
a process that has imported shan already (evaluation, the tests) two copies of the checkpoint
and model classes would meet. ``pip_requirements`` pins what scoring imports (torch, numpy,
pyarrow, pyyaml, nltk, mlflow) at the versions that logged the model, so the environment is
recorded and MLflow does not have to infer it (which would load the model once more).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.pyfunc import PythonModel

from shan.model import SCORES
from shan.tracking.refs import ARTIFACT
from shan.tracking.runs import using_tracking_uri

if TYPE_CHECKING:
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient

    from shan.config import Config
    from shan.vocab import Vocabulary

MODEL_NAME = "model"  # the logged model's name in a training run
INPUTS = ("features", "counts", "captions")  # shan.serving.FIELDS
# what scoring imports (nltk: the captions are tokenized with its word_tokenize, shan.vocab)
SCORING_NEEDS = ("torch", "numpy", "pyarrow", "pyyaml", "nltk", "mlflow")


class ShanModel(PythonModel):
    """SHAN as an MLflow ``PythonModel``: :meth:`predict` takes
    ``{"features": float32 (N, R, D), "counts": int64 (N,), "captions": str (M,)}`` and returns
    ``{"total", "l2l", "g2l", "g2g"}``, each float32 (N, M), from :func:`shan.serving.score_request`
    (the scorer evaluation uses). CUDA when the loading process has it, else the CPU.

    With ``SHAN_SERVE_INDEX=DEST`` in the loading process's environment (an index of this model,
    ``shan index build``), a request with empty ``features`` and ``counts`` searches it for its
    captions: :func:`shan.serving.search_request` (params ``top`` and ``rerank``)."""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint of the model's ``checkpoint`` artifact (weights, config, vocab),
        and the index ``SHAN_SERVE_INDEX`` names, if any (refused in one line when it is not
        this model's, or the model has no first stage: the model does not load)."""
        import os

        import torch

        from shan.checkpoint import load_model
        from shan.serving import SERVE_INDEX, open_serving_index

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = context.artifacts[ARTIFACT]
        self.loaded = load_model(folder, self.device)
        dest = os.environ.get(SERVE_INDEX, "").strip()
        self.index = open_serving_index(self.loaded, folder, dest) if dest else None

    # The input is the dict of named arrays that MLflow builds from the signature. The hint is
    # np.ndarray, a type MLflow takes as is (no signature inferred from it, no validation): a
    # dict hint is one MLflow cannot use, and warns about, as it warns about no hint at all.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """The four score matrices of ``model_input``, or, for a search with an index loaded,
        its best images and their scores (:func:`shan.serving.answer`); MlflowException (a 400
        when served) naming the field when the request cannot be answered, and one without a
        traceback (a 500) when scoring fails: no traceback reaches an HTTP answer."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        from shan.serving import InputError, answer

        request: Any = model_input
        try:
            return answer(self.loaded, getattr(self, "index", None), request, params, self.device)
        except InputError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as e:  # noqa: BLE001 (an HTTP answer: the message, not the traceback)
            raise MlflowException(
                f"scoring failed: {type(e).__name__}: {str(e)[:500]}", error_code=INTERNAL_ERROR
            ) from None


def signature(feature_dim: int) -> ModelSignature:
    """Inputs ``features``, ``counts``, ``captions``, each an object tensor (-1,) that MLflow
    passes on as sent; outputs the four scores, each (-1, -1) float32.

    The inputs are untyped on purpose: for a typed tensor MLflow's scoring server converts the
    JSON before the model sees it (a count 1.5 becomes 1, a caption ``{"a": 1}`` the string
    ``"{'a': 1}"``); :mod:`shan.serving` checks the types and shapes itself (features (N, R, D)
    with D = ``feature_dim`` numbers, counts (N,) integers, captions (M,) strings).

    Params ``top`` and ``rerank``: a search's k and K (with an index loaded, ``features`` and
    ``counts`` empty: :func:`shan.serving.search_request`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from shan.rerank import DEFAULT_RERANK, DEFAULT_TOP

    del feature_dim  # the request's shapes are checked by shan.serving
    inputs = Schema([TensorSpec(np.dtype(object), (-1,), name) for name in INPUTS])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1), k) for k in SCORES])
    params = ParamSchema(
        [ParamSpec("top", "long", DEFAULT_TOP), ParamSpec("rerank", "long", DEFAULT_RERANK)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(cfg: Config, vocab: Vocabulary, images: int = 2, regions: int = 3) -> dict:
    """``images`` images of ``regions`` random regions (the second with one fewer) and three
    captions made of the vocabulary's first words."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(images, regions, cfg.model.feature_dim)).astype(np.float32)
    counts = np.full(images, regions, dtype=np.int64)
    counts[1:] = max(1, regions - 1)
    words = vocab.idx2word[4:] or ["a"]  # after <pad>, <start>, <end>, <unk>
    captions = [" ".join(words[i : i + 4]) or "a" for i in (0, 4, 8)]
    return {"features": features, "counts": counts, "captions": np.array(captions)}


@contextmanager
def quiet_saving() -> Iterator[None]:
    """MLflow's notes while it saves a :class:`ShanModel` off the console: the CloudPickle
    warning (the model is this project's own class), "Validating input example" and the
    missing-example warning; its errors still show."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def pip_requirements() -> list[str]:
    """:data:`SCORING_NEEDS` at the versions installed here (see the module's docstring)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in SCORING_NEEDS]


def log_model(
    uri: str, run_id: str, checkpoint: str | Path, name: str = MODEL_NAME, step: int = 0
) -> str:
    """Log the checkpoint folder ``checkpoint`` as an MLflow model of run ``run_id`` (shown
    under the run's logged models) and return its ``models:/m-...`` URI.

    The run is neither started nor ended here (its status stays what it is): the logged model
    is created with the client, tied to the run as its source and as its output at ``step``
    (the epoch of the checkpoint)."""
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking import MlflowClient

    from shan.checkpoint import load_description

    cfg, vocab = load_description(checkpoint)
    c = MlflowClient(tracking_uri=uri)
    run = c.get_run(run_id)
    model = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
    # pyfunc.log_model writes through the global tracking URI
    with using_tracking_uri(uri), quiet_saving():
        mlflow.pyfunc.log_model(
            name=name,
            python_model=ShanModel(),
            artifacts={ARTIFACT: str(checkpoint)},
            signature=signature(cfg.model.feature_dim),
            input_example=input_example(cfg, vocab),
            pip_requirements=pip_requirements(),
            model_id=model.model_id,
        )
    c.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return f"models:/{model.model_id}"


def register(uri: str, model_uri: str, name: str, run_id: str | None = None) -> str:
    """A new version of registered model ``name`` (created if needed) from the logged model
    ``model_uri`` (``models:/m-...``); its version number."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    try:
        c.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    model_id = model_uri.removeprefix("models:/")
    # the registry looks the logged model up through the global tracking URI (MLflow 3.x)
    with using_tracking_uri(uri):
        mv = c.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id)
    _link_version(c, model_id, name, str(mv.version))
    return str(mv.version)


def _link_version(c: MlflowClient, model_id: str, name: str, version: str) -> None:
    """The logged model's ``mlflow.modelVersions`` tag, which the MLflow UI shows as its
    registered versions (what ``mlflow.register_model`` sets)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    raw = c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    try:
        versions = json.loads(raw) if raw else []
    except ValueError:
        versions = []
    versions = [*(v for v in versions if isinstance(v, dict)), {"name": name, "version": version}]
    c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
