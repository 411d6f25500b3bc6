"""``shan serve``: a trained model behind MLflow's own scoring server, with a guard in front.

The app is MLflow's (``mlflow.pyfunc.scoring_server.init``, what ``mlflow models serve`` runs),
over the model :mod:`shan.tracking.pyfunc` logs, so requests and answers are the same
(``/invocations``, ``/ping``, ``/health``, ``/version``). In front of it, :class:`RequestGuard`
refuses what MLflow's parser would choke on, before it is parsed:

- a body over ``max_bytes``: HTTP 413, read no further than the limit;
- JSON nested deeper than ``max_depth`` (MLflow's ``json.loads`` raises ``RecursionError`` on
  JSON nested about 1,000 deep, which its server answers with a bare 500): HTTP 400.

Both answers are MLflow's error shape, ``{"error_code": "BAD_REQUEST", "message": ...}``, and
name the limit. Every model reference the other commands take is served
(:func:`shan.tracking.refs.resolve`: a checkpoint folder, ``s3://``, ``runs:/``, ``models:/``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shan.config import Checked, Problems
from shan.errors import JobError
from shan.serving import SERVE_INDEX

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_DEPTH = 64  # a scoring request is 4 deep ({"inputs": {"features": [[[...]]]}})
MAX_BYTES = 2 << 30  # 2 GiB: SHAN_SERVE_MAX_FEATURES' 100,000,000 values as JSON text
_CHUNK = 1 << 24  # bytes scanned at once by json_depth
_KIND = np.zeros(256, np.int8)  # (256,) a byte's change of depth; a quote marked 2
_KIND[[ord("["), ord("{")]], _KIND[[ord("]"), ord("}")]], _KIND[ord('"')] = 1, -1, 2


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``body`` (``[]`` is 1),
    brackets inside strings not counted; linear in the body, never recursive."""
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes gone: quotes pair up
    deepest, depth, quoted = 0, 0, 0
    for start in range(0, len(text), _CHUNK):
        kind = _KIND[np.frombuffer(text, np.uint8, min(_CHUNK, len(text) - start), start)]
        kind = kind[np.flatnonzero(kind)]  # (k,) the brackets and quotes, in order
        if not len(kind):
            continue
        inside = np.bitwise_xor.accumulate((kind == 2).view(np.uint8)) ^ quoted  # (k,)
        step = np.where((inside == 0) & (kind != 2), kind, 0)  # (k,) outside strings: +-1
        levels = depth + np.cumsum(step, dtype=np.int64)  # (k,) the depth after each
        deepest, depth, quoted = max(deepest, int(levels.max())), int(levels[-1]), int(inside[-1])
    return deepest


@dataclass
class RequestGuard:
    """ASGI middleware: a POST body is read (at most ``max_bytes``) and checked
    (:func:`json_depth` at most ``max_depth``) before ``app`` sees it, then replayed to it."""

    app: App
    max_depth: int = MAX_DEPTH
    max_bytes: int = MAX_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body, refusal = await self._read(receive)
        if refusal is None and json_depth(body) > self.max_depth:
            refusal = (400, f"request: JSON nested deeper than {self.max_depth} levels")
        if refusal is not None:
            await _answer(send, *refusal)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: a disconnect
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (400, "request: the client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return b"", (413, f"request: body over the limit of {self.max_bytes} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def scoring_app(checkpoint: str, workdir: str, index: str | None = None) -> App:
    """MLflow's scoring app over the checkpoint folder ``checkpoint`` as the MLflow model
    training logs (saved into ``workdir/model``, a folder the caller removes after), searching
    ``index`` when given (loaded as ``SHAN_SERVE_INDEX`` is by ``mlflow models serve``)."""
    import mlflow
    from mlflow.pyfunc import scoring_server

    from shan.checkpoint import load_description
    from shan.tracking import pyfunc

    if index:
        os.environ[SERVE_INDEX] = index
    cfg, _ = load_description(checkpoint)
    path = os.path.join(workdir, "model")
    with pyfunc.quiet_saving():
        mlflow.pyfunc.save_model(
            path,
            python_model=pyfunc.ShanModel(),
            artifacts={pyfunc.ARTIFACT: checkpoint},
            signature=pyfunc.signature(cfg.model.feature_dim),
            pip_requirements=pyfunc.pip_requirements(),
        )
    app: App = scoring_server.init(mlflow.pyfunc.load_model(path))
    return app


@dataclass
class ServeOptions(Checked):
    """Where and how ``shan serve`` listens; :meth:`check` raises every problem at once."""

    host: str = "127.0.0.1"
    port: int = 5001
    index: str | None = None  # an index of the model (shan index build): the model searches too
    max_depth: int = MAX_DEPTH
    max_bytes: int = MAX_BYTES

    def problems(self) -> list[str]:
        p = Problems("--")
        p.at_least("port", self.port, 0)
        p.at_most("port", self.port, 65535)
        p.at_least("max-json-depth", self.max_depth, 4)  # a scoring request is 4 deep
        p.at_least("max-body-bytes", self.max_bytes, 1024)
        if not self.host.strip():
            p.bad("host", self.host, "an address to listen on")
        return list(p)


def serve(ref: str, opts: ServeOptions, log: Callable[[str], None] = print) -> None:
    """Serve the model ``ref`` names over HTTP until interrupted: MLflow's scoring app behind
    :class:`RequestGuard`, on ``opts.host:opts.port``. The model (and its index, when given) is
    loaded, and refused in one line, before the port is opened."""
    import uvicorn

    from shan.tracking import refs

    opts.check()
    check_port(opts.host, opts.port)
    resolved = refs.resolve(ref, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        with tempfile.TemporaryDirectory(prefix="shan-serve-") as workdir:
            app = scoring_app(resolved.path, workdir, opts.index)
            guarded = RequestGuard(app, opts.max_depth, opts.max_bytes)
            search = f", searching {opts.index}" if opts.index else ""
            log(f"serving {ref}{search} at http://{opts.host}:{opts.port} (Ctrl-C stops)")
            uvicorn.run(guarded, host=opts.host, port=opts.port, log_level="warning")
    finally:
        refs.cleanup([resolved])


def check_port(host: str, port: int) -> None:
    """JobError when ``host:port`` cannot be listened on (in use, or not this machine's)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise JobError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
