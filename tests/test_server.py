"""The reward server against independent per-sample forward passes: both TRL formats, OpenRLHF's protocol,
the verl adapter, and 32 concurrent clients."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

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


@pytest.fixture(scope="module")
def server(rm_minilm, minilm_tok, rm_chatml, chatml_tok):
    rewards = {
        "minilm": rh_trl.ORM(rm_minilm, minilm_tok, name="srv_minilm"),
        "chatml": rh_trl.ORM(rm_chatml, chatml_tok, name="srv_chatml"),
    }
    specs = [
        {"name": "minilm", "type": "python", "target": "unused:unused", "max_wait_ms": 20},
        {
            "name": "chatml",
            "type": "python",
            "target": "unused:unused",
            "max_wait_ms": 20,
            "strip_suffixes": ["<|im_end|>"],
            "failure_score": -100.0,
        },
    ]
    with ThreadServer(server_config(rewards=specs, get_reward_default="chatml"), rewards) as srv:
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
    before = httpx.get(server.url + "/metrics/json").json()["rewards"]["chatml"]

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
    after = httpx.get(server.url + "/metrics/json").json()["rewards"]["chatml"]
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 640 and after["queue_depth"] == 0
    assert batches < requests / 2  # concurrent requests were merged into shared forward passes
    assert after["max_batch_requests"] > 1


def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"minilm", "chatml"}
    metrics = httpx.get(server.url + "/metrics/json").json()
    for key in ("requests", "batches", "queue_depth", "latency_seconds", "mean_batch_samples"):
        assert key in metrics["rewards"]["minilm"]


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
