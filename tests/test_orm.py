"""ORM scores against an independent per-sample forward pass, output selection, stats and bad input."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

import rh_trl
from rh_trl import ORM, ORMAdapter, RewardInputError
from rh_trl.testing import tiny_reward_model

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS

TOL = 1e-5


@torch.no_grad()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """One unpadded forward pass of one sequence: the logits at its last token."""
    return model(torch.tensor([ids])).logits[0].float()


def chat_ids(tok, prompt, completion) -> list[int]:
    text = tok.apply_chat_template(prompt + completion, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def text_ids(tok, prompt, completion) -> list[int]:
    return tok(prompt + completion + (tok.eos_token or ""))["input_ids"]


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_conversational_matches_reference(rm_minilm, minilm_tok):
    orm = ORM(rm_minilm, minilm_tok)
    scores = orm(prompts=CONV_PROMPTS, completions=CONV_COMPLETIONS)
    expected = [
        reference_logits(rm_minilm, chat_ids(minilm_tok, p, c))[0].item()
        for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL
    assert len(set(scores)) == len(scores)  # the random head tells samples apart


def test_standard_matches_reference(rm_chatml, chatml_tok):
    orm = ORM(rm_chatml, chatml_tok, max_tokens_per_batch=32)
    scores = orm(TEXT_PROMPTS, TEXT_COMPLETIONS)
    expected = [
        reference_logits(rm_chatml, text_ids(chatml_tok, p, c))[0].item()
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL
    assert orm.engine.last_stats.batches > 1  # the small budget forced several micro-batches


def test_text_as_chat_renders_with_template(rm_chatml, chatml_tok):
    orm = ORM(rm_chatml, chatml_tok, text_as_chat=True)
    scores = orm(TEXT_PROMPTS, TEXT_COMPLETIONS)
    expected = [
        reference_logits(
            rm_chatml,
            chat_ids(chatml_tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": c}]),
        )[0].item()
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL


def test_reward_tokenizer_differs_from_policy(rm_minilm, minilm_tok, llama_tok):
    """The policy's completion_ids (another tokenizer) are ignored: the RM re-renders with its own template."""
    orm = ORM(rm_minilm, minilm_tok)
    policy_ids = [llama_tok(c[0]["content"], add_special_tokens=False)["input_ids"] for c in CONV_COMPLETIONS]
    scores = orm(
        CONV_PROMPTS, CONV_COMPLETIONS, completion_ids=policy_ids, trainer_state=None, answer=["x"] * 3
    )
    expected = [
        reference_logits(rm_minilm, chat_ids(minilm_tok, p, c))[0].item()
        for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL
    # the policy's own template would give other numbers: rendering really used the RM's
    wrong = [
        reference_logits(
            rm_minilm, minilm_tok(llama_tok.apply_chat_template(p + c, tokenize=False))["input_ids"]
        )[0].item()
        for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, wrong) > 1e-3


def test_left_truncation_matches_reference(rm_chatml, chatml_tok, caplog):
    long_prompt = "Tell a tiny story about a river and the sea. " * 30
    prompts = [long_prompt, TEXT_PROMPTS[2]]
    completions = [TEXT_COMPLETIONS[1], TEXT_COMPLETIONS[2]]
    limit = 32
    orm = ORM(rm_chatml, chatml_tok, max_length=limit)
    logged: dict[str, float] = {}
    with caplog.at_level(logging.INFO, logger="rh_trl"):
        scores = orm(prompts, completions, log_metric=logged.__setitem__)
    full = text_ids(chatml_tok, long_prompt, TEXT_COMPLETIONS[1])
    assert len(full) > limit
    expected = [
        reference_logits(rm_chatml, full[-limit:])[0].item(),  # no BOS in this tokenizer: the last 32 tokens
        reference_logits(rm_chatml, text_ids(chatml_tok, prompts[1], completions[1]))[0].item(),
    ]
    assert max_diff(scores, expected) <= TOL
    assert logged[f"{orm.__name__}/num_truncated"] == 1
    assert "lost prompt tokens" in caplog.text


def test_duplicates_scored_once(rm_minilm, minilm_tok):
    orm = ORM(rm_minilm, minilm_tok)
    prompts = [CONV_PROMPTS[0]] * 4 + [CONV_PROMPTS[1]] * 4
    completions = [CONV_COMPLETIONS[0], CONV_COMPLETIONS[0], CONV_COMPLETIONS[1], CONV_COMPLETIONS[0]]
    completions += [CONV_COMPLETIONS[1]] * 4
    scores = orm(prompts, completions)
    assert orm.engine.last_stats.sequences == 8 and orm.engine.last_stats.unique_sequences == 3
    expected = [
        reference_logits(rm_minilm, chat_ids(minilm_tok, p, c))[0].item()
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL


def test_score_equals_call_and_stats(rm_chatml, chatml_tok):
    orm = ORM(rm_chatml, chatml_tok, name="helpful")
    logged: dict[str, float] = {}
    called = orm(TEXT_PROMPTS, TEXT_COMPLETIONS, log_metric=logged.__setitem__)
    assert orm.score(TEXT_PROMPTS, TEXT_COMPLETIONS) == called
    assert orm.__name__ == "helpful"
    values = torch.tensor(called)
    assert logged["helpful/mean"] == pytest.approx(values.mean().item())
    assert logged["helpful/std"] == pytest.approx(values.std(unbiased=False).item(), abs=1e-6)
    assert logged["helpful/min"] == min(called) and logged["helpful/max"] == max(called)
    assert logged["helpful/num_none"] == 0 and logged["helpful/seconds"] > 0


def test_default_names_are_unique(rm_chatml, chatml_tok):
    a, b = ORM(rm_chatml, chatml_tok), ORM(rm_chatml, chatml_tok)
    assert a.__name__ != b.__name__ and a.__name__.startswith("orm")
    assert not isinstance(a, torch.nn.Module)  # TRL would route a module to its built-in path


# -- multi-output heads, transforms, normalization ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rm_multi(chatml_tok):
    return tiny_reward_model(chatml_tok, num_labels=3, seed=4)


def _multi_logits(model, tok):
    return [
        reference_logits(model, text_ids(tok, p, c))
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]


def test_multi_output_selection(rm_multi, chatml_tok):
    logits = _multi_logits(rm_multi, chatml_tok)
    by_index = ORM(rm_multi, chatml_tok, output_index=2).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    by_label = ORM(rm_multi, chatml_tok, output_index="objective_2").score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert max_diff(by_index, [x[2].item() for x in logits]) <= TOL and by_label == by_index
    weights = [0.5, -1.0, 2.0]
    weighted = ORM(rm_multi, chatml_tok, output_weights=weights).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert max_diff(weighted, [float(x @ torch.tensor(weights)) for x in logits]) <= TOL
    named = ORM(rm_multi, chatml_tok, output_weights={"objective_0": 1.0, "objective_1": 1.0})
    assert (
        max_diff(named.score(TEXT_PROMPTS, TEXT_COMPLETIONS), [(x[0] + x[1]).item() for x in logits]) <= TOL
    )


def test_softmax_and_sigmoid(rm_multi, rm_chatml, chatml_tok):
    probs = ORM(rm_multi, chatml_tok, transform="softmax", output_index=1).score(
        TEXT_PROMPTS, TEXT_COMPLETIONS
    )
    assert max_diff(probs, [x.softmax(-1)[1].item() for x in _multi_logits(rm_multi, chatml_tok)]) <= TOL
    raw = ORM(rm_chatml, chatml_tok).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    squashed = ORM(rm_chatml, chatml_tok, transform="sigmoid").score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert max_diff(squashed, [torch.sigmoid(torch.tensor(r)).item() for r in raw]) <= TOL


def test_config_normalization(chatml_tok):
    model = tiny_reward_model(chatml_tok, seed=5)
    raw = ORM(model, chatml_tok).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    model.config.reward_mean, model.config.reward_std = 0.25, 2.0
    normed = ORM(model, chatml_tok).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert max_diff(normed, [(r - 0.25) / 2.0 for r in raw]) <= TOL
    assert ORM(model, chatml_tok, normalize=False).score(TEXT_PROMPTS, TEXT_COMPLETIONS) == raw
    model.config.reward_std = 0.0
    with pytest.raises(ValueError, match="reward_std=0.0"):
        ORM(model, chatml_tok)


# -- adapters for custom-code reward models -----------------------------------------------------------------------


class GatedRM(torch.nn.Module):
    """Stand-in for a custom-code RM: returns ``score`` and ``rewards`` instead of ``logits``."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.config = base.config
        self.name_or_path = "gated-rm"

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = self.base(input_ids=input_ids, attention_mask=attention_mask).logits
        return SimpleNamespace(score=logits[:, :1] * 10.0, rewards=logits)


def test_adapter_reads_custom_outputs(rm_multi, chatml_tok):
    gated = GatedRM(rm_multi)
    logits = _multi_logits(rm_multi, chatml_tok)
    score = ORM(gated, chatml_tok, adapter="armorm").score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    assert max_diff(score, [10.0 * x[0].item() for x in logits]) <= 1e-4
    objective = ORM(gated, chatml_tok, adapter="armorm-objectives", output_index=1).score(
        TEXT_PROMPTS, TEXT_COMPLETIONS
    )
    assert max_diff(objective, [x[1].item() for x in logits]) <= TOL


def test_adapter_suffix_token(rm_chatml, chatml_tok):
    token = chatml_tok.convert_tokens_to_ids("<|im_start|>")
    adapter = ORMAdapter(name="suffixed", suffix=lambda model, tok: [token])
    scores = ORM(rm_chatml, chatml_tok, adapter=adapter).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    expected = [
        reference_logits(rm_chatml, text_ids(chatml_tok, p, c) + [token])[0].item()
        for p, c in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True)
    ]
    assert max_diff(scores, expected) <= TOL


def test_adapter_registry_by_architecture():
    from rh_trl.rewards.adapters import adapter_for, get_orm_adapter

    assert adapter_for({"architectures": ["InternLM2ForRewardModel"]}).name == "internlm2-reward"
    assert (
        adapter_for({"architectures": ["LlamaForSequenceClassification"]}).name == "sequence-classification"
    )
    with pytest.raises(ValueError, match="known adapters"):
        get_orm_adapter("nope")


# -- bad input ----------------------------------------------------------------------------------------------------


def test_multi_output_without_choice_is_explained(rm_multi, chatml_tok):
    with pytest.raises(ValueError, match=r"3 outputs .*objective_0.*output_index=.*output_weights="):
        ORM(rm_multi, chatml_tok)
    with pytest.raises(ValueError, match="not a label"):
        ORM(rm_multi, chatml_tok, output_index="helpfulness")
    with pytest.raises(ValueError, match="3 outputs"):
        ORM(rm_multi, chatml_tok, output_weights=[1.0, 2.0])


def test_length_mismatch_is_explained(rm_chatml, chatml_tok):
    orm = ORM(rm_chatml, chatml_tok)
    with pytest.raises(RewardInputError, match="2 prompts and 3 completions.*one prompt per completion"):
        orm(TEXT_PROMPTS[:2], TEXT_COMPLETIONS)


def test_empty_completion_is_scored(rm_chatml, chatml_tok, rm_minilm, minilm_tok):
    scores = ORM(rm_chatml, chatml_tok).score(["The night sky is"], [""])
    assert scores[0] == pytest.approx(
        reference_logits(rm_chatml, text_ids(chatml_tok, "The night sky is", ""))[0].item(), abs=TOL
    )
    empty = [[{"role": "assistant", "content": ""}]]
    conv = ORM(rm_minilm, minilm_tok).score(CONV_PROMPTS[:1], empty)
    assert conv[0] == pytest.approx(
        reference_logits(rm_minilm, chat_ids(minilm_tok, CONV_PROMPTS[0], empty[0]))[0].item(), abs=TOL
    )


def test_malformed_sample_gets_none_and_is_counted(rm_minilm, minilm_tok):
    orm = ORM(rm_minilm, minilm_tok)
    logged: dict[str, float] = {}
    completions = [CONV_COMPLETIONS[0], None, [{"text": "no role"}]]
    scores = orm(CONV_PROMPTS, completions, log_metric=logged.__setitem__)
    assert scores[1] is None and scores[2] is None and isinstance(scores[0], float)
    assert logged[f"{orm.__name__}/num_none"] == 2 and logged[f"{orm.__name__}/num_invalid"] == 2
    with pytest.raises(RewardInputError, match="sample 1: completion is None"):
        ORM(rm_minilm, minilm_tok, strict=True)(CONV_PROMPTS, completions)


def test_bad_options_are_explained(rm_chatml, chatml_tok):
    with pytest.raises(ValueError, match="transform must be"):
        ORM(rm_chatml, chatml_tok, transform="tanh")
    with pytest.raises(ValueError, match="not both"):
        ORM(rm_chatml, chatml_tok, output_index=0, output_weights=[1.0])
    with pytest.raises(TypeError, match="expected a model path"):
        ORM(42, chatml_tok)


def test_exports():
    assert rh_trl.ORM is ORM and rh_trl.__version__
