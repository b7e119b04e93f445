"""DrSow on the local engine against an independent per-sample computation; options, bad input, the vLLM
output reader, and a real GRPO run."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from rh_trl.engines.logprobs import TokenMismatchError, next_token_logprobs
from rh_trl.engines.vllm_logprobs import import_vllm, span_logprobs_from_output
from rh_trl.formatting import RewardInputError, to_sample
from rh_trl.rewards.drsow import DrSow, SpanEncoder
from rh_trl.testing import tiny_causal_lm

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS
from .trainer_runs import train_grpo

TOL = 1e-4


@pytest.fixture(scope="module")
def strong_lm(llama_tok):
    return tiny_causal_lm(llama_tok, seed=11)


@pytest.fixture(scope="module")
def weak_lm(chatml_tok):
    return tiny_causal_lm(chatml_tok, seed=12)


def response_positions(tok, prompt, completion, end_of_turn: bool = False) -> tuple[list[int], int, int]:
    """Full token ids and the response positions, found by prefix tokenization (checked to be prefixes)."""
    if isinstance(prompt, str):
        full = tok(prompt + completion)["input_ids"]
        prefix = tok(prompt)["input_ids"]
        upto = full
    else:
        full = tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prefix = tok(head, add_special_tokens=False)["input_ids"]
        upto = tok(head + completion[0]["content"], add_special_tokens=False)["input_ids"]
    assert full[: len(prefix)] == prefix and full[: len(upto)] == upto
    return full, len(prefix), len(full) if end_of_turn else len(upto)


@torch.no_grad()
def reference_logprob(model, tok, prompt, completion, reduction: str, end_of_turn: bool = False) -> float:
    full, start, end = response_positions(tok, prompt, completion, end_of_turn)
    logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
    values = [logp[t - 1, full[t]].item() for t in range(start, end)]
    return sum(values) / len(values) if reduction == "mean" else sum(values)


def reference(strong_lm, llama_tok, weak_lm, chatml_tok, prompts, completions, reduction, end_of_turn=False):
    return [
        reference_logprob(strong_lm, llama_tok, p, c, reduction, end_of_turn)
        - reference_logprob(weak_lm, chatml_tok, p, c, reduction, end_of_turn)
        for p, c in zip(prompts, completions, strict=True)
    ]


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


class WithoutOffsets:
    """A tokenizer seen as slow: no offset mappings, so spans come from prefix tokenizations."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)


@pytest.mark.parametrize("slow", [False, True], ids=["offsets", "prefix-tokenization"])
@pytest.mark.parametrize("end_of_turn", [False, True])
def test_spans_match_prefix_positions(llama_tok, chatml_tok, slow, end_of_turn):
    for tok in (llama_tok, chatml_tok):
        encoder = SpanEncoder(WithoutOffsets(tok) if slow else tok, include_end_of_turn=end_of_turn)
        for prompts, completions in ((CONV_PROMPTS, CONV_COMPLETIONS), (TEXT_PROMPTS, TEXT_COMPLETIONS)):
            for p, c in zip(prompts, completions, strict=True):
                span = encoder.encode(to_sample(p, c))
                full, start, end = response_positions(tok, p, c, end_of_turn and not isinstance(p, str))
                assert (span.input_ids, span.start, span.end) == (full, start, end)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("fmt", ["conversational", "standard"])
def test_matches_reference(strong_lm, weak_lm, llama_tok, chatml_tok, reduction, fmt):
    prompts, completions = (
        (CONV_PROMPTS, CONV_COMPLETIONS) if fmt == "conversational" else (TEXT_PROMPTS, TEXT_COMPLETIONS)
    )
    drsow = DrSow(
        strong_lm,
        weak_lm,
        strong_tokenizer=llama_tok,
        weak_tokenizer=chatml_tok,
        reduction=reduction,
        max_tokens_per_batch=40,
    )
    scores = drsow(prompts, completions)
    expected = reference(strong_lm, llama_tok, weak_lm, chatml_tok, prompts, completions, reduction)
    assert max_diff(scores, expected) <= TOL
    assert len(set(scores)) == len(scores)
    assert drsow.last_stats["num_none"] == 0


def test_end_of_turn_tokens_included_on_request(strong_lm, weak_lm, llama_tok, chatml_tok):
    drsow = DrSow(
        strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, include_end_of_turn=True
    )
    scores = drsow(CONV_PROMPTS, CONV_COMPLETIONS)
    expected = reference(
        strong_lm, llama_tok, weak_lm, chatml_tok, CONV_PROMPTS, CONV_COMPLETIONS, "sum", True
    )
    assert max_diff(scores, expected) <= TOL
    excluded = reference(strong_lm, llama_tok, weak_lm, chatml_tok, CONV_PROMPTS, CONV_COMPLETIONS, "sum")
    assert max_diff(scores, excluded) > 1e-2  # the end-of-turn tokens do change the number


@torch.no_grad()
def test_include_eos_scores_the_eos_token(strong_lm, weak_lm, llama_tok, chatml_tok):
    drsow = DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, include_eos=True)
    scores = drsow(TEXT_PROMPTS, TEXT_COMPLETIONS)
    expected = []
    for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True):
        total = 0.0
        for sign, model, tok in ((1, strong_lm, llama_tok), (-1, weak_lm, chatml_tok)):
            full, start, _ = response_positions(tok, p, c)
            full = full + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
            total += sign * sum(logp[t - 1, full[t]].item() for t in range(start, len(full)))
        expected.append(total)
    assert max_diff(scores, expected) <= TOL


def test_system_prompt_fixed_and_from_column(strong_lm, weak_lm, llama_tok, chatml_tok):
    prompts = [CONV_PROMPTS[0], CONV_PROMPTS[1]]  # the second already has a system turn: left as it is
    completions = [CONV_COMPLETIONS[0], CONV_COMPLETIONS[1]]
    fixed = DrSow(
        strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, system_prompt="Be kind."
    )
    with_system = [[{"role": "system", "content": "Be kind."}, *prompts[0]], prompts[1]]
    expected = reference(strong_lm, llama_tok, weak_lm, chatml_tok, with_system, completions, "sum")
    assert max_diff(fixed(prompts, completions), expected) <= TOL

    per_sample = DrSow(
        strong_lm,
        weak_lm,
        strong_tokenizer=llama_tok,
        weak_tokenizer=chatml_tok,
        system_prompt_column="system",
    )
    scores = per_sample([prompts[0], prompts[0]], [completions[0]] * 2, system=["Be terse.", None])
    first = reference(
        strong_lm,
        llama_tok,
        weak_lm,
        chatml_tok,
        [[{"role": "system", "content": "Be terse."}, *prompts[0]]],
        completions[:1],
        "sum",
    )
    plain = reference(strong_lm, llama_tok, weak_lm, chatml_tok, prompts[:1], completions[:1], "sum")
    assert max_diff(scores, first + plain) <= TOL
    with pytest.raises(RewardInputError, match="system_prompt_column='system'"):
        per_sample(prompts, completions)


def test_empty_and_unreadable_samples_get_none_counted(strong_lm, weak_lm, llama_tok, chatml_tok, caplog):
    drsow = DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok)
    logged = []
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        scores = drsow(
            [CONV_PROMPTS[0], CONV_PROMPTS[0], CONV_PROMPTS[0]],
            [CONV_COMPLETIONS[0], [{"role": "assistant", "content": ""}], None],
            log_metric=lambda k, v: logged.append((k, v)),
        )
    assert scores[0] is not None and math.isfinite(scores[0]) and scores[1] is None and scores[2] is None
    metrics = dict(logged)
    assert metrics[f"{drsow.__name__}/num_empty_span"] == 1 and metrics[f"{drsow.__name__}/num_invalid"] == 1
    assert "empty response span" in caplog.text
    with pytest.raises(RewardInputError, match="empty response span"):
        DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, strict=True)(
            CONV_PROMPTS[:1], [[{"role": "assistant", "content": ""}]]
        )


def test_bad_arguments(strong_lm, weak_lm, llama_tok, chatml_tok):
    with pytest.raises(ValueError, match="engine must be"):
        DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, engine="tgi")
    with pytest.raises(ValueError, match="reduction must be"):
        DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, reduction="max")
    with pytest.raises(ValueError, match="strong_tokenizer"):
        DrSow("http://127.0.0.1:1", "http://127.0.0.1:2", engine="openai")
    drsow = DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, name="ratio")
    assert drsow.__name__ == "ratio" and drsow.as_async().__name__ == "ratio"
    with pytest.raises(RewardInputError, match="2 prompts and 1 completions"):
        drsow(CONV_PROMPTS[:2], CONV_COMPLETIONS[:1])


def test_async_entry_points_give_the_same_numbers(strong_lm, weak_lm, llama_tok, chatml_tok):
    import asyncio

    drsow = DrSow(strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok)
    sync = drsow(CONV_PROMPTS, CONV_COMPLETIONS)
    assert asyncio.run(drsow.as_async()(CONV_PROMPTS, CONV_COMPLETIONS, trainer_state=None)) == sync


def test_next_token_logprobs_in_small_chunks(monkeypatch):
    import rh_trl.engines.logprobs as lp

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50)
    ids = torch.randint(0, 50, (2, 7))
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 100)  # two positions per chunk
    out = next_token_logprobs(logits, ids, lengths=[7, 4])
    full = torch.log_softmax(logits.double(), -1)
    for b, n in ((0, 7), (1, 4)):
        for t in range(1, n):
            assert abs(out[b, t].item() - full[b, t - 1, ids[b, t]].item()) <= 1e-5
        assert math.isnan(out[b, 0].item()) and all(math.isnan(v) for v in out[b, n:].tolist())


# -- the in-process vLLM engine: only its pure logic (vLLM is not installed in CI) ----------------------------


def fake_request_output(ids, logprobs, extra_top=None):
    """Shaped like vllm.RequestOutput: prompt_token_ids and prompt_logprobs (None, then {id: Logprob})."""
    entries = [None]
    for t in range(1, len(ids)):
        entry = {ids[t]: SimpleNamespace(logprob=logprobs[t], rank=3, decoded_token="x")}
        if extra_top is not None:
            entry[extra_top] = SimpleNamespace(logprob=-0.1, rank=1, decoded_token="y")
        entries.append(entry)
    return SimpleNamespace(prompt_token_ids=list(ids), prompt_logprobs=entries, outputs=[])


def test_vllm_output_reader():
    ids = [1, 5, 9, 4, 7]
    logprobs = [None, -1.0, -2.5, -0.25, -3.0]
    out = fake_request_output(ids, logprobs, extra_top=8)
    assert span_logprobs_from_output(out, ids, 2, 5) == [-2.5, -0.25, -3.0]
    with pytest.raises(TokenMismatchError, match="other tokens"):
        span_logprobs_from_output(out, [1, 5, 9, 4, 6], 2, 5)
    shifted = SimpleNamespace(prompt_token_ids=None, prompt_logprobs=out.prompt_logprobs)
    with pytest.raises(TokenMismatchError, match="token sent there is 6"):
        span_logprobs_from_output(shifted, [1, 5, 9, 4, 6], 2, 5)
    with pytest.raises(ValueError, match="at least one token before it"):
        span_logprobs_from_output(out, ids, 0, 2)


def test_vllm_engine_import_error_names_the_extra():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"rh_trl\[vllm\]"):
            import_vllm()
        with pytest.raises(ImportError, match=r"rh_trl\[vllm\]"):
            DrSow("a", "b", engine="vllm")
    else:
        pytest.skip("vLLM is installed")


@pytest.mark.slow
def test_grpo_two_steps_with_drsow(tmp_path, policy, llama_tok, strong_lm, weak_lm, chatml_tok):
    drsow = DrSow(
        strong_lm, weak_lm, strong_tokenizer=llama_tok, weak_tokenizer=chatml_tok, name="drsow_tiny"
    )
    trainer = train_grpo(tmp_path, policy, llama_tok, [drsow])
    logs = [h for h in trainer.state.log_history if "rewards/drsow_tiny/mean" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["rewards/drsow_tiny/mean"]) and h["drsow_tiny/num_none"] == 0
