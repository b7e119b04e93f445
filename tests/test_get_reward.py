"""OpenRLHF's ``/get_reward``: every query gets a number it can hold (the reward's ``failure_score`` where there is
no reward), failures and queries without their prompt are counted in ``extra_logs``, and a server that cannot
answer a request without ``?model=`` refuses to start."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("fastapi")

from rh_trl import PRM  # noqa: E402
from rh_trl.cli import main  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm  # noqa: E402

from .test_server import SERVERS, ThreadServer, server_config, start_server  # noqa: E402
from .test_server_faults import Slow  # noqa: E402

TOL = 1e-5
EOS = "</s>"


def tiny_prm(name: str = "prm") -> PRM:
    """An RLHFlow-style PRM: no reward for an empty response (no steps), as real PRMs."""
    tokenizer = bpe_tokenizer("llama")
    return PRM(tiny_causal_lm(tokenizer, seed=12).eval(), tokenizer, kind="next_token", name=name)


@pytest.fixture(scope="module")
def prm():
    return tiny_prm()


@pytest.fixture(scope="module", params=SERVERS)
def server(request, prm):
    slow = "tests.test_server_faults:Slow"
    specs = [
        {"name": "prm", "type": "python", "target": "tests.test_get_reward:tiny_prm", "strip_suffixes": [EOS],
         "failure_score": -3.0},
        {"name": "slow", "type": "python", "target": slow, "failure_score": 7.0},
        {"name": "trl-only", "type": "python", "target": slow},
    ]  # fmt: skip
    config = server_config(rewards=specs, get_reward_default="prm")
    with start_server(request.param, config, {"prm": prm, "slow": Slow(), "trl-only": Slow()}) as srv:
        yield srv


def test_unscorable_and_unprompted_queries_are_answered_and_counted(server, prm):
    prompts = ["Question: what is 2+2?\nAnswer:", "Tell a tiny story.", "Name a colour."]
    responses = [" Two and two.\n\nThat is 4.", "", " Blue."]
    queries = [p + r + EOS for p, r in zip(prompts, responses, strict=True)]
    queries[2] = "(cut) colour." + responses[2] + EOS  # OpenRLHF truncated this prompt from the left
    before = server.metrics()["rewards"]["prm"]["counts"]
    answer = httpx.post(
        server.url + "/get_reward", json={"query": queries, "prompts": prompts, "labels": ["", "", ""]}
    ).json()
    counts = server.metrics()["rewards"]["prm"]["counts"]

    local = prm.score([prompts[0], "", ""], [responses[0], responses[1], "(cut) colour." + responses[2]])
    assert local[1] is None  # the PRM has no reward for the empty response
    rewards = answer["rewards"]
    assert abs(rewards[0] - local[0]) <= TOL and abs(rewards[2] - local[2]) <= TOL
    assert rewards[1] == -3.0 and answer["scores"] == rewards
    assert answer["extra_logs"]["rh_trl/failed"] == [0, 1, 0]
    assert answer["extra_logs"]["rh_trl/query_without_prompt"] == [0, 0, 1]
    assert counts.get("get_reward_failed", 0) - before.get("get_reward_failed", 0) == 1
    assert counts["get_reward_query_without_prompt"] - before.get("get_reward_query_without_prompt", 0) == 1


def test_a_request_whose_scoring_raises_gets_the_failure_score(server):
    body = {"query": ["a BOOM", "ab"], "prompts": ["a ", "a"]}
    answer = httpx.post(server.url + "/get_reward?model=slow", json=body).json()
    assert answer["rewards"] == [7.0, 7.0] and answer["extra_logs"]["rh_trl/failed"] == [1, 1]
    fine = httpx.post(server.url + "/get_reward?model=slow", json={"query": ["ab"], "prompts": ["a"]}).json()
    assert fine["rewards"] == [1.0] and fine["extra_logs"]["rh_trl/failed"] == [0]


def test_a_reward_without_failure_score_is_not_served_there(server):
    response = httpx.post(server.url + "/get_reward?model=trl-only", json={"query": ["ab"], "prompts": ["a"]})
    assert response.status_code == 404 and "failure_score" in response.json()["detail"]
    # /v1/rewards serves it as before
    assert httpx.post(
        server.url + "/v1/rewards", json={"model": "trl-only", "prompts": ["a"], "completions": ["b"]}
    )
    served_none = server_config(rewards=[{"name": "a", "type": "python", "target": "x:y"}])
    with ThreadServer(served_none, {"a": Slow()}) as srv:
        response = httpx.post(srv.url + "/get_reward", json={"query": ["ab"]})
    assert response.status_code == 404 and "serves no reward on /get_reward" in response.json()["detail"]


def test_several_rewards_served_without_a_default_refuse_to_start(tmp_path, capsys):
    two = [
        {"name": "a", "type": "tiny", "failure_score": 0.0},
        {"name": "b", "type": "tiny", "failure_score": 0.0},
    ]
    with pytest.raises(ValueError, match=r"names no default.*Set get_reward_default"):
        server_config(rewards=two)
    with pytest.raises(ValueError, match="get_reward_default 'c' is not a hosted reward"):
        server_config(rewards=two, get_reward_default="c")
    with pytest.raises(ValueError, match="get_reward_default 'b' has no failure_score"):
        server_config(rewards=[two[0], {"name": "b", "type": "tiny"}], get_reward_default="b")
    server_config(rewards=two, get_reward_default="b")
    server_config(rewards=[{"name": "a", "type": "tiny"}, {"name": "b", "type": "tiny"}])  # /get_reward off
    path = tmp_path / "serve.yaml"
    path.write_text(
        "rewards:\n  - {name: a, type: tiny, failure_score: 0}\n  - {name: b, type: tiny, failure_score: 0}\n"
    )
    assert main(["serve", "--config", str(path)]) == 2  # before loading any model
    assert "Set get_reward_default" in capsys.readouterr().err


def test_an_overloaded_reward_makes_get_reward_wait_for_room_not_fail():
    """A full queue answers /v1/rewards with 429; /get_reward waits for room (OpenRLHF would give up after five
    1 s retries of a 429 and lose the reward), so every OpenRLHF query gets its real score, each scored once.
    With no wait allowed, an overloaded request gets the failure score, counted."""
    import asyncio

    from .test_server_overload import Recording, python_spec

    reward = Recording(delay=0.3)
    spec = python_spec(max_batch_items=2, max_queue_samples=4, max_wait_ms=1, failure_score=-1.0)
    with ThreadServer(server_config(rewards=[spec], get_reward_default="rec"), {"rec": reward}) as srv:

        async def burst(path: str, bodies: list[dict]) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(srv.url + path, json=b) for b in bodies))

        queries = [f"p{'x' * (i + 1)}" for i in range(12)]
        answers = asyncio.run(burst("/get_reward", [{"query": [q], "prompts": ["p"]} for q in queries]))
        assert [a.status_code for a in answers] == [200] * 12
        assert [a.json()["rewards"] for a in answers] == [[float(i + 1)] for i in range(12)]
        assert all(a.json()["extra_logs"]["rh_trl/failed"] == [0] for a in answers)
        assert sorted(reward.seen) == sorted(q[1:] for q in queries)  # each query scored once

    impatient = server_config(rewards=[spec], get_reward_default="rec", get_reward_wait_s=0)
    with ThreadServer(impatient, {"rec": Recording(delay=0.3)}) as srv:
        answers = asyncio.run(burst("/get_reward", [{"query": [q], "prompts": ["p"]} for q in queries]))
        assert [a.status_code for a in answers] == [200] * 12
        failed = [a.json() for a in answers if a.json()["extra_logs"]["rh_trl/failed"] == [1]]
        assert failed and all(f["rewards"] == [-1.0] for f in failed)
