"""The openai engine against rh_trl's OpenAI-compatible server: same numbers as the local engine, and faults."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import pytest
import torch

from rh_trl.engines.http import MalformedResponse, RetryPolicy
from rh_trl.engines.logprobs import TokenMismatchError
from rh_trl.openai_compat_server import start_server
from rh_trl.rewards.drsow import DrSow
from rh_trl.testing import tiny_causal_lm

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS

TOL = 1e-4
FAST_RETRY = RetryPolicy(attempts=2, initial=0.01, max=0.02, timeout=5.0)


@pytest.fixture(scope="module")
def models(llama_tok, chatml_tok):
    return tiny_causal_lm(llama_tok, seed=21), tiny_causal_lm(chatml_tok, seed=22)


@pytest.fixture(scope="module")
def servers(models, llama_tok, chatml_tok):
    strong, weak = models
    with (
        start_server(strong, llama_tok, model_name="strong") as a,
        start_server(weak, chatml_tok, model_name="weak") as b,
    ):
        yield a.url, b.url


def local(models, llama_tok, chatml_tok, **kwargs) -> DrSow:
    return DrSow(models[0], models[1], strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, **kwargs)


def remote(servers, llama_tok, chatml_tok, **kwargs) -> DrSow:
    return DrSow(*servers, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, engine="openai", **kwargs)


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("use_prompt_logprobs", [True, False])
def test_openai_engine_matches_local_engine(
    servers, models, llama_tok, chatml_tok, reduction, use_prompt_logprobs
):
    for prompts, completions in ((CONV_PROMPTS, CONV_COMPLETIONS), (TEXT_PROMPTS, TEXT_COMPLETIONS)):
        prompts, completions = list(prompts) * 2, list(completions) * 2  # duplicates are sent once
        expected = local(models, llama_tok, chatml_tok, reduction=reduction)(prompts, completions)
        drsow = remote(
            servers,
            llama_tok,
            chatml_tok,
            reduction=reduction,
            batch_size=2,
            max_concurrency=2,
            use_prompt_logprobs=use_prompt_logprobs,
            strong_model="strong",
            weak_model="weak",
        )
        scores = drsow(prompts, completions)
        assert max_diff(scores, expected) <= TOL
        assert drsow.last_stats["num_server_failed"] == 0


@torch.no_grad()
def test_server_prompt_logprobs_follow_vllm_schema(servers, models, llama_tok):
    ids = llama_tok("The moon is bright.")["input_ids"]
    body = {"prompt": [ids, ids[:3]], "max_tokens": 1, "prompt_logprobs": 1, "return_token_ids": True}
    answer = httpx.post(servers[0] + "/v1/completions", json=body, timeout=10).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert answer["choices"][1]["prompt_logprobs"][1:] == answer["choices"][0]["prompt_logprobs"][1:3]
    choice = answer["choices"][0]
    assert choice["prompt_token_ids"] == ids and choice["prompt_logprobs"][0] is None
    logp = torch.log_softmax(models[0](torch.tensor([ids])).logits[0].double(), -1)
    for t in range(1, len(ids)):
        entry = choice["prompt_logprobs"][t][str(ids[t])]
        assert abs(entry["logprob"] - logp[t - 1, ids[t]].item()) <= TOL
        assert entry["rank"] == int((logp[t - 1] > logp[t - 1, ids[t]]).sum()) + 1
        assert set(entry) == {"logprob", "rank", "decoded_token"}
    body = {"prompt": ["The night", "is"], "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    texts = httpx.post(servers[0] + "/v1/completions", json=body, timeout=10).json()["choices"]
    assert (
        texts[0]["prompt_token_ids"] == llama_tok("The night")["input_ids"]
        and len(texts[1]["token_ids"]) == 2
    )
    assert httpx.get(servers[0] + "/health").status_code == 200
    assert httpx.get(servers[0] + "/v1/models").json()["data"][0]["id"] == "strong"
    tokens = httpx.post(servers[0] + "/tokenize", json={"prompt": "The night"}).json()["tokens"]
    assert tokens == llama_tok("The night")["input_ids"]
    refused = httpx.post(servers[0] + "/v1/completions", json={"prompt": [10**6], "max_tokens": 1})
    assert refused.status_code == 400 and "out of vocabulary" in refused.json()["message"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_gives_none_counted_and_logged(servers, llama_tok, chatml_tok, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    drsow = remote((servers[0], dead), llama_tok, chatml_tok, retry=FAST_RETRY, batch_size=2)
    logged: list[tuple[str, float]] = []
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        scores = drsow(CONV_PROMPTS, CONV_COMPLETIONS, log_metric=lambda k, v: logged.append((k, v)))
    assert scores == [None] * len(CONV_PROMPTS)
    assert dict(logged)[f"{drsow.__name__}/num_server_failed"] == len(CONV_PROMPTS)
    assert "after the last retry" in caplog.text and "server failed" in caplog.text


def _mock(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def test_malformed_response_is_a_clear_error(llama_tok, chatml_tok):
    def handler(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["prompt"])
        return httpx.Response(200, json={"choices": [{"index": i, "text": ""} for i in range(n)]})

    drsow = DrSow(
        "http://strong.test",
        "http://weak.test",
        strong_tokenizer=llama_tok,
        weak_tokenizer=chatml_tok,
        engine="openai",
        transport=_mock(handler),
    )
    with pytest.raises(MalformedResponse, match="no 'prompt_logprobs'"):
        drsow(CONV_PROMPTS, CONV_COMPLETIONS)

    def wrong_count(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []})

    drsow.engines["strong"].pool.transport = drsow.engines["weak"].pool.transport = _mock(wrong_count)
    with pytest.raises(MalformedResponse, match=r"expected \d choices"):
        drsow(CONV_PROMPTS, CONV_COMPLETIONS)


def test_server_tokenization_differs_is_a_clear_error(servers, llama_tok, chatml_tok):
    """A server that prepends a BOS token to every prompt (as some do for token prompts) is caught."""
    forward = httpx.AsyncHTTPTransport()

    class PrependsBOS(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            body["prompt"] = [[llama_tok.bos_token_id, *p] for p in body["prompt"]]
            inner = httpx.Request(request.method, request.url, json=body)
            response = await forward.handle_async_request(inner)
            await response.aread()
            return httpx.Response(response.status_code, content=response.content, headers=response.headers)

    drsow = remote(servers, llama_tok, chatml_tok, transport=PrependsBOS())
    with pytest.raises(TokenMismatchError, match=r"ours has \d+ tokens, the server's \d+"):
        drsow(CONV_PROMPTS, CONV_COMPLETIONS)


def test_rejected_sequence_gets_none_and_others_are_scored(servers, models, llama_tok, chatml_tok, caplog):
    """A 400 on a multi-prompt request is narrowed down to the sequence the server refuses."""
    long_text = " moon" * 300
    prompts = [*CONV_PROMPTS, [{"role": "user", "content": long_text}]]
    completions = [*CONV_COMPLETIONS, CONV_COMPLETIONS[0]]
    strong, weak = models
    with start_server(strong, llama_tok, max_model_len=128) as short:
        drsow = remote((short.url, servers[1]), llama_tok, chatml_tok, batch_size=4)
        with caplog.at_level(logging.WARNING, logger="rh_trl"):
            scores = drsow(prompts, completions)
    expected = local(models, llama_tok, chatml_tok)(CONV_PROMPTS, CONV_COMPLETIONS)
    assert max_diff(scores[:3], expected) <= TOL and scores[3] is None
    assert drsow.last_stats["num_server_rejected"] == 1 and "refused" in caplog.text
