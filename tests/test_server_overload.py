"""Overload: long samples capped by tokens, a bounded queue answering 429, work of departed clients dropped,
retries not scored twice, a per-batch deadline, and a shutdown that ends within its grace period."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

import rh_trl  # noqa: E402
from rh_trl.engines.deadline import DeadlineExceeded, check, deadline  # noqa: E402
from rh_trl.engines.http import RetryPolicy  # noqa: E402
from rh_trl.rewards.base import Reward, RewardOutput  # noqa: E402
from rh_trl.rewards.remote import RemoteRM  # noqa: E402
from rh_trl.serve.config import RewardSpec, build_reward  # noqa: E402
from rh_trl.serve.sample_cap import TokenCap  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_reward_model  # noqa: E402

from .test_server import SERVERS, ThreadServer, free_port, server_config, start_server  # noqa: E402
from .test_server_faults import start_subprocess_server  # noqa: E402

MB_PROMPT = "word " * 200_000  # 1,000,000 characters


class Recording(Reward):
    """The completion's length; sleeps ``delay`` per call and records every completion it scored."""

    def __init__(self, delay: float = 0.0, name: str = "recording") -> None:
        super().__init__(name=name)
        self.delay = delay
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def compute(self, batch):
        time.sleep(self.delay)
        with self.lock:
            self.seen.extend(s.response_text for s in batch.samples if s is not None)
        return RewardOutput([float(len(s.response_text)) for s in batch.samples])


def python_spec(name: str = "rec", **fields) -> dict:
    return {"name": name, "type": "python", "target": "x:y", **fields}


# -- the token cap ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SERVERS)
def tiny_server(request):
    config = server_config(
        rewards=[{"name": "tiny", "type": "tiny", "options": {"style": "llama", "seed": 0}}]
    )
    with start_server(request.param, config, {}) as srv:
        yield srv


def test_a_1mb_prompt_gets_none_at_once_and_its_neighbours_are_scored(tiny_server):
    body = {"prompts": [MB_PROMPT, "Hi there."], "completions": [" ok", " Hello."]}
    start = time.time()
    answer = httpx.post(tiny_server.url + "/v1/rewards", json=body, timeout=60).json()
    took = time.time() - start
    assert took < 10, took  # (was: minutes on one forward pass over ~340k tokens)
    models = httpx.get(tiny_server.url + "/v1/models").json()["data"]
    assert models[0]["max_sample_tokens"] == 4096  # the tiny model's max_position_embeddings
    local = build_reward(RewardSpec(name="local", type="tiny", options={"style": "llama", "seed": 0}))
    local = local.score(["Hi there."], [" Hello."])  # the same tiny model, scored in this process
    assert answer["rewards"][0] is None and answer["num_too_long"] == 1 and answer["num_none"] == 1
    assert answer["rewards"][1] == pytest.approx(local[0], abs=1e-5)
    metrics = tiny_server.metrics()["rewards"]["tiny"]
    assert metrics["counts"]["too_long"] >= 1
    # a short request right after is not held up
    start = time.time()
    assert (
        httpx.post(tiny_server.url + "/v1/rewards", json={"prompts": ["a"], "completions": ["b"]}).status_code
        == 200
    )
    assert time.time() - start < 2


def test_remote_rm_counts_samples_the_server_found_too_long(tiny_server):
    rm = RemoteRM(tiny_server.url, "tiny")
    assert rm.score([MB_PROMPT, "Hi"], [" a", " b"])[0] is None
    assert rm.last_stats["num_server_too_long"] == 1 and rm.last_stats["num_none"] == 1


def test_token_cap_decisions_equal_a_full_tokenization(llama_tok):
    """The prefix shortcut decides exactly as counting every token would (texts around the cap, multi-byte
    characters, long whitespace runs)."""

    class WithTokenizer:
        __name__ = "t"
        tokenizer = llama_tok

    cap = TokenCap(WithTokenizer(), max_tokens=300)
    rng = random.Random(0)
    pieces = ["word ", "the ", "日本語", "😀", "    ", "\n\n", "x", "1234567890", "éà", "  \t"]
    prompts, completions = [], []
    for _ in range(150):
        target = rng.choice([50, 250, 290, 300, 310, 400, 2000, 6000])
        text = "".join(rng.choice(pieces) for _ in range(target))
        cut = rng.randrange(len(text) + 1)
        prompts.append(text[:cut])
        completions.append(text[cut:])
    found = set(cap.too_long(prompts, completions))
    expected = {
        i
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        if len(llama_tok(p + "\n" + c, add_special_tokens=False)["input_ids"]) > 300
    }
    assert found == expected and 0 < len(expected) < len(prompts)


# -- backpressure ---------------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_remote_rm_waits_for_it():
    reward = Recording(delay=0.3)
    spec = python_spec(max_batch_items=2, max_queue_samples=4, max_wait_ms=1)
    with ThreadServer(server_config(rewards=[spec]), {"rec": reward}) as srv:

        async def burst():
            async with httpx.AsyncClient(timeout=30) as http:
                bodies = [{"prompts": ["p", "p"], "completions": ["x" * (i + 1), "y"]} for i in range(12)]
                return await asyncio.gather(*(http.post(srv.url + "/v1/rewards", json=b) for b in bodies))

        responses = asyncio.run(burst())
        refused = [r for r in responses if r.status_code == 429]
        served = [(i, r) for i, r in enumerate(responses) if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == 12
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["detail"]
        for i, r in served:
            assert r.json()["rewards"] == [float(i + 1), 1.0]
        # RemoteRM honours the 429s: with retries it gets every sample scored, each once
        reward.seen.clear()
        rm = RemoteRM(srv.url, "rec", chunk_size=2, retry=RetryPolicy(attempts=30, initial=0.05, max=0.3))
        completions = [f"c{i}" + "z" * i for i in range(16)]
        assert rm.score(["p"] * 16, completions) == [float(len(c)) for c in completions]
        assert sorted(reward.seen) == sorted(completions)


def test_a_departed_clients_queued_samples_never_reach_the_model():
    reward = Recording(delay=1.0)
    with ThreadServer(server_config(rewards=[python_spec(max_wait_ms=1)]), {"rec": reward}) as srv:
        busy = threading.Thread(
            target=httpx.post,
            args=(srv.url + "/v1/rewards",),
            kwargs={"json": {"prompts": ["p"], "completions": ["first"]}, "timeout": 30},
        )
        busy.start()
        time.sleep(0.2)  # "first" is being scored
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/rewards", json={"prompts": ["p"], "completions": ["gone"]}, timeout=0.3)
        busy.join()
        time.sleep(1.2)
        assert reward.seen == ["first"]  # "gone" was dropped before any forward pass
        metrics = httpx.get(srv.url + "/metrics/json").json()
        assert metrics["rewards"]["rec"]["dropped_abandoned"] == 1 and metrics["abandoned"] == 1
        assert metrics["rewards"]["rec"]["queue_depth"] == 0


def test_a_retried_chunk_is_scored_once_and_answered():
    """RemoteRM times out while the server is still scoring; the retry takes that work's answer."""
    reward = Recording(delay=1.0)
    with ThreadServer(server_config(rewards=[python_spec(max_wait_ms=1)]), {"rec": reward}) as srv:
        policy = RetryPolicy(attempts=3, initial=0.6, max=0.6, timeout=0.5)
        rm = RemoteRM(srv.url, "rec", chunk_size=64, retry=policy)
        completions = [f"s{i}" for i in range(64)]
        values = rm.score(["p"] * 64, completions)
        assert values == [float(len(c)) for c in completions]  # (was: None after three scorings)
        assert sorted(reward.seen) == sorted(completions)  # every sample scored exactly once
        assert httpx.get(srv.url + "/metrics/json").json()["idempotent_reuses"] >= 1


def test_a_batch_past_its_deadline_stops_at_the_next_forward_pass():
    tok = bpe_tokenizer("llama")
    reward = rh_trl.ORM(tiny_reward_model(tok), tok, max_tokens_per_batch=64)  # many small forward passes
    spec = {"name": "t", "type": "python", "target": "x:y", "compute_timeout_s": 0.05, "max_wait_ms": 1}
    with ThreadServer(server_config(rewards=[spec]), {"t": reward}) as srv:
        body = {"prompts": ["a story " * 20] * 200, "completions": [f" end {i}" for i in range(200)]}
        start = time.time()
        response = httpx.post(srv.url + "/v1/rewards", json=body, timeout=60)
        assert response.status_code == 503 and "deadline of 0.05 s" in response.json()["detail"]
        assert "retry-after" in response.headers and time.time() - start < 5
        metrics = httpx.get(srv.url + "/metrics/json").json()["rewards"]["t"]
        assert metrics["deadline_exceeded"] == 1
        assert (
            httpx.post(srv.url + "/v1/rewards", json={"prompts": ["a"], "completions": ["b"]}).status_code
            == 200
        )


def test_deadline_check_outside_and_inside_a_block():
    check()  # no deadline: nothing happens
    with deadline(10):
        check()
    cancelled = threading.Event()
    with deadline(10, cancelled, "a batch"):
        cancelled.set()
        with pytest.raises(DeadlineExceeded, match="a batch was cancelled"):
            check()
    with deadline(0.0, what="x"), pytest.raises(DeadlineExceeded, match="past its deadline"):
        time.sleep(0.01)
        check()


# -- shutdown ----------------------------------------------------------------------------------------------------


def test_sigterm_ends_the_server_within_its_grace_period_while_a_long_batch_runs(tmp_path):
    """A forward pass over a long batch is running when SIGTERM arrives: the server exits within the grace period
    (plus the time to the next forward pass) instead of waiting for the batch, and the client gets an answer."""
    config = tmp_path / "serve.yaml"
    config.write_text(
        "graceful_shutdown_s: 1\n"
        "rewards:\n  - {name: tiny, type: tiny, options: {style: llama, seed: 0, max_tokens_per_batch: 256}}\n"
    )
    port = free_port()
    proc = start_subprocess_server(str(config), port)
    result: dict = {}
    body = {"prompts": ["a long story " * 100] * 2000, "completions": [f" end {i}" for i in range(2000)]}

    def call():
        try:
            result["response"] = httpx.post(f"http://127.0.0.1:{port}/v1/rewards", json=body, timeout=120)
        except httpx.HTTPError as err:
            result["error"] = err

    caller = threading.Thread(target=call)
    try:
        caller.start()
        time.sleep(3)  # the batch is running (2000 samples x ~400 tokens: about a minute on 2 cores)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        took = time.time() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        caller.join(timeout=30)
    assert took < 6, took  # (was: the whole batch, then longer)
    if "response" in result:  # answered before the connection closed: a 503 saying why
        assert result["response"].status_code == 503
    else:
        assert isinstance(result["error"], httpx.HTTPError)


def test_the_queue_also_refuses_more_than_max_queue_wait_s_of_work():
    from rh_trl.serve.batcher import DynamicBatcher
    from rh_trl.serve.errors import RequestError

    async def main():
        batcher = DynamicBatcher(Recording(delay=0.5), max_items=100, max_queue_wait_s=5.0, max_wait_ms=1)
        batcher.start()
        try:
            batcher._rate = 10.0  # samples per second, as measured on earlier batches
            first = asyncio.ensure_future(batcher.submit(["p"] * 30, ["x"] * 30))
            await asyncio.sleep(0.1)  # taken into a batch: nothing waits
            waiting = asyncio.ensure_future(batcher.submit(["p"] * 40, ["y"] * 40))
            await asyncio.sleep(0)
            assert batcher.waiting == 40
            with pytest.raises(RequestError) as refused:  # 60 samples at 10/s: 6 s > 5 s
                await batcher.submit(["p"] * 20, ["z"] * 20)
            assert refused.value.status == 429 and refused.value.headers()["Retry-After"] == "4"
            assert "about 6.0 s of work" in refused.value.message
            small = await batcher.submit(["p"] * 5, ["w"] * 5)  # 45 samples: 4.5 s, taken
            assert small.rewards == [1.0] * 5
            await asyncio.gather(first, waiting)
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_shared_calls_join_expire_and_forget_failures():
    from rh_trl.serve.idempotency import SharedCalls

    async def main():
        calls = SharedCalls(ttl_s=0.2, max_entries=2)
        runs = []

        async def work(value):
            runs.append(value)
            await asyncio.sleep(0.05)
            if value == "boom":
                raise RuntimeError("boom")
            return value

        key = SharedCalls.key("/v1/rewards", "rm", "k1", body=b"{}")
        assert key != SharedCalls.key(
            "/v1/rewards", "rm", "k1", body=b'{"a": 1}'
        )  # another body: another call
        first, second = await asyncio.gather(
            calls.run(key, lambda: work("a")), calls.run(key, lambda: work("b"))
        )
        assert first == second == "a" and runs == ["a"] and calls.reused == 1
        assert await calls.run(key, lambda: work("c")) == "a"  # finished moments ago: the same answer
        await asyncio.sleep(0.25)
        assert await calls.run(key, lambda: work("d")) == "d"  # past ttl_s: run again
        with pytest.raises(RuntimeError):
            await calls.run("bad", lambda: work("boom"))
        assert await calls.run("bad", lambda: work("fine")) == "fine"  # a failure is not remembered
        for k in ("x", "y", "z"):
            await calls.run(k, lambda k=k: work(k))
        calls._expire()  # (done at every new call)
        assert len(calls._entries) == 2  # max_entries
        waiter = asyncio.ensure_future(calls.run("slow", lambda: asyncio.sleep(10, "late")))
        await asyncio.sleep(0.01)
        task = calls._entries["slow"].task
        waiter.cancel()  # the only waiter leaves: the call is cancelled
        await asyncio.sleep(0.01)
        assert task.cancelled() and "slow" not in calls._entries

    asyncio.run(main())


def test_where_the_cap_comes_from(llama_tok):
    reward = rh_trl.ORM(tiny_reward_model(llama_tok), llama_tok, max_length=64)
    cap = TokenCap(reward)
    # max_position_embeddings, not the truncation length
    assert (cap.max_tokens, cap.source) == (4096, "model")
    assert cap.too_long(["word " * 200], [" ok"]) == []  # ~200 tokens: truncated by the ORM, not refused
    assert (TokenCap(reward, 100).max_tokens, TokenCap(reward, 100).source) == (100, "config")
    no_model = TokenCap(Recording())
    assert (no_model.max_tokens, no_model.source) == (32768, "fallback") and not no_model.tokenizers
    assert no_model.too_long(["é" * 16383, "é" * 16384], ["", ""]) == [1]  # UTF-8 bytes: 2 per é, +1 newline
