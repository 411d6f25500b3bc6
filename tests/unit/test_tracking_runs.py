"""MLflow helpers of a training that need no MLflow store (``shan.tracking.runs``): redaction
and quoting, the config keys a continued run may not change, and the reachability check with
MLflow's credentials (against a tiny local HTTP server)."""

from __future__ import annotations

import base64
import http.server
import threading

import pytest

from shan.config import Config, load_config
from shan.errors import JobError
from shan.tracking import runs as tracking
from shan.tracking.runs import RUN_TAG, config_differences, quote, redact


# -- redaction and quoting -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://alice:s3cret@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("http://u:p%40ss@127.0.0.1:5000", "http://u:***@127.0.0.1:5000"),
        ("https://tok3n@host:443/x?y=1", "https://***@host:443/x?y=1"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_redact(uri, shown):
    assert redact(uri) == shown
    assert "s3cret" not in redact(uri) and "p%40ss" not in redact(uri)


@pytest.mark.parametrize(
    "value", ["plain", "it's", 'say "hi"', "x' OR '1'='1", "back\\slash\\", "a%b_c", ""]
)
def test_quote_gives_mlflow_the_value_back(value):
    from mlflow.utils.search_utils import SearchUtils

    (parsed,) = SearchUtils.parse_search_filter(f"tags.`{RUN_TAG}` = {quote(value)}")
    assert parsed["value"] == value and parsed["key"] == RUN_TAG


def test_quote_refuses_what_mlflow_cannot_match():
    with pytest.raises(ValueError, match="both kinds of quote"):
        quote("""it's "both\"""")


# -- config differences ----------------------------------------------------------------------------
def test_config_differences_name_the_changed_keys():
    old = {k: str(v) for k, v in Config().flat().items()}
    new = load_config(None, ["optim.lr=1e-3", "model.d=64", "optim.epochs=40",
                             "tracking.run_name=other",
                             "scaling.num_workers=4"]).flat()  # fmt: skip
    diff = config_differences(old, new)
    assert [k for k, _, _ in diff] == ["model.d", "optim.lr"]
    assert ("optim.lr", "0.0002", "0.001") in diff
    assert config_differences(old, Config().flat()) == []
    assert config_differences({}, new) == []  # keys the run never stored are new ones
    # keys the run stored that the config no longer has (the former debug.*) are no change
    assert config_differences({**old, "debug.nan_at_step": "3"}, new) == diff


# -- credentials -----------------------------------------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    expected = ""

    def do_GET(self):  # noqa: N802
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_check_reachable_sends_mlflows_credentials(health_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    _Health.expected = basic("alice", "s3cret")
    with pytest.raises(JobError, match="refused the credentials") as info:
        tracking.check_reachable(health_server)
    assert "MLFLOW_TRACKING_USERNAME" in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    tracking.check_reachable(health_server)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    _Health.expected = "Bearer tok"
    tracking.check_reachable(health_server)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var)
    # credentials in the URI itself are used, and never shown
    _Health.expected = basic("bob", "pw@x")
    tracking.check_reachable(health_server.replace("//", "//bob:pw%40x@"))
    with pytest.raises(JobError) as info:
        tracking.check_reachable(health_server.replace("//", "//bob:wrong@"))
    assert "wrong" not in str(info.value) and "bob:***@" in str(info.value)


def test_an_unreachable_server_is_named_without_its_password():
    from shan_stack import free_port

    with pytest.raises(JobError, match="is unreachable") as info:
        tracking.check_reachable(f"http://bob:hunter2@127.0.0.1:{free_port()}", timeout=5)
    assert "hunter2" not in str(info.value)
