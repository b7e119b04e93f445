"""ORM on real vLLM: the in-process pooling runner and ``vllm serve --runner pooling`` against the transformers
engine on the same checkpoint."""

from __future__ import annotations

import logging

import pytest

from rh_trl import ORM
from rh_trl.engines.http import ModelNotServedError
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS
from tests.vllm.conftest import ENGINE_KWARGS, MAX_MODEL_LEN, max_diff

pytestmark = pytest.mark.vllm

TOL = 1e-4
LONG_PROMPT = [{"role": "user", "content": "Tell me about the moon and the sea. " * 60}]


@pytest.fixture(scope="module")
def orm_vllm(checkpoints):
    rm = ORM(str(checkpoints.orm), engine="vllm", vllm_kwargs=ENGINE_KWARGS)
    yield rm
    rm.engine.close()


@pytest.fixture(scope="module")
def orm3_vllm(checkpoints):
    rm = ORM(str(checkpoints.orm3), engine="vllm", output_index=0, vllm_kwargs=ENGINE_KWARGS)
    yield rm
    rm.engine.close()


@pytest.mark.parametrize("fmt", ["conversational", "standard"])
def test_in_process_vllm_equals_hf(checkpoints, orm_vllm, fmt):
    """Default arguments on both sides: the checkpoint's float32 (not vLLM's bfloat16 "auto"), the normalization
    its config stores, and the same position read although the EOS that ends a standard text is the pad id."""
    prompts, completions = (
        (CONV_PROMPTS, CONV_COMPLETIONS) if fmt == "conversational" else (TEXT_PROMPTS, TEXT_COMPLETIONS)
    )
    hf = ORM(str(checkpoints.orm))
    expected = hf.score(prompts, completions)
    got = orm_vllm.score(prompts, completions)
    assert max_diff(got, expected) <= TOL
    assert (
        orm_vllm.engine.dtype == "float32" and str(orm_vllm.engine.llm.model_config.dtype) == "torch.float32"
    )
    assert orm_vllm.norm == (0.5, 2.0) and len({round(x, 4) for x in got}) == len(got)


def test_in_process_vllm_long_samples(checkpoints, orm_vllm, caplog):
    """max_length defaults to vLLM's max_model_len, so a long sample loses prompt tokens and is scored as the hf
    engine scores it at that length; a max_length beyond the engine gives that sample None, never a failed batch."""
    prompts, completions = [*CONV_PROMPTS, LONG_PROMPT], [*CONV_COMPLETIONS, CONV_COMPLETIONS[0]]
    assert orm_vllm.formatter.max_length == MAX_MODEL_LEN
    got = orm_vllm.score(prompts, completions)
    expected = ORM(str(checkpoints.orm), max_length=MAX_MODEL_LEN).score(prompts, completions)
    assert max_diff(got, expected) <= TOL and orm_vllm.last_stats["num_truncated"] == 1

    too_long = ORM(str(checkpoints.orm), engine=orm_vllm.engine, max_length=4 * MAX_MODEL_LEN)
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        got = too_long.score(prompts, completions)
    assert got[3] is None and max_diff(got[:3], expected[:3]) <= TOL
    assert too_long.last_stats["num_too_long"] == 1 and "longer than the 256 tokens" in caplog.text


def test_multi_output_head_on_vllm_equals_hf(checkpoints, orm3_vllm):
    """Output selection by label, weighted sums and transforms run on the raw logits vLLM returns."""
    path = str(checkpoints.orm3)
    cases = [
        {"output_index": "correctness"},
        {"output_weights": {"helpfulness": 1.0, "verbosity": -0.5}},
        {"output_index": 2, "transform": "sigmoid"},
        {"output_weights": [0.2, 0.3, 0.5], "transform": "softmax"},
    ]
    for options in cases:
        on_vllm = ORM(path, engine=orm3_vllm.engine, **options)
        assert (
            max_diff(
                on_vllm.score(CONV_PROMPTS, CONV_COMPLETIONS),
                ORM(path, **options).score(CONV_PROMPTS, CONV_COMPLETIONS),
            )
            <= TOL
        ), options


def test_vllm_serve_equals_hf(checkpoints, servers):
    """``vllm serve --runner pooling``'s /classify with our token ids and raw logits: chunked, concurrent."""
    url, path = servers["orm3"], str(checkpoints.orm3)
    for options in (
        {"output_index": "helpfulness"},
        {"output_weights": [1.0, -1.0, 0.5], "transform": "sigmoid"},
    ):
        remote = ORM(url, engine="openai", tokenizer=path, served_model="orm3", batch_size=2, **options)
        got = remote.score(CONV_PROMPTS + TEXT_PROMPTS, CONV_COMPLETIONS + TEXT_COMPLETIONS)
        expected = ORM(path, **options).score(
            CONV_PROMPTS + TEXT_PROMPTS, CONV_COMPLETIONS + TEXT_COMPLETIONS
        )
        assert max_diff(got, expected) <= TOL, options
        assert remote.last_stats["num_server_failed"] == 0 and remote.formatter.max_length == MAX_MODEL_LEN


def test_vllm_serve_wrong_model_name_is_a_configuration_error(checkpoints, servers):
    remote = ORM(
        servers["orm3"],
        engine="openai",
        tokenizer=str(checkpoints.orm3),
        served_model="skywork",
        output_index=0,
    )
    with pytest.raises(
        ModelNotServedError, match=r"does not serve the model 'skywork'; it serves \['orm3'\]"
    ):
        remote.score(CONV_PROMPTS, CONV_COMPLETIONS)


def test_vllm_serve_long_sample_gets_none_alone(checkpoints, servers):
    path = str(checkpoints.orm3)
    remote = ORM(
        servers["orm3"], engine="openai", tokenizer=path, served_model="orm3", output_index=0, max_length=1024
    )
    got = remote.score([*CONV_PROMPTS, LONG_PROMPT], [*CONV_COMPLETIONS, CONV_COMPLETIONS[0]])
    expected = ORM(path, output_index=0).score(CONV_PROMPTS, CONV_COMPLETIONS)
    assert got[3] is None and max_diff(got[:3], expected) <= TOL and remote.last_stats["num_too_long"] == 1
