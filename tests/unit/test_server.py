"""shan.server: the JSON depth scan, the request guard in front of MLflow's app (driven as
ASGI, with a recording app behind it), the options' checks and the port check."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from shan import server
from shan.errors import ConfigError, JobError
from shan.server import RequestGuard, ServeOptions, json_depth

DEPTHS = [
    (b"1", 0),
    (b"", 0),
    (b"[]", 1),
    (b'{"a": [1, [2]], "b": "[[[["}', 3),
    (b'{"a": "\\"[[["}', 1),  # an escaped quote does not end the string
    (b'{"a": "\\\\", "b": [[1]]}', 3),  # an escaped backslash does not escape the quote
    (b'[["\\\\\\"]]"]]', 2),
    (b'"[" [[', 2),
    (b"[" * 100_000 + b"]" * 100_000, 100_000),
]


@pytest.mark.parametrize(("body", "depth"), DEPTHS)
def test_json_depth_counts_brackets_outside_strings(body, depth):
    assert json_depth(body) == depth


def test_json_depth_is_the_same_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(server, "_CHUNK", 3)
    for body, depth in DEPTHS[:-1]:
        assert json_depth(body) == depth, body


def test_json_depth_agrees_with_the_parser():
    value = {"inputs": {"features": [[[0.5, 1], [2, 3]]], "captions": ["a [b", 'c "{" d']}}
    body = json.dumps(value).encode()
    assert json_depth(body) == 5


class Recorder:
    """An ASGI app that records the body it receives and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(guard: RequestGuard, chunks: list[bytes], method: str = "POST") -> tuple[int, bytes]:
    """``guard`` called with a request whose body arrives in ``chunks``: (status, body)."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/invocations"}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_good_request_reaches_the_app_whole():
    app = Recorder()
    status, _ = call(RequestGuard(app), [b'{"inputs": ', b'{"captions": ["a"]}}'])
    assert status == 200 and app.bodies == [b'{"inputs": {"captions": ["a"]}}']


def test_deep_json_is_a_400_naming_the_limit_and_never_reaches_the_app():
    app = Recorder()
    status, body = call(RequestGuard(app, max_depth=8), [b"[" * 9 + b"]" * 9])
    assert status == 400 and app.bodies == []
    assert json.loads(body) == {
        "error_code": "BAD_REQUEST",
        "message": "request: JSON nested deeper than 8 levels",
    }
    status, _ = call(RequestGuard(app, max_depth=8), [b"[" * 8 + b"]" * 8])
    assert status == 200


def test_a_body_over_the_limit_is_a_413_read_no_further():
    app = Recorder()
    chunks = [b"x" * 600, b"x" * 600, b"never read"]
    status, body = call(RequestGuard(app, max_bytes=1024), chunks)
    assert status == 413 and app.bodies == []
    assert "over the limit of 1024 bytes" in json.loads(body)["message"]


def test_a_get_passes_through():
    app = Recorder()
    status, _ = call(RequestGuard(app, max_depth=4), [b"[[[[[[]]]]]]"], method="GET")
    assert status == 200 and app.bodies == [b"[[[[[[]]]]]]"]


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        ServeOptions(host=" ", port=70000, max_depth=2, max_bytes=10).check()
    text = str(e.value)
    for name in ("--host", "--port", "--max-json-depth", "--max-body-bytes"):
        assert name in text, text


def test_a_port_in_use_is_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(JobError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.check_port("127.0.0.1", port)
