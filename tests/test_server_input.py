"""Hostile input: every malformed body is a 4xx that leaves the server serving, one log line per disconnect,
slow clients cut off, the connection limit, the Content-Type rule, and request schemas in /openapi.json."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from rh_trl.rewards.base import Reward, RewardOutput  # noqa: E402

from .test_server import SERVERS, RayServer, ThreadServer, server_config, start_server  # noqa: E402

GOOD = {"prompts": ["a", "b"], "completions": ["xyz", "xy"]}


class Length(Reward):
    """The completion's length in characters."""

    def __init__(self, name: str = "length") -> None:
        super().__init__(name=name)

    def compute(self, batch):
        return RewardOutput(
            [
                (float("nan") if s.response_text == "nan" else float(len(s.response_text)))
                if s is not None
                else None
                for s in batch.samples
            ]
        )


def length_server(kind: str = "uvicorn", **overrides) -> ThreadServer | RayServer:
    target = "tests.test_server_input:Length"
    specs = overrides.pop("rewards", None) or [{"name": "len", "type": "python", "target": target}]
    rewards = {spec["name"]: Length() for spec in specs}
    return start_server(kind, server_config(rewards=specs, **overrides), rewards)


@pytest.fixture(scope="module", params=SERVERS)
def srv(request):
    limits = {"max_request_bytes": 65536, "header_timeout_s": 1.0, "body_timeout_s": 1.0}
    with length_server(request.param, **limits) as server:
        yield server


def uvicorn_only(srv, why: str) -> None:
    """Skip on Ray Serve what the app does not do there."""
    if srv.kind == "ray":
        pytest.skip(f"on Ray Serve {why}")


def raw(srv, body: bytes, content_type: str | None = "application/json", path: str = "/v1/rewards"):
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(srv.url + path, content=body, headers=headers, timeout=10)


def nested(depth: int) -> bytes:
    return b'{"prompts": ["a"], "completions": ["b"], "col": [' + b"[" * depth + b"]" * depth + b"]}"


HOSTILE = {
    "5000 levels deep": (nested(5000), 400, "not valid JSON"),
    "100 levels deep": (nested(100), 422, "more than 32 levels deep"),
    "lone surrogate in model": (
        b'{"model": "\\ud800", "prompts": ["a"], "completions": ["b"]}',
        400,
        "surrogate",
    ),
    "lone surrogate in prompt": (b'{"prompts": ["\\udfff"], "completions": ["b"]}', 400, "surrogate"),
    "invalid UTF-8": (b'{"prompts": ["\xff"], "completions": ["b"]}', 400, "UTF-8"),
    "NaN": (b'{"prompts": ["a"], "completions": ["b"], "x": [NaN]}', 400, "not valid JSON"),
    "trailing garbage": (b'{"prompts": ["a"], "completions": ["b"]} x', 400, "not valid JSON"),
    "empty body": (b"", 400, "not valid JSON"),
    "null": (b"null", 422, "expected a JSON object"),
    "string": (b'"hello"', 422, "expected a JSON object"),
    "empty model": (b'{"model": "", "prompts": ["a"], "completions": ["b"]}', 422, "model"),
    "model not a string": (b'{"model": 5, "prompts": ["a"], "completions": ["b"]}', 422, "model"),
    "prompts null": (b'{"prompts": null, "completions": ["b"]}', 422, "prompts"),
    "message without role": (b'{"prompts": [[{"content": "x"}]], "completions": ["b"]}', 422, "role"),
    "content a number": (
        b'{"prompts": [[{"role": "user", "content": 5}]], "completions": ["b"]}',
        422,
        "content",
    ),
    "huge integer": (b'{"prompts": ["a"], "completions": ["b"], "x": [1' + b"0" * 400 + b"]}", 400, "JSON"),
    "column not a list": (b'{"prompts": ["a"], "completions": ["b"], "x": {"a": 1}}', 422, "column 'x'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_bodies_get_4xx_and_the_server_keeps_serving(srv, case):
    body, status, message = HOSTILE[case]
    response = raw(srv, body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    response.content.decode("ascii")  # every message is encodable, whatever the client sent
    assert httpx.post(srv.url + "/v1/rewards", json=GOOD).json()["rewards"] == [3.0, 2.0]


def test_empty_model_is_the_same_error_on_both_routes(srv):
    rewards = raw(srv, b'{"model": "", "prompts": ["a"], "completions": ["b"]}')
    openrlhf = raw(srv, b'{"model": "", "query": ["ab"], "prompts": ["a"]}', path="/get_reward")
    assert rewards.status_code == openrlhf.status_code == 422


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_post_needs_a_json_content_type(srv, content_type):
    # what a web page can make a browser send to a keyless loopback server without a CORS preflight
    response = raw(srv, b'{"prompts": ["a"], "completions": ["b"]}', content_type=content_type)
    assert response.status_code == 415 and "application/json" in response.json()["detail"]
    assert (
        raw(srv, b'{"prompts": ["a"], "completions": ["b"]}', "application/json; charset=utf-8").status_code
        == 200
    )


def test_openapi_documents_the_request_bodies(srv):
    document = httpx.get(srv.url + "/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, schema, required in (
        ("/v1/rewards", "RewardRequest", {"prompts", "completions"}),
        ("/get_reward", "OpenRLHFRequest", {"query"}),
    ):
        body = document["paths"][path]["post"]["requestBody"]
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert body["required"] and ref == f"#/components/schemas/{schema}"
        assert set(schemas[schema]["required"]) == required
    assert schemas["RewardRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["len"]
    message_ref = schemas["RewardRequest"]["properties"]["prompts"]["items"]["anyOf"][1]["items"]["$ref"]
    assert message_ref.removeprefix("#/components/schemas/") in schemas  # every reference resolves


def _uvicorn_and_rh_trl_lines(records: list[logging.LogRecord]) -> int:
    lines = 0
    for record in records:
        text = record.getMessage() + (
            "\n" + logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        )
        lines += len(text.splitlines())
    return lines


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_one_log_line_per_client_that_disconnects_mid_body(srv):
    uvicorn_only(srv, "the app logs in its replica's process, not in the test's")
    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "rh_trl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.INFO)
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(
                    b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b'{"prompts": ['
                )
                time.sleep(0.05)
        deadline = time.time() + 5
        while len(collect.records) < 20 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(collect)
            lg.setLevel(level)
    assert _uvicorn_and_rh_trl_lines(collect.records) == 20, [r.getMessage() for r in collect.records]
    assert all("went away" in r.getMessage() for r in collect.records)
    assert httpx.post(srv.url + "/v1/rewards", json=GOOD).status_code == 200


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> tuple[float, bytes]:
    """Send ``trickle`` one byte every 0.2 s until the server closes; (seconds until closed, what it sent)."""
    start = time.time()
    sock.settimeout(0.2)
    received = b""
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        try:
            chunk = sock.recv(4096)
            received += chunk
            if not chunk:
                break
        except TimeoutError:
            pass
        except OSError:
            break
        if time.time() - start > seconds:
            break
    return time.time() - start, received


def test_slow_headers_are_cut_off(srv):
    uvicorn_only(srv, "the HTTP proxy owns connections; header_timeout_s is uvicorn's")
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        took, received = _closed_within(
            sock, 6, b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        )
    assert took < 3 and received.startswith(b"HTTP/1.1 408")  # header_timeout_s = 1


def test_a_silent_connection_is_closed(srv):
    uvicorn_only(srv, "the HTTP proxy owns connections; header_timeout_s is uvicorn's")
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.settimeout(5)
        start = time.time()
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert time.time() - start < 3


def test_slow_body_gets_408(srv):
    head = b"POST /v1/rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(head)
        took, received = _closed_within(sock, 6, b'{"prompts": ["' + b"a" * 150)
    assert took < 3 and received.startswith(b"HTTP/1.1 408"), received  # body_timeout_s = 1
    assert b"did not arrive within 1 s" in received


def test_connection_limit_answers_503():
    with length_server(max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            time.sleep(0.1)
            assert httpx.post(server.url + "/v1/rewards", json=GOOD).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.1)
        assert httpx.post(server.url + "/v1/rewards", json=GOOD).status_code == 200


def test_api_key_on_the_command_line_warns_and_names_the_environment_variable(tmp_path, monkeypatch, capsys):
    from rh_trl import cli
    from rh_trl.serve import app

    started = []
    monkeypatch.setattr(app, "serve", lambda config, log_level: started.append(config))
    path = tmp_path / "s.yaml"
    path.write_text("rewards:\n  - {name: tiny, type: tiny}\n")
    assert cli.main(["serve", "--config", str(path), "--api-key", "k"]) == 0
    err = capsys.readouterr().err
    assert "process list" in err and "export RH_TRL_API_KEY" in err
    assert started[0].resolved_api_key() == "k"
    monkeypatch.setenv("RH_TRL_API_KEY", "from-env")
    assert cli.main(["serve", "--config", str(path)]) == 0
    assert capsys.readouterr().err == "" and started[1].resolved_api_key() == "from-env"


def test_a_nan_reward_is_answered_as_null(srv):
    answer = httpx.post(srv.url + "/v1/rewards", json={"prompts": ["a", "b"], "completions": ["nan", "xy"]})
    assert answer.status_code == 200 and answer.json()["rewards"] == [None, 2.0]
    assert answer.json()["num_none"] == 1
