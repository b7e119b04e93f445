"""The openai engine against rh_trl's OpenAI-compatible server: same numbers as the local engine, and faults."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import socket
import threading
import time

import httpx
import pytest
import torch

from rh_trl.engines.http import MalformedResponse, RetryPolicy
from rh_trl.engines.logprobs import TokenMismatchError
from rh_trl.engines.openai_logprobs import OpenAILogprobClient
from rh_trl.rewards.drsow import DrSow
from rh_trl.testing import tiny_causal_lm
from rh_trl.testing.openai_compat_server import start_server

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
    def mocked(handler) -> DrSow:
        return DrSow(
            "http://strong.test",
            "http://weak.test",
            strong_tokenizer=llama_tok,
            weak_tokenizer=chatml_tok,
            engine="openai",
            transport=_mock(handler),
        )

    def no_logprobs(request: httpx.Request) -> httpx.Response:
        n = len(json.loads(request.content)["prompt"])
        return httpx.Response(200, json={"choices": [{"index": i, "text": ""} for i in range(n)]})

    with pytest.raises(MalformedResponse, match="no 'prompt_logprobs'"):
        mocked(no_logprobs)(CONV_PROMPTS, CONV_COMPLETIONS)

    def wrong_count(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": []})

    with pytest.raises(MalformedResponse, match=r"expected \d choices"):
        mocked(wrong_count)(CONV_PROMPTS, CONV_COMPLETIONS)


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


def test_long_sample_fits_the_server_by_default_and_is_refused_alone_otherwise(
    servers, models, llama_tok, chatml_tok, caplog
):
    """max_length defaults to the server's max_model_len - 1 (read from /v1/models): a long prompt is cut from the
    left; with a larger max_length the long sample gets None for itself (counted as too_long), never sent."""
    long_text = " moon" * 300
    prompts = [*CONV_PROMPTS, [{"role": "user", "content": long_text}]]
    completions = [*CONV_COMPLETIONS, CONV_COMPLETIONS[0]]
    strong, weak = models
    expected = local(models, llama_tok, chatml_tok)(CONV_PROMPTS, CONV_COMPLETIONS)
    with start_server(strong, llama_tok, max_model_len=128) as short:
        drsow = remote((short.url, servers[1]), llama_tok, chatml_tok, batch_size=4)
        scores = drsow(prompts, completions)
        assert drsow.encoders["strong"].formatter.max_length == 127
        assert max_diff(scores[:3], expected) <= TOL and scores[3] is not None
        assert drsow.last_stats["num_truncated"] == 1 and drsow.last_stats["num_too_long"] == 0
        sent_before = httpx.get(f"{short.url}/stats").json()["sequences"]
        drsow = remote((short.url, servers[1]), llama_tok, chatml_tok, batch_size=4, max_length=2000)
        with caplog.at_level(logging.WARNING, logger="rh_trl"):
            scores = drsow(prompts, completions)
        assert max_diff(scores[:3], expected) <= TOL and scores[3] is None
        assert drsow.last_stats["num_too_long"] == 1 and "longer than the 127 tokens" in caplog.text
        assert (
            httpx.get(f"{short.url}/stats").json()["sequences"] - sent_before == 3
        )  # the long one: not sent


def test_rejected_sequence_gets_none_and_others_are_scored(servers, models, llama_tok, chatml_tok, caplog):
    """A 400 on a multi-prompt request is narrowed down to the sequence the server refuses (here a server that
    does not list its max_model_len, so the client cannot know the limit beforehand)."""
    long_text = " moon" * 300
    prompts = [*CONV_PROMPTS, [{"role": "user", "content": long_text}]]
    completions = [*CONV_COMPLETIONS, CONV_COMPLETIONS[0]]
    strong, weak = models
    forward = httpx.AsyncHTTPTransport()

    class NoModelList(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/models":
                return httpx.Response(404, json={"detail": "not here"})
            response = await forward.handle_async_request(request)
            await response.aread()
            return httpx.Response(response.status_code, content=response.content, headers=response.headers)

    with start_server(strong, llama_tok, max_model_len=128) as short:
        drsow = remote((short.url, servers[1]), llama_tok, chatml_tok, batch_size=4, transport=NoModelList())
        with caplog.at_level(logging.WARNING, logger="rh_trl"):
            scores = drsow(prompts, completions)
    expected = local(models, llama_tok, chatml_tok)(CONV_PROMPTS, CONV_COMPLETIONS)
    assert max_diff(scores[:3], expected) <= TOL and scores[3] is None
    assert drsow.last_stats["num_server_rejected"] == 1 and "refused" in caplog.text


# -- the server's batching of concurrent requests ----------------------------------------------------------------


class GatedForward:
    """Wraps a backend's forward: records each pass's prompt lengths, holds the first pass until released, and
    fails any pass that holds a prompt starting with ``poison``."""

    def __init__(self, forward, poison: int | None = None) -> None:
        self.forward = forward
        self.poison = poison
        self.passes: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, prompts):
        self.passes.append([len(p) for p in prompts])
        self.entered.set()
        assert self.release.wait(30), "the test never released the first forward pass"
        if self.poison is not None and any(p[0] == self.poison for p in prompts):
            raise RuntimeError("poisoned prompt")
        return self.forward(prompts)


@contextlib.contextmanager
def gated_server(model, tok, poison=None, **options):
    with start_server(model, tok, **options) as running:
        backend = running.app.state.backend
        gate = GatedForward(backend.forward, poison)
        backend.forward = gate
        yield running, gate


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, from one unpadded forward pass of this sequence alone."""
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def read_choice(choice) -> list[float]:
    ids = choice["prompt_token_ids"]
    return [choice["prompt_logprobs"][t][str(ids[t])]["logprob"] for t in range(1, len(ids))]


def post(url: str, prompts, **extra) -> httpx.Response:
    body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def fire_while_held(running, gate, first, others, queued: int):
    """Send ``first``; while its forward pass is held, send every request of ``others`` at once, wait until
    ``queued`` prompts wait in the queue (refused requests never join it), then release. Returns the responses
    in order (``first`` first)."""
    scheduler = running.app.state.scheduler
    with concurrent.futures.ThreadPoolExecutor(len(others) + 1) as pool:
        head = pool.submit(post, running.url, first)
        assert gate.entered.wait(30)
        rest = [pool.submit(post, running.url, prompts) for prompts in others]
        deadline = time.monotonic() + 30
        while scheduler.waiting < queued and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # the refused requests are answered meanwhile
        assert scheduler.waiting == queued
        gate.release.set()
        return [head.result(), *(f.result() for f in rest)]


def test_concurrent_requests_share_forward_passes_with_the_same_numbers(models, llama_tok):
    model = models[0]
    words = [
        "The moon is bright.",
        "Trains are fast and loud.",
        "Coffee",
        "A river ran to the sea and met a map.",
    ]
    sequences = [llama_tok(w)["input_ids"] for w in words]
    requests = [[sequences[i % 4], sequences[(i + 1) % 4][: 3 + i]] for i in range(6)]  # different lengths
    expected = {tuple(s): reference_logprobs(model, s) for r in requests for s in r}
    with start_server(model, llama_tok) as plain:  # one request at a time
        alone = [[read_choice(c) for c in post(plain.url, r).json()["choices"]] for r in requests]
    with gated_server(model, llama_tok) as (running, gate):
        answers = fire_while_held(running, gate, requests[0], requests[1:], queued=10)
        stats = httpx.get(running.url + "/stats").json()
    assert [len(p) for p in gate.passes] == [2, 10]  # request 0 alone, then the five others in one pass
    assert stats["max_step_requests"] == 5 and stats["forwards"] == 2 and stats["requests"] == 6
    worst = 0.0
    for request, answer, single in zip(requests, answers, alone, strict=True):
        assert answer.status_code == 200
        choices = answer.json()["choices"]
        assert [c["index"] for c in choices] == list(range(len(request)))
        assert [
            c["prompt_token_ids"] for c in choices
        ] == request  # each request gets its own prompts, in order
        for prompt, choice, one in zip(request, choices, single, strict=True):
            got = read_choice(choice)
            worst = max(worst, max_diff(got, expected[tuple(prompt)]), max_diff(got, one))
    assert worst <= 1e-5


def test_refused_and_failing_requests_fail_alone(models, llama_tok, caplog):
    model = models[0]
    poison = llama_tok.convert_tokens_to_ids("<|system|>")
    good = [llama_tok("The moon is bright.")["input_ids"], llama_tok("Trains")["input_ids"]]
    others = [
        good,
        [[5, 10**6]],  # out of vocabulary: refused before it is queued
        [good[0] * 40],  # longer than the server's context: refused before it is queued
        [[poison, *good[1]], good[0]],  # its forward pass fails: retried one prompt at a time
        list(reversed(good)),
    ]
    with (
        caplog.at_level(logging.WARNING, logger="rh_trl"),
        gated_server(model, llama_tok, poison=poison, max_model_len=64) as (running, gate),
    ):
        answers = fire_while_held(running, gate, [good[1]], others, queued=6)
        stats = httpx.get(running.url + "/stats").json()
    assert [a.status_code for a in answers] == [200, 200, 400, 400, 500, 200]
    assert "out of vocabulary" in answers[2].json()["message"]
    assert "maximum context length" in answers[3].json()["message"]
    assert "poisoned prompt" in answers[4].json()["message"] and "one by one" in caplog.text
    assert (
        len(gate.passes[1]) == 6 and stats["failed_forwards"] >= 2
    )  # the gathered pass, then the poisoned one
    for answer, prompts in ((answers[1], good), (answers[5], list(reversed(good)))):
        for prompt, choice in zip(prompts, answer.json()["choices"], strict=True):
            assert choice["prompt_token_ids"] == prompt
            assert max_diff(read_choice(choice), reference_logprobs(model, prompt)) <= 1e-5


def test_batch_token_budget_and_one_request_per_pass(models, llama_tok):
    model = models[0]
    prompts = [llama_tok(" moon" * n)["input_ids"] for n in (3, 5, 9, 17, 30)]
    others = [[p] for p in prompts]
    with gated_server(model, llama_tok, max_batch_tokens=40) as (running, gate):
        answers = fire_while_held(running, gate, prompts[:1], others, queued=5)
    assert all(a.status_code == 200 for a in answers)
    gathered = gate.passes[1:]
    assert sorted(n for p in gathered for n in p) == sorted(len(p) for p in prompts)
    assert all(len(p) * max(p) <= 40 or len(p) == 1 for p in gathered) and len(gathered) < len(prompts)
    for prompt, answer in zip(prompts, answers[1:], strict=True):
        got = read_choice(answer.json()["choices"][0])
        assert max_diff(got, reference_logprobs(model, prompt)) <= 1e-5
    with gated_server(model, llama_tok, batch_requests=False) as (running, gate):
        fire_while_held(running, gate, prompts[:1], others, queued=5)
        assert running.app.state.scheduler.stats.max_step_requests == 1
    assert [len(p) for p in gate.passes] == [1] * 6


def test_json_reader_fast_path_and_its_fallbacks():
    """Well-formed JSON answers are read directly; anything else goes through the reader that names the fault."""
    client = OpenAILogprobClient("http://server.test", label="strong")
    ids = [1, 5, 9]

    def entry(token: int, logprob) -> dict:
        return {str(token): {"logprob": logprob, "rank": 2, "decoded_token": "x"}}

    good = [None, entry(5, -1.5), {**entry(9, -0.25), **entry(3, -0.1)}]  # a top-k extra is ignored
    out = client._parse_choice({"prompt_logprobs": good}, ids, "here")
    assert math.isnan(out[0]) and out[1:] == [-1.5, -0.25]
    with pytest.raises(MalformedResponse, match=r"prompt_logprobs\[2\]\[9\] has no numeric 'logprob'"):
        client._parse_choice({"prompt_logprobs": [None, entry(5, -1.5), entry(9, "low")]}, ids, "here")
    with pytest.raises(TokenMismatchError, match="the token sent there is 9"):
        client._parse_choice({"prompt_logprobs": [None, entry(5, -1.5), entry(7, -2.0)]}, ids, "here")
    with pytest.raises(TokenMismatchError, match="for 2 tokens but 3 were sent"):
        client._parse_choice({"prompt_logprobs": [None, entry(5, -1.5)]}, ids, "here")
