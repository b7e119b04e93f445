"""PRMs on real vLLM, in process and on ``vllm serve --runner pooling``, against the transformers engine: the
separator family (a Qwen2ForProcessRewardModel whose separator is not Qwen's own id 151651, running the checkpoint's
code, and a token-classification PRM), and the next-token and step-tag kinds (a causal LM whose final hidden states
come from vLLM, ``convert="embed"``, and whose judgement tokens' logits are computed from them)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import rh_trl
from rh_trl import PRM
from rh_trl.engines.vllm_pooling import VLLMPoolingEngine
from tests.vllm.conftest import ENGINE_KWARGS, MAX_MODEL_LEN, TAG

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module", autouse=True)
def module_servers(servers):
    servers.only("prm", "lm-tokens")  # the earlier modules' servers are done: room for these two


TOL = 1e-4
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3 + 4?"}],
    [{"role": "user", "content": "Name the biggest of 3, 9 and 4."}],
    "Compute 10 - 4.",
]
COMPLETIONS = [
    [{"role": "assistant", "content": "2 plus 3 is 5.\n\nThen 5 plus 4 is 9.\n\nThe answer is 9."}],
    [{"role": "assistant", "content": "Compare 3 and 9: 9 is bigger.\n\nCompare 9 and 4: 9."}],
    "10 minus 4 is 6.",
]


def max_step_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.fixture(scope="module")
def tokenizer(checkpoints):
    return AutoTokenizer.from_pretrained(checkpoints.prm)


@pytest.fixture(scope="module")
def prm_vllm(checkpoints, tokenizer):
    """Built through rh_trl.load, which picks PRM (separator) from the checkpoint's architecture."""
    prm = rh_trl.load(str(checkpoints.prm), engine="vllm", tokenizer=tokenizer, vllm_kwargs=ENGINE_KWARGS)
    yield prm
    prm.engine.close()


def test_in_process_vllm_equals_hf_for_any_separator(checkpoints, tokenizer, prm_vllm):
    assert type(prm_vllm) is PRM and prm_vllm.kind == "separator"
    assert isinstance(prm_vllm.engine, VLLMPoolingEngine) and prm_vllm.layout.marker_id != 151651
    hf = PRM(str(checkpoints.prm), tokenizer)
    expected = hf.score_steps(PROMPTS, COMPLETIONS)
    got = prm_vllm.score_steps(PROMPTS, COMPLETIONS)
    assert [len(s) for s in got] == [3, 2, 1]
    assert max_step_diff(got, expected) <= TOL
    assert len({round(x, 4) for s in got for x in s}) > 3  # the steps get different scores
    assert prm_vllm.score(PROMPTS, COMPLETIONS) == pytest.approx(hf.score(PROMPTS, COMPLETIONS), abs=TOL)
    assert prm_vllm.engine.dtype == "float32" and prm_vllm.max_length == MAX_MODEL_LEN


def test_in_process_vllm_long_sample_gets_none_alone(checkpoints, tokenizer, prm_vllm):
    long_prompt = [{"role": "user", "content": "Add the numbers one by one, slowly. " * 60}]
    prompts, completions = [*PROMPTS, long_prompt], [*COMPLETIONS, COMPLETIONS[0]]
    too_long = PRM(str(checkpoints.prm), tokenizer, engine=prm_vllm.engine, max_length=4 * MAX_MODEL_LEN)
    got = too_long.score_steps(prompts, completions)
    expected = PRM(str(checkpoints.prm), tokenizer).score_steps(PROMPTS, COMPLETIONS)
    assert got[3] is None and max_step_diff(got[:3], expected) <= TOL
    assert too_long.score(prompts, completions)[3] is None and too_long.last_stats["num_too_long"] == 1


def test_vllm_serve_equals_hf(checkpoints, tokenizer, servers):
    """``vllm serve --runner pooling --pooler-config '{"tok_pooling_type": "ALL"}'``: /pooling, token_classify."""
    remote = PRM(servers["prm"], tokenizer, engine="openai", served_model="prm", batch_size=2)
    expected = PRM(str(checkpoints.prm), tokenizer).score_steps(PROMPTS, COMPLETIONS)
    assert max_step_diff(remote.score_steps(PROMPTS, COMPLETIONS), expected) <= TOL
    assert remote.max_length == MAX_MODEL_LEN


def test_token_classification_prm_on_vllm_equals_hf(checkpoints, tokenizer):
    """A converted PRM: LlamaForTokenClassification with the separator token, as the registry finds it."""
    path = str(checkpoints.token_prm)
    prm = rh_trl.load(path, engine="vllm", tokenizer=tokenizer, vllm_kwargs=ENGINE_KWARGS)
    try:
        assert type(prm) is PRM and prm.kind == "separator"
        expected = PRM(path, tokenizer).score_steps(PROMPTS, COMPLETIONS)
        assert max_step_diff(prm.score_steps(PROMPTS, COMPLETIONS), expected) <= TOL
    finally:
        prm.engine.close()


# -- next-token and step-tag PRMs: hidden states from vLLM ------------------------------------------------------


@pytest.fixture(scope="module")
def hidden_states(checkpoints):
    """One in-process engine giving every token's final hidden state, shared by both kinds' rewards."""
    engine = VLLMPoolingEngine(str(checkpoints.lm), task="token_embed", **ENGINE_KWARGS)
    yield engine
    engine.close()


KINDS = {"next_token": {}, "step_tag": {"step_token": TAG}}


@pytest.mark.parametrize("kind", list(KINDS))
def test_next_token_and_step_tag_prms_on_vllm_equal_hf(checkpoints, hidden_states, kind):
    path = str(checkpoints.lm)
    hf = PRM(path, kind=kind, **KINDS[kind])
    on_vllm = PRM(path, kind=kind, engine=hidden_states, **KINDS[kind])
    expected = hf.score_steps(PROMPTS, COMPLETIONS)
    got = on_vllm.score_steps(PROMPTS, COMPLETIONS)
    assert [len(s) for s in got] == [3, 2, 1]
    assert max_step_diff(got, expected) <= TOL
    assert len({round(x, 6) for s in got for x in s}) > 3  # the steps get different scores
    assert on_vllm.score(PROMPTS, COMPLETIONS) == pytest.approx(hf.score(PROMPTS, COMPLETIONS), abs=TOL)


@pytest.mark.parametrize("kind", list(KINDS))
def test_next_token_and_step_tag_prms_on_vllm_serve_equal_hf(checkpoints, servers, kind):
    """``vllm serve --runner pooling --convert embed`` with ``token_embed`` and ALL pooling: /pooling."""
    path = str(checkpoints.lm)
    remote = PRM(servers["lm-tokens"], path, kind=kind, engine="openai", batch_size=2, **KINDS[kind])
    expected = PRM(path, kind=kind, **KINDS[kind]).score_steps(PROMPTS, COMPLETIONS)
    assert max_step_diff(remote.score_steps(PROMPTS, COMPLETIONS), expected) <= TOL
    assert remote.max_length == MAX_MODEL_LEN


def test_next_token_prm_refuses_an_engine_for_another_task(checkpoints, hidden_states):
    with pytest.raises(
        ValueError,
        match="engine= is a vLLM engine for the task 'token_embed'.*needs the task 'token_classify'",
    ):
        PRM(str(checkpoints.token_prm), engine=hidden_states)
