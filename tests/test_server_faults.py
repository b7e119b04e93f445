"""Faults: the server killed and restarted during a real GRPO run, bad requests answered 4xx without harm to
others, a failing request isolated from its batch, and requests in flight finished on shutdown."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

import rh_trl  # noqa: E402
from rh_trl.engines.http import RetryPolicy  # noqa: E402
from rh_trl.rewards.base import Reward, RewardOutput  # noqa: E402
from rh_trl.rewards.remote import RemoteRM  # noqa: E402

from .test_server import SERVERS, ThreadServer, free_port, server_config, start_server  # noqa: E402
from .trainer_runs import COMMON, prompt_dataset  # noqa: E402

FAST = RetryPolicy(attempts=2, initial=0.05, max=0.1, timeout=10)
KEY = "test-key"


class Slow(Reward):
    """Length of the completion; sleeps first, and fails on a completion that says BOOM."""

    def __init__(self, delay: float = 0.0, name: str = "slow") -> None:
        super().__init__(name=name)
        self.delay = delay

    def compute(self, batch):
        time.sleep(self.delay)
        if any(s is not None and s.response_text == "BOOM" for s in batch.samples):
            raise RuntimeError("BOOM in this batch")
        return RewardOutput([float(len(s.response_text)) for s in batch.samples])


# -- the server dies during training -------------------------------------------------------------------------------


def start_subprocess_server(config_path: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rh_trl.cli", "serve", "--config", config_path, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
    proc.kill()
    raise RuntimeError("the server did not come up in 60 s")


@pytest.mark.slow
def test_grpo_survives_server_kill_and_restart(tmp_path, policy, llama_tok):
    from trl import GRPOConfig, GRPOTrainer

    config = tmp_path / "serve.yaml"
    config.write_text("rewards:\n  - {name: tiny, type: tiny, options: {style: llama, seed: 0}}\n")
    port = free_port()
    servers = [start_subprocess_server(str(config), port)]
    calls = {"n": 0}

    def outage(prompts, completions, **kwargs):
        """A plain reward that runs before the async ones: step 2 kills the server, step 3 restarts it."""
        calls["n"] += 1
        if calls["n"] == 2:
            servers[-1].kill()
            servers[-1].wait()
        if calls["n"] == 3:
            servers.append(start_subprocess_server(str(config), port))
        return [float(len(c[0]["content"])) for c in completions]

    remote = RemoteRM(f"http://127.0.0.1:{port}", "tiny", name="remote_tiny", retry=FAST)
    try:
        args = GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=4, max_steps=4, **COMMON)
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=[remote, outage],
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=llama_tok,
        )
        trainer.train()
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    logs = [h for h in trainer.state.log_history if "remote_tiny/num_none" in h]
    assert trainer.state.global_step == 4 and len(logs) == 4
    batch = COMMON["per_device_train_batch_size"]
    for step, h in enumerate(logs, start=1):
        if step == 2:  # the outage: every sample is None (NaN in TRL), counted, never 0
            assert h["remote_tiny/num_server_failed"] == batch and h["remote_tiny/num_none"] == batch
            mean = h["rewards/remote_tiny/mean"]  # TRL logs the NaN mean as None
            assert mean is None or math.isnan(mean)
        else:
            assert h["remote_tiny/num_server_failed"] == 0 and h["remote_tiny/num_none"] == 0
            assert math.isfinite(h["rewards/remote_tiny/mean"]) and h["rewards/remote_tiny/mean"] != 0
        assert math.isfinite(h["rewards/outage/mean"])


# -- bad requests ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SERVERS)
def keyed_server(request):
    specs = [
        {"name": "slow", "type": "python", "target": "tests.test_server_faults:Slow", "max_wait_ms": 100}
    ]
    config = server_config(rewards=specs, api_key=KEY, max_request_bytes=4096, max_items_per_request=16)
    with start_server(request.param, config, {"slow": Slow()}) as srv:
        yield srv


def post(srv, body=None, *, content=None, key=KEY, path="/v1/rewards"):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(srv.url + path, content=content, headers=headers)
    return httpx.post(srv.url + path, json=body, headers=headers)


GOOD = {"prompts": ["a", "b"], "completions": ["xyz", "xy"]}


@pytest.mark.parametrize(
    ("case", "status", "message"),
    [
        ("malformed json", 400, "not valid JSON"),
        ("not an object", 422, "expected a JSON object"),
        ("wrong types", 422, "prompts"),
        ("length mismatch", 422, "expected one prompt per completion"),
        ("bad column", 422, "column 'answer' must be a list"),
        ("oversized", 413, "exceeds the limit of 4096 bytes"),
        ("too many items", 413, "the limit is 16"),
        ("missing key", 401, "missing API key"),
        ("wrong key", 401, "wrong API key"),
        ("unknown model", 404, "unknown model 'nope'"),
        ("openrlhf lengths", 422, "expected one per query"),
    ],
)
def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(
    keyed_server, case, status, message
):
    srv = keyed_server
    requests = {
        "malformed json": lambda: post(srv, content=b'{"prompts": ["a"'),
        "not an object": lambda: post(srv, content=b"[1, 2]"),
        "wrong types": lambda: post(srv, {"prompts": 5, "completions": ["a"]}),
        "length mismatch": lambda: post(srv, {"prompts": ["a"], "completions": ["a", "b"]}),
        "bad column": lambda: post(srv, {**GOOD, "answer": "x"}),
        "oversized": lambda: post(srv, {"prompts": ["a" * 5000], "completions": ["b"]}),
        "too many items": lambda: post(srv, {"prompts": ["a"] * 17, "completions": ["b"] * 17}),
        "missing key": lambda: post(srv, GOOD, key=None),
        "wrong key": lambda: post(srv, GOOD, key="guess"),
        "unknown model": lambda: post(srv, {**GOOD, "model": "nope"}),
        "openrlhf lengths": lambda: post(srv, {"query": ["ab"], "prompts": ["a", "b"]}, path="/get_reward"),
    }
    response = requests[case]()
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    after = post(srv, GOOD)
    assert after.status_code == 200 and after.json()["rewards"] == [3.0, 2.0]


def test_a_failing_request_does_not_fail_its_batch(keyed_server):
    async def main():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(headers=headers, timeout=30) as http:
            bodies = [{"prompts": ["p"] * 2, "completions": ["x" * (i + 1), "y"]} for i in range(8)]
            bodies.insert(4, {"prompts": ["p"], "completions": ["BOOM"]})
            return await asyncio.gather(
                *(http.post(keyed_server.url + "/v1/rewards", json=b) for b in bodies)
            )

    before = keyed_server.metrics({"Authorization": f"Bearer {KEY}"})
    responses = asyncio.run(main())
    boom = responses.pop(4)
    assert boom.status_code == 500 and "BOOM" in boom.json()["detail"]
    assert [r.json()["rewards"] for r in responses] == [[float(i + 1), 1.0] for i in range(8)]
    after = keyed_server.metrics({"Authorization": f"Bearer {KEY}"})
    assert after["rewards"]["slow"]["failed_requests"] - before["rewards"]["slow"]["failed_requests"] == 1


def test_shutdown_finishes_requests_in_flight():
    config = server_config(rewards=[{"name": "slow", "type": "python", "target": "unused:unused"}])
    srv = ThreadServer(config, {"slow": Slow(delay=1.0)}).__enter__()
    result: dict = {}

    def call():
        result["response"] = httpx.post(srv.url + "/v1/rewards", json=GOOD, timeout=30)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the request is being scored
    srv.__exit__(None, None, None)  # asks the server to stop
    caller.join(timeout=30)
    assert result["response"].status_code == 200 and result["response"].json()["rewards"] == [3.0, 2.0]
    assert not srv.thread.is_alive()


def test_local_and_remote_names_do_not_collide():
    assert RemoteRM("http://127.0.0.1:1", "m").__name__ != RemoteRM("http://127.0.0.1:1", "m").__name__
    assert isinstance(RemoteRM("http://127.0.0.1:1"), rh_trl.Reward)
