"""PRM step scores against independent per-sample forward passes, aggregation, splitting, vLLM picking, GRPO."""

from __future__ import annotations

import math

import pytest
import torch

from rh_trl.engines.vllm_pooling import rows_at_steps
from rh_trl.formatting import RewardInputError
from rh_trl.rewards.prm import PRM, QWEN_MATH_SYSTEM_PROMPT
from rh_trl.rewards.prm_steps import AGGREGATIONS, split_steps
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm, tiny_llama_config

from .trainer_runs import prompt_dataset, train_grpo

TOL = 1e-5
SEP = "<extra_0>"
TAG = "ки"

TEXT_PROMPTS = ["Question: what is 2+2?", "Add 3 and 4, then double it."]
TEXT_COMPLETIONS = [
    "First, 2 plus 2 is 4.\n\nSo the answer is 4.",
    "Add: 3 + 4 = 7.\n\n  Double it: 14.  \n\n\n\nThe answer is 14.",
]
CONV_PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 5 - 2?"}],
    [{"role": "user", "content": "Name the numbers 1 2 3."}],
]
CONV_COMPLETIONS = [
    [{"role": "assistant", "content": "Take 2 from 5.\n\nThe result is 3."}],
    [{"role": "assistant", "content": "One.\n\nTwo.\n\nThree and done."}],
]


def hand_split(text: str) -> list[str]:
    return [part.strip() for part in text.split("\n\n") if part.strip()]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


def prompt_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def response_text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


# -- models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_style():
    """A ChatML BPE tokenizer with the special separator token and a 2-label token-classification model."""
    from transformers import LlamaForTokenClassification

    tok = bpe_tokenizer("chatml", vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": [SEP]})
    torch.manual_seed(11)
    model = LlamaForTokenClassification(tiny_llama_config(tok, num_labels=2)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.05)  # widen the random head so step scores differ
    return model, tok


@pytest.fixture(scope="module")
def rlhflow_style():
    """A Llama-style BPE tokenizer with a chat template and single-token "+"/"-", and a causal LM."""
    tok = bpe_tokenizer("llama")
    return tiny_causal_lm(tok, seed=12).eval(), tok


@pytest.fixture(scope="module")
def shepherd_style():
    tok = bpe_tokenizer("llama")
    tok.add_tokens([TAG])
    return tiny_causal_lm(tok, seed=13).eval(), tok


# -- independent references -------------------------------------------------------------------------------------


@torch.no_grad()
def ref_separator(model, tok, prompt, completion) -> list[float]:
    steps = hand_split(response_text(completion))
    messages = [{"role": "system", "content": QWEN_MATH_SYSTEM_PROMPT}]
    messages += [m for m in prompt_messages(prompt) if m["role"] != "system"]
    messages.append({"role": "assistant", "content": SEP.join(steps) + SEP})
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    sep_id = tok.convert_tokens_to_ids(SEP)
    at = [t for t, i in enumerate(ids) if i == sep_id]
    assert len(at) == len(steps)
    logits = model(torch.tensor([ids])).logits[0, at]
    return logits.softmax(-1)[:, 1].tolist()


def rlhflow_conversation(prompt, steps: list[str]) -> list[dict]:
    messages = prompt_messages(prompt)
    conv = messages[:-1] + [{"role": "user", "content": messages[-1]["content"] + " " + steps[0]}]
    conv.append({"role": "assistant", "content": "+"})
    for step in steps[1:]:
        conv += [{"role": "user", "content": step}, {"role": "assistant", "content": "+"}]
    return conv


def assistant_plus_tokens(tok, ids: list[int]) -> list[int]:
    """Indices of the "+" tokens that open an assistant turn ("<|assistant|>", "\\n", "+")."""
    header = tok.convert_tokens_to_ids("<|assistant|>")
    plus = tok.encode("+", add_special_tokens=False)[0]
    return [t for t in range(2, len(ids)) if ids[t] == plus and ids[t - 2] == header]


@torch.no_grad()
def judge(model, tok, ids: list[int], at: list[int]) -> list[float]:
    plus = tok.encode("+", add_special_tokens=False)[0]
    minus = tok.encode("-", add_special_tokens=False)[0]
    logits = model(torch.tensor([ids])).logits[0, at][:, [plus, minus]]
    return logits.softmax(-1)[:, 0].tolist()


def ref_next_token_one_pass(model, tok, prompt, completion) -> list[float]:
    steps = hand_split(response_text(completion))
    text = tok.apply_chat_template(rlhflow_conversation(prompt, steps), tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    at = assistant_plus_tokens(tok, ids)
    assert len(at) == len(steps)
    return judge(model, tok, ids, [t - 1 for t in at])


def ref_next_token_per_step(model, tok, prompt, completion) -> list[float]:
    """One forward pass per step: the conversation cut after that step's assistant "+"."""
    steps = hand_split(response_text(completion))
    conv = rlhflow_conversation(prompt, steps)
    first = len(conv) - 2 * len(steps) + 1
    scores = []
    for k in range(len(steps)):
        text = tok.apply_chat_template(conv[: first + 2 * k + 1], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        scores += judge(model, tok, ids, [assistant_plus_tokens(tok, ids)[-1] - 1])
    return scores


def ref_step_tag(model, tok, prompt, completion) -> list[float]:
    steps = hand_split(response_text(completion))
    question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    text = question + " " + "\n".join(f"{s} {TAG}" for s in steps)
    ids = tok(text)["input_ids"]
    tag_id = tok.convert_tokens_to_ids(TAG)
    return judge(model, tok, ids, [t for t, i in enumerate(ids) if i == tag_id])


# -- step scores against the references -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_separator_matches_reference(qwen_style, fmt):
    model, tok = qwen_style
    prompts, completions = (
        (TEXT_PROMPTS, TEXT_COMPLETIONS) if fmt == "standard" else (CONV_PROMPTS, CONV_COMPLETIONS)
    )
    prm = PRM(model, tok, kind="separator", aggregation="last")
    steps = prm.score_steps(prompts, completions)
    expected = [ref_separator(model, tok, p, c) for p, c in zip(prompts, completions, strict=True)]
    assert max_diff(steps, expected) <= TOL
    assert prm(prompts, completions) == pytest.approx([s[-1] for s in expected], abs=TOL)
    assert len({round(x, 6) for s in steps for x in s}) > 3  # the random head tells steps apart


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_next_token_one_pass_matches_reference_and_per_step(rlhflow_style, fmt):
    model, tok = rlhflow_style
    prompts, completions = (
        (TEXT_PROMPTS, TEXT_COMPLETIONS) if fmt == "standard" else (CONV_PROMPTS, CONV_COMPLETIONS)
    )
    prm = PRM(model, tok, kind="next_token", max_tokens_per_batch=64)
    steps = prm.score_steps(prompts, completions)
    one_pass = [ref_next_token_one_pass(model, tok, p, c) for p, c in zip(prompts, completions, strict=True)]
    per_step = [ref_next_token_per_step(model, tok, p, c) for p, c in zip(prompts, completions, strict=True)]
    assert max_diff(steps, one_pass) <= TOL
    assert max_diff(steps, per_step) <= TOL
    assert prm.engine.last_stats.sequences == len(prompts)  # one forward sequence per sample, not per step


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_step_tag_matches_reference(shepherd_style, fmt):
    model, tok = shepherd_style
    prompts = (
        TEXT_PROMPTS if fmt == "standard" else [[m for m in p if m["role"] == "user"] for p in CONV_PROMPTS]
    )
    completions = TEXT_COMPLETIONS if fmt == "standard" else CONV_COMPLETIONS
    prm = PRM(model, tok, kind="step_tag", step_token=TAG)
    steps = prm.score_steps(prompts, completions)
    expected = [ref_step_tag(model, tok, p, c) for p, c in zip(prompts, completions, strict=True)]
    assert max_diff(steps, expected) <= TOL


def test_full_logits_fallback_matches(rlhflow_style, monkeypatch):
    """Models whose head is not a plain linear layer are read from the full logits; same numbers."""
    from rh_trl.rewards import prm as prm_module

    model, tok = rlhflow_style
    fast = PRM(model, tok, kind="next_token").score_steps(TEXT_PROMPTS, TEXT_COMPLETIONS)
    monkeypatch.setattr(prm_module.PairLogitsModel, "supports", staticmethod(lambda m: False))
    slow = PRM(model, tok, kind="next_token")
    assert slow.engine.model is model
    assert max_diff(slow.score_steps(TEXT_PROMPTS, TEXT_COMPLETIONS), fast) <= TOL


# -- aggregation, splitting, logging ---------------------------------------------------------------------------


def test_aggregations_by_hand():
    s = [0.5, 0.25, 0.8]
    expected = {
        "min": 0.25,
        "last": 0.8,
        "mean": (0.5 + 0.25 + 0.8) / 3,
        "prod": 0.5 * 0.25 * 0.8,
        "geometric_mean": (0.5 * 0.25 * 0.8) ** (1 / 3),
    }
    assert sorted(AGGREGATIONS) == sorted(expected)
    for name, value in expected.items():
        assert AGGREGATIONS[name](s) == pytest.approx(value, abs=1e-12)
    assert AGGREGATIONS["geometric_mean"]([0.0, 0.5]) == 0.0


@pytest.mark.parametrize("aggregation", ["min", "last", "mean", "prod", "geometric_mean"])
def test_prm_aggregates_reference_steps(qwen_style, aggregation):
    model, tok = qwen_style
    rewards = PRM(model, tok, aggregation=aggregation)(TEXT_PROMPTS, TEXT_COMPLETIONS)
    for reward, p, c in zip(rewards, TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True):
        s = ref_separator(model, tok, p, c)
        by_hand = {
            "min": min(s),
            "last": s[-1],
            "mean": sum(s) / len(s),
            "prod": math.prod(s),
            "geometric_mean": math.prod(s) ** (1 / len(s)),
        }[aggregation]
        assert reward == pytest.approx(by_hand, abs=TOL)


def test_split_steps_edge_cases():
    assert split_steps("a\n\n\n\nb  \n\n  ") == ["a", "b"]
    assert split_steps("  one step, no separator  ") == ["one step, no separator"]
    assert split_steps("") == [] and split_steps("  \n\n \n\n") == []
    assert split_steps("Step 1 x Step 2 y", "Step") == ["1 x", "2 y"]
    with pytest.raises(ValueError, match="non-empty"):
        split_steps("a", "")


def test_custom_separator_and_marker_in_text(qwen_style):
    model, tok = qwen_style
    prm = PRM(model, tok, step_separator="\n")
    one = prm.score_steps(["q"], ["a\nb"])[0]
    two = prm.score_steps(["q"], ["a\n\nb"])[0]  # the blank line gives an empty step, dropped
    assert len(one) == 2 and max_diff([one], [two]) <= TOL
    # a separator token written by the policy cannot add a step
    assert prm.score_steps(["q"], [f"a{SEP}\nb"]) == prm.score_steps(["q"], ["a\nb"])


def test_empty_response_gets_none_and_is_counted(qwen_style):
    model, tok = qwen_style
    prm = PRM(model, tok, name="prm_empty")
    logged: dict[str, float] = {}
    extra: dict[str, list] = {}
    rewards = prm(
        ["q", "q", "q"],
        ["", "  \n\n  ", "fine.\n\nok."],
        log_metric=logged.__setitem__,
        log_extra=extra.__setitem__,
    )
    assert rewards[0] is None and rewards[1] is None and isinstance(rewards[2], float)
    assert logged["prm_empty/num_no_steps"] == 2 and logged["prm_empty/num_none"] == 2
    assert extra["prm_empty/steps"][:2] == [None, None] and len(extra["prm_empty/steps"][2]) == 2


def test_log_extra_gets_step_scores(rlhflow_style):
    model, tok = rlhflow_style
    prm = PRM(model, tok, kind="next_token", aggregation="mean")
    extra: dict[str, list] = {}
    rewards = prm(
        CONV_PROMPTS, CONV_COMPLETIONS, log_extra=extra.__setitem__, trainer_state=None, topic=["a", "b"]
    )
    steps = extra[f"{prm.__name__}/steps"]
    expected = [
        ref_next_token_one_pass(model, tok, p, c) for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    ]
    assert max_diff(steps, expected) <= TOL
    assert rewards == pytest.approx([sum(s) / len(s) for s in expected], abs=TOL)


def test_left_truncation_keeps_steps(qwen_style):
    model, tok = qwen_style
    long_prompt = "Tell a tiny story about a river and the sea. " * 20
    completion = "One step.\n\nTwo steps."
    full = PRM(model, tok).score_steps([long_prompt], [completion])
    prm = PRM(model, tok, max_length=40, name="prm_trunc")
    logged: dict[str, float] = {}
    rewards = prm([long_prompt, "q"], [completion, "x " * 60], log_metric=logged.__setitem__)
    assert logged["prm_trunc/num_truncated"] == 1 and logged["prm_trunc/num_too_long"] == 1
    assert rewards[1] is None  # its steps alone exceed max_length: no reward, never cut steps
    # the reference: the same rendering, the last 40 tokens (this tokenizer has no BOS)
    steps = hand_split(completion)
    messages = [
        {"role": "system", "content": QWEN_MATH_SYSTEM_PROMPT},
        {"role": "user", "content": long_prompt},
        {"role": "assistant", "content": SEP.join(steps) + SEP},
    ]
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"][-40:]
    sep_id = tok.convert_tokens_to_ids(SEP)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, [t for t, i in enumerate(ids) if i == sep_id]]
    expected = logits.softmax(-1)[:, 1].tolist()
    assert max_diff(prm.score_steps([long_prompt], [completion]), [expected]) <= TOL
    assert max_diff(full, [expected]) > 1e-4  # truncation did change the context


def test_malformed_sample_gets_none(rlhflow_style):
    model, tok = rlhflow_style
    prm = PRM(model, tok, kind="next_token")
    rewards = prm(TEXT_PROMPTS, [TEXT_COMPLETIONS[0], None])
    assert isinstance(rewards[0], float) and rewards[1] is None
    with pytest.raises(RewardInputError, match="2 prompts and 1 completions"):
        prm(TEXT_PROMPTS, TEXT_COMPLETIONS[:1])


# -- bad configuration -------------------------------------------------------------------------------------------


def test_missing_tokens_are_refused(rlhflow_style):
    from transformers import LlamaForTokenClassification

    plain = bpe_tokenizer("chatml", vocab_size=400)
    model = LlamaForTokenClassification(tiny_llama_config(plain, num_labels=2))
    with pytest.raises(ValueError, match="step separator token '<extra_0>'"):
        PRM(model, plain)
    lm, tok = rlhflow_style
    with pytest.raises(ValueError, match="step tag token 'ки'"):
        PRM(lm, tok, kind="step_tag")
    with pytest.raises(ValueError, match="good-step token 'GOOD STEP'"):
        PRM(lm, tok, kind="next_token", good_token="GOOD STEP")


def test_bad_options_are_refused(qwen_style, rlhflow_style):
    model, tok = qwen_style
    with pytest.raises(ValueError, match=r"unknown aggregation 'median'.*'geometric_mean', 'last', 'mean'"):
        PRM(model, tok, aggregation="median")
    with pytest.raises(ValueError, match="unknown PRM kind"):
        PRM(model, tok, kind="value")
    lm, ltok = rlhflow_style
    with pytest.raises(TypeError, match="loads the model by path or hub id, got a LlamaForCausalLM"):
        PRM(lm, ltok, kind="next_token", engine="vllm")  # vLLM loads its own weights
    with pytest.raises(ValueError, match="needs tokenizer= as the checkpoint's directory"):
        PRM("http://127.0.0.1:1", ltok, kind="next_token", engine="openai")
    with pytest.raises(
        ValueError, match=r"engine must be one of \['hf', 'vllm', 'openai'\].*did you mean 'vllm'"
    ):
        PRM(model, tok, engine="vlm")
    assert not isinstance(PRM(model, tok), torch.nn.Module)


# -- vLLM pooling: picking the step rows of a token-level pooling output (the engines: tests/vllm) ------------------


def test_rows_at_steps_reads_all_token_and_step_pooled_rows():
    ids = [5, 9, 7, 9, 3, 9]
    per_token = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    assert rows_at_steps(per_token, ids, [1, 3, 5], 9, "vLLM").tolist() == per_token[[1, 3, 5]].tolist()
    stepwise = per_token[[1, 3, 5]]
    assert rows_at_steps(stepwise, ids, [1, 3, 5], 9, "vLLM").tolist() == stepwise.tolist()
    with pytest.raises(ValueError, match="position 2 does not hold the step token id 9"):
        rows_at_steps(per_token, ids, [1, 2], 9, "vLLM")
    # a server that pools only at another token id (vLLM's default for Qwen2ForProcessRewardModel) returns no row
    with pytest.raises(ValueError, match=r"0 rows for 6 tokens and 3 steps.*tok_pooling_type.*ALL"):
        rows_at_steps(per_token[:0], ids, [1, 3, 5], 9, "vLLM")


def test_vllm_missing_names_the_extra(tmp_path, qwen_style):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed")
    except ImportError:
        pass
    model, tok = qwen_style
    model.save_pretrained(tmp_path)
    with pytest.raises(ImportError, match=r"rh_trl\[vllm\]"):
        PRM(str(tmp_path), tok, engine="vllm")


# -- a real trainer -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_two_steps_with_prm(tmp_path, rlhflow_style, llama_tok, policy):
    lm, tok = rlhflow_style
    prm = PRM(lm, tok, kind="next_token", name="step_prm")
    trainer = train_grpo(tmp_path, policy, llama_tok, [prm], dataset=prompt_dataset(8))
    logs = [h for h in trainer.state.log_history if "rewards/step_prm/mean" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["step_prm/num_none"] == h["step_prm/num_no_steps"]  # only empty completions lack a reward
        assert 0.0 <= h["step_prm/min"] <= h["step_prm/max"] <= 1.0
