"""DrSow on real vLLM: two in-process engines and two ``vllm serve`` processes, against the transformers engine."""

from __future__ import annotations

import pytest

from rh_trl import DrSow
from rh_trl.engines.http import ModelNotServedError
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS
from tests.vllm.conftest import ENGINE_KWARGS, MAX_MODEL_LEN, max_diff

pytestmark = pytest.mark.vllm

TOL = 1e-3  # sums of log-ratios over whole responses; float32 on both sides
PROMPTS = [*CONV_PROMPTS, *TEXT_PROMPTS]
COMPLETIONS = [*CONV_COMPLETIONS, *TEXT_COMPLETIONS]
LONG_PROMPT = [{"role": "user", "content": "Describe the moon, the sea and the trains. " * 40}]


@pytest.fixture(scope="module")
def hf(checkpoints):
    return DrSow(str(checkpoints.strong), str(checkpoints.weak))


@pytest.fixture(scope="module")
def drsow_vllm(checkpoints):
    drsow = DrSow(str(checkpoints.strong), str(checkpoints.weak), engine="vllm", vllm_kwargs=ENGINE_KWARGS)
    yield drsow
    for engine in drsow.engines.values():
        engine.close()


def test_in_process_vllm_equals_hf_with_default_dtype(hf, drsow_vllm):
    """No dtype given: both engines run the checkpoint's float32 (vLLM's own "auto" would be bfloat16 on CPU)."""
    expected = hf.score(PROMPTS, COMPLETIONS)
    assert max_diff(drsow_vllm.score(PROMPTS, COMPLETIONS), expected) <= TOL
    assert {e.dtype for e in drsow_vllm.engines.values()} == {"float32"}
    assert max(abs(x) for x in expected) > 1.0  # the two models disagree: the rewards are not all near zero


def test_in_process_vllm_long_samples(checkpoints, drsow_vllm):
    """With the end-of-turn tokens scored, the last token of the rendered sample is sent too. max_length defaults
    to max_model_len - 1 (the one generated token needs a slot): a long sample is cut from the left and scored. A
    sample of exactly max_model_len tokens (max_length set to that) is None alone, never a failed batch."""
    strong, weak = drsow_vllm.engines["strong"], drsow_vllm.engines["weak"]
    prompts, completions = [*PROMPTS, LONG_PROMPT], [*COMPLETIONS, CONV_COMPLETIONS[0]]
    shared = DrSow(strong, weak, engine="vllm", include_end_of_turn=True)
    assert {e.formatter.max_length for e in shared.encoders.values()} == {MAX_MODEL_LEN - 1}
    cut = DrSow(
        str(checkpoints.strong), str(checkpoints.weak), max_length=MAX_MODEL_LEN - 1, include_end_of_turn=True
    )
    expected = cut.score(prompts, completions)
    assert max_diff(shared.score(prompts, completions), expected) <= TOL and expected[-1] is not None
    assert shared.last_stats["num_truncated"] == 1

    edge = DrSow(strong, weak, engine="vllm", include_end_of_turn=True, max_length=MAX_MODEL_LEN)
    sample = edge._make_batch([LONG_PROMPT], [CONV_COMPLETIONS[0]], None, {}).samples[0]
    span = edge.encoders["strong"].encode(sample)
    assert len(span.input_ids) == span.end == MAX_MODEL_LEN  # exactly max_model_len tokens are sent
    got = edge.score(prompts, completions)
    assert got[-1] is None and max_diff(got[:-1], expected[:-1]) <= TOL
    assert edge.last_stats["num_too_long"] == 1


def test_sleep_mode_on_cpu_is_a_clear_error(checkpoints):
    with pytest.raises(
        ValueError, match=r"enable_sleep_mode=True, but vLLM has no sleep mode on this platform"
    ):
        DrSow(str(checkpoints.strong), str(checkpoints.weak), engine="vllm", enable_sleep_mode=True)


def remote(servers, checkpoints, **kwargs) -> DrSow:
    return DrSow(
        servers["strong"],
        servers["weak"],
        engine="openai",
        strong_tokenizer=str(checkpoints.strong),
        weak_tokenizer=str(checkpoints.weak),
        **kwargs,
    )


@pytest.mark.parametrize("use_prompt_logprobs", [True, False])
def test_vllm_serve_equals_hf(servers, checkpoints, hf, use_prompt_logprobs):
    drsow = remote(servers, checkpoints, strong_model="strong", weak_model="weak", batch_size=2,
                   use_prompt_logprobs=use_prompt_logprobs)  # fmt: skip
    assert max_diff(drsow.score(PROMPTS, COMPLETIONS), hf.score(PROMPTS, COMPLETIONS)) <= TOL
    assert drsow.last_stats["num_server_failed"] == drsow.last_stats["num_server_rejected"] == 0


def test_vllm_serve_long_samples(servers, checkpoints):
    """The server's max_model_len (from /v1/models) sets the default max_length; a sample of exactly
    max_model_len tokens, which the server would refuse, is None alone and never sent."""
    prompts, completions = [*PROMPTS, LONG_PROMPT], [*COMPLETIONS, CONV_COMPLETIONS[0]]
    cut = DrSow(
        str(checkpoints.strong), str(checkpoints.weak), max_length=MAX_MODEL_LEN - 1, include_end_of_turn=True
    )
    expected = cut.score(prompts, completions)
    drsow = remote(servers, checkpoints, include_end_of_turn=True)
    assert max_diff(drsow.score(prompts, completions), expected) <= TOL
    assert {e.formatter.max_length for e in drsow.encoders.values()} == {MAX_MODEL_LEN - 1}
    edge = remote(servers, checkpoints, include_end_of_turn=True, max_length=MAX_MODEL_LEN)
    got = edge.score(prompts, completions)
    assert got[-1] is None and max_diff(got[:-1], expected[:-1]) <= TOL
    assert edge.last_stats["num_too_long"] == 1 and edge.last_stats["num_server_rejected"] == 0


def test_launch_script_prints_a_working_construction(servers, hf):
    """recipes/launch_drsow.sh started the two servers (each in its checkpoint's dtype) and printed the DrSow
    construction: run as printed, it gives the hf engine's rewards."""
    printed = servers.drsow.wait()
    code = printed[printed.index("import rh_trl") :]
    namespace: dict = {}
    exec(code, namespace)
    reward = namespace["reward"]
    assert isinstance(reward, DrSow) and reward.engine_kind == "openai"
    assert max_diff(reward.score(PROMPTS, COMPLETIONS), hf.score(PROMPTS, COMPLETIONS)) <= TOL


def test_vllm_serve_wrong_model_name_is_a_configuration_error(servers, checkpoints):
    drsow = remote(servers, checkpoints, strong_model="aligned", weak_model="weak")
    with pytest.raises(ModelNotServedError, match=r"strong server .*'aligned'; it serves \['strong'\]"):
        drsow.score(PROMPTS, COMPLETIONS)
