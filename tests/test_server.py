"""The reward server against independent per-sample forward passes: both TRL formats, OpenRLHF's protocol,
the verl adapter, and 32 concurrent clients."""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

import rh_trl  # noqa: E402
from rh_trl.rewards.remote import RemoteRM  # noqa: E402
from rh_trl.serve.app import create_app, uvicorn_config  # noqa: E402
from rh_trl.serve.config import ServerConfig, load_config  # noqa: E402

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS  # noqa: E402

TOL = 1e-5


# -- helpers shared by the server test files --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    kind = "uvicorn"

    def __init__(self, config: ServerConfig, rewards: dict) -> None:
        self.port = free_port()
        self.app = create_app(config, rewards)
        self.server = uvicorn.Server(
            uvicorn_config(self.app, config, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metrics(self, headers: dict | None = None) -> dict:
        """``GET /metrics/json``."""
        return httpx.get(self.url + "/metrics/json", headers=headers).json()


#: the servers a parametrized fixture runs on; the Ray one only under ``-m ray`` (.ci/ray.sh)
SERVERS = ["uvicorn", pytest.param("ray", marks=pytest.mark.ray)]

#: a reward replica's share of the 2 CPUs the local Ray has (several rewards and the ingress share them)
RAY_TEST_CPUS = 0.25


class RayServer:
    """The same config deployed as a Ray Serve application on a local Ray (``rh-trl serve --ray``): its rewards
    are built in the replicas from their specs, so each spec names an importable ``target``."""

    kind = "ray"
    port: int | None = None  # Serve's HTTP proxy, one per Ray session

    def __init__(self, config: ServerConfig) -> None:
        pytest.importorskip("ray")
        rewards = []
        for spec in config.rewards:
            options = {"num_cpus": RAY_TEST_CPUS, **spec.ray.ray_actor_options}
            rewards.append(
                spec.model_copy(update={"ray": spec.ray.model_copy(update={"ray_actor_options": options})})
            )
        if RayServer.port is None:
            RayServer.port = free_port()
        ray_options = config.ray.model_copy(update={"metrics_interval_s": 0.2})
        self.config = config.model_copy(
            update={"rewards": rewards, "port": RayServer.port, "ray": ray_options}
        )
        self.port = RayServer.port
        self.url = f"http://127.0.0.1:{RayServer.port}"

    def __enter__(self) -> RayServer:
        from rh_trl.serve.ray_serve import serve_on_ray

        start_local_ray()
        serve_on_ray(self.config, blocking=False)
        return self

    def __exit__(self, *exc) -> None:
        from ray import serve

        serve.delete(self.config.ray.app_name)

    def metrics(self, headers: dict | None = None) -> dict:
        """``GET /metrics/json`` once every replica has reported (they report every 0.2 s here)."""
        time.sleep(1.0)
        return httpx.get(self.url + "/metrics/json", headers=headers).json()


def start_local_ray() -> None:
    """A local Ray on this machine's 2 CPUs, once per test session, whose workers import this checkout (and
    ``tests``) first."""
    import ray

    if ray.is_initialized():
        return
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        },
    )
    atexit.register(ray.shutdown)


def start_server(kind: str, config: ServerConfig, rewards: dict) -> ThreadServer | RayServer:
    """A server of ``kind`` for ``config``: uvicorn in this process with ``rewards`` as given, or Ray Serve with
    the rewards built from the specs' targets."""
    return ThreadServer(config, rewards) if kind == "uvicorn" else RayServer(config)


def server_config(**overrides) -> ServerConfig:
    specs = overrides.pop(
        "rewards",
        [
            {"name": "minilm", "type": "python", "target": "x:y"},
            {"name": "chatml", "type": "python", "target": "x:y"},
        ],
    )
    return ServerConfig.model_validate({"rewards": specs, **overrides})


# -- independent reference computations ---------------------------------------------------------------------------


@torch.no_grad()
def reference(model, ids: list[int]) -> float:
    return model(torch.tensor([ids])).logits[0, 0].item()


def chat_ids(tok, prompt, completion) -> list[int]:
    return tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)[
        "input_ids"
    ]


def text_ids(tok, prompt, completion) -> list[int]:
    return tok(prompt + completion + (tok.eos_token or ""))["input_ids"]


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# -- fixtures ---------------------------------------------------------------------------------------------------------


def minilm_orm(name: str) -> rh_trl.ORM:
    """The ``rm_minilm`` fixture's reward, built anew (Ray replicas build it from this target)."""
    from rh_trl.testing import minilm_tokenizer, tiny_reward_model

    tok = minilm_tokenizer()
    return rh_trl.ORM(tiny_reward_model(tok, seed=1), tok, name=f"srv_{name}")


def chatml_orm(name: str) -> rh_trl.ORM:
    """The ``rm_chatml`` fixture's reward, built anew."""
    from rh_trl.testing import bpe_tokenizer, tiny_reward_model

    tok = bpe_tokenizer("chatml", vocab_size=400)
    return rh_trl.ORM(tiny_reward_model(tok, seed=2), tok, name=f"srv_{name}")


@pytest.fixture(scope="module", params=SERVERS)
def server(request, rm_minilm, minilm_tok, rm_chatml, chatml_tok):
    rewards = {
        "minilm": rh_trl.ORM(rm_minilm, minilm_tok, name="srv_minilm"),
        "chatml": rh_trl.ORM(rm_chatml, chatml_tok, name="srv_chatml"),
    }
    specs = [
        {"name": "minilm", "type": "python", "target": "tests.test_server:minilm_orm", "max_wait_ms": 20},
        {
            "name": "chatml",
            "type": "python",
            "target": "tests.test_server:chatml_orm",
            "max_wait_ms": 20,
            "strip_suffixes": ["<|im_end|>"],
            "failure_score": -100.0,
        },
    ]
    config = server_config(rewards=specs, get_reward_default="chatml")
    with start_server(request.param, config, rewards) as srv:
        yield srv


# -- tests --------------------------------------------------------------------------------------------------------------


def test_conversational_remote_equals_reference_and_local(server, rm_minilm, minilm_tok):
    remote = RemoteRM(server.url, "minilm").score(CONV_PROMPTS, CONV_COMPLETIONS)
    expected = [
        reference(rm_minilm, chat_ids(minilm_tok, p, c))
        for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    ]
    local = rh_trl.ORM(rm_minilm, minilm_tok).score(CONV_PROMPTS, CONV_COMPLETIONS)
    assert max_diff(remote, expected) <= TOL
    assert max_diff(remote, local) <= TOL


def test_standard_remote_equals_reference(server, rm_chatml, chatml_tok):
    rm = RemoteRM([server.url], "chatml", chunk_size=2)  # 3 samples -> 2 concurrent requests
    remote = rm.score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    expected = [
        reference(rm_chatml, text_ids(chatml_tok, p, c))
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(remote, expected) <= TOL
    assert rm.last_stats["num_none"] == 0 and rm.last_stats["num_server_failed"] == 0


def test_v1_rewards_route_shape_and_columns(server, rm_chatml, chatml_tok):
    body = {
        "model": "chatml",
        "prompts": TEXT_PROMPTS,
        "completions": TEXT_COMPLETIONS,
        "answer": ["a", "b", "c"],
    }
    answer = httpx.post(server.url + "/v1/rewards", json=body).json()
    assert answer["model"] == "chatml" and answer["num_none"] == 0
    expected = [
        reference(rm_chatml, text_ids(chatml_tok, p, c))
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(answer["rewards"], expected) <= TOL


def test_openrlhf_request_answered_in_openrlhf_shape(server, rm_chatml, chatml_tok):
    # what OpenRLHF's SingleTurnAgentExecutor posts: one decoded prompt+response, its prompt and label
    prompts = [
        chatml_tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in CONV_PROMPTS
    ]
    responses = [c[0]["content"] for c in CONV_COMPLETIONS]
    for prompt, response in zip(prompts, responses, strict=True):
        payload = {"query": [prompt + response + "<|im_end|>"], "prompts": [prompt], "labels": ["gold"]}
        answer = httpx.post(server.url + "/get_reward?model=chatml", json=payload).json()
        assert set(answer) == {"rewards", "scores", "extra_logs"}
        assert isinstance(answer["extra_logs"], dict)
        assert len(answer["rewards"]) == 1 and answer["scores"] == answer["rewards"]
        # query = prompt + response: the response is what follows the prompt, the EOS text stripped
        expected = reference(rm_chatml, text_ids(chatml_tok, prompt, response))
        assert abs(answer["rewards"][0] - expected) <= TOL
    # a batch of several queries, as OpenRLHF's older batched client sends them
    payload = {
        "query": [p + r for p, r in zip(prompts, responses, strict=True)],
        "prompts": prompts,
        "labels": [None] * 3,
    }
    answer = httpx.post(server.url + "/get_reward?model=chatml", json=payload).json()
    expected = [
        reference(rm_chatml, text_ids(chatml_tok, p, r)) for p, r in zip(prompts, responses, strict=True)
    ]
    assert max_diff(answer["rewards"], expected) <= TOL


def test_verl_adapter_sync_and_async(server, rm_chatml, chatml_tok, monkeypatch):
    from rh_trl.integrations import verl

    expected = [
        reference(rm_chatml, text_ids(chatml_tok, p, c))
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    sync = [
        verl.compute_score(
            "gsm8k", c, "42", {"question": p}, url=server.url, model="chatml", prompt_key="question"
        )
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(sync, expected) <= TOL

    monkeypatch.setenv("RH_TRL_REWARD_URL", server.url)
    monkeypatch.setenv("RH_TRL_REWARD_MODEL", "chatml")

    async def concurrently():
        return await asyncio.gather(
            *(
                verl.compute_score_async("gsm8k", c, "42", {"prompt": p})
                for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
            )
        )

    assert max_diff(asyncio.run(concurrently()), expected) <= TOL
    # a conversational prompt in extra_info and a plain-text solution: one assistant turn
    conv = verl.compute_score("chat", "Hello.", None, {"prompt": CONV_PROMPTS[0]})
    ref = reference(
        rm_chatml, chat_ids(chatml_tok, CONV_PROMPTS[0], [{"role": "assistant", "content": "Hello."}])
    )
    assert abs(conv - ref) <= TOL
    # never a guess: without the prompt key, an error that names the keys there and the setting
    with pytest.raises(
        ValueError, match=r"extra_info has no 'prompt' \(it has \['index', 'question'\]\).*prompt_key"
    ):
        verl.compute_score("x", "y", None, {"index": 3, "question": "What is 2+2?"})


def test_32_clients_20_requests_each_all_correct_in_order(server, rm_chatml, chatml_tok):
    pool = [(p, c) for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)] + list(
        zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    )
    ref = [
        reference(rm_chatml, text_ids(chatml_tok, p, c) if isinstance(p, str) else chat_ids(chatml_tok, p, c))
        for p, c in pool
    ]
    before = server.metrics()["rewards"]["chatml"]

    async def client(k: int, http: httpx.AsyncClient) -> list[tuple[list[int], list[float]]]:
        seen = []
        for j in range(20):
            picks = [(k * 7 + j * 3 + m) % len(pool) for m in range(1 + (k + j) % 3)]
            body = {
                "model": "chatml",
                "prompts": [pool[i][0] for i in picks],
                "completions": [pool[i][1] for i in picks],
            }
            response = await http.post(server.url + "/v1/rewards", json=body)
            assert response.status_code == 200, response.text
            seen.append((picks, response.json()["rewards"]))
        return seen

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(client(k, http) for k in range(32)))

    results = asyncio.run(main())
    answered = [pair for per_client in results for pair in per_client]
    assert len(answered) == 32 * 20
    worst = max(max_diff(rewards, [ref[i] for i in picks]) for picks, rewards in answered)
    assert worst <= TOL
    after = server.metrics()["rewards"]["chatml"]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 640 and after["queue_depth"] == 0
    assert batches < requests / 2  # concurrent requests were merged into shared forward passes
    assert after["max_batch_requests"] > 1


def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"minilm", "chatml"}
    metrics = server.metrics()
    for key in ("requests", "batches", "queue_depth", "latency_seconds", "mean_batch_samples"):
        assert key in metrics["rewards"]["minilm"]


def test_metrics_parse_as_prometheus_text_and_count_what_was_scored(server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        server.metrics()  # lets the replicas of a Ray server report first
        response = httpx.get(server.url + "/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        return {family.name: family for family in text_string_to_metric_families(response.text)}

    def value(families: dict, name: str, suffix: str = "", **labels) -> float:
        for sample in families[name].samples:
            if sample.name == name + suffix and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        raise AssertionError(f"no sample {name}{suffix} {labels}")

    before = scrape()
    body = {"model": "minilm", "prompts": TEXT_PROMPTS * 2, "completions": TEXT_COMPLETIONS * 2}
    assert httpx.post(server.url + "/v1/rewards", json=body).status_code == 200
    after = scrape()
    grew = {
        name: value(after, name, suffix, reward="minilm") - value(before, name, suffix, reward="minilm")
        for name, suffix in (
            ("rh_trl_reward_requests", "_total"),
            ("rh_trl_reward_samples", "_total"),
            ("rh_trl_reward_latency_seconds", "_count"),
            ("rh_trl_reward_batch_samples", "_count"),
        )
    }
    assert grew["rh_trl_reward_requests"] == 1 and grew["rh_trl_reward_samples"] == 6
    assert grew["rh_trl_reward_latency_seconds"] == 1 and grew["rh_trl_reward_batch_samples"] >= 1
    assert value(after, "rh_trl_reward_batch_samples", "_bucket", reward="minilm", le="+Inf") == value(
        after, "rh_trl_reward_batch_samples", "_count", reward="minilm"
    )
    assert value(after, "rh_trl_reward_queue_depth", reward="minilm") == 0
    assert value(after, "rh_trl_reward_samples_without_reward", "_total", reward="minilm") == 0
    assert value(after, "rh_trl_reward_replicas", reward="minilm") >= 1
    for name in ("rh_trl_rejected_requests", "rh_trl_abandoned_requests", "rh_trl_uptime_seconds"):
        assert name in after


def test_config_file_and_exposure_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("RH_TRL_API_KEY", raising=False)
    path = tmp_path / "s.yaml"
    path.write_text("host: 0.0.0.0\nrewards:\n  - {name: tiny, type: tiny}\n")
    config = load_config(path)
    with pytest.raises(ValueError, match="an API key is required"):
        config.check_exposure()
    from rh_trl.cli import main

    assert main(["serve", "--config", str(path)]) == 2  # refuses before loading anything
    load_config(path, api_key="k").check_exposure()
    monkeypatch.setenv("RH_TRL_API_KEY", "k2")
    assert load_config(path).resolved_api_key() == "k2"
    path.write_text("rewards:\n  - {name: a, type: orm}\n")
    with pytest.raises(ValueError, match="type 'orm' needs model"):
        load_config(path)
    path.write_text("rewards:\n  - {name: a, type: tiny}\n  - {name: a, type: tiny}\n")
    with pytest.raises(ValueError, match="repeated"):
        load_config(path)


def test_auto_type_builds_the_class_rh_trl_load_picks(tmp_path):
    from rh_trl.serve.config import RewardSpec, build_reward
    from rh_trl.testing import tiny_model

    model, tokenizer = tiny_model("tiny-rm")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reward = build_reward(RewardSpec(name="judge", type="auto", model=str(tmp_path)))
    assert isinstance(reward, rh_trl.ORM) and reward.__name__ == "judge"
    direct = rh_trl.ORM(str(tmp_path)).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert reward.score(TEXT_PROMPTS, TEXT_COMPLETIONS) == pytest.approx(direct, abs=1e-6)
    with pytest.raises(ValueError, match="type 'auto' needs model"):
        RewardSpec(name="a", type="auto")


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs" / "serve").glob("*.yaml")):
        load_config(path)
