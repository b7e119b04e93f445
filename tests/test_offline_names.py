"""The offline names (``rh_trl:tiny-rm``, ``rh_trl:tiny-policy``, ``rh_trl:tiny-lm-chatml``, ``rh_trl:minilm``) work in
every constructor that takes a model path, and give the models that ``rh_trl.testing`` builds."""

from __future__ import annotations

import pytest
import torch

import rh_trl
from rh_trl.formatting import to_sample
from rh_trl.models.loading import config_dict, load_tokenizer
from rh_trl.rewards.factory import build_reward
from rh_trl.testing import minilm_tokenizer, tiny_model

from .conftest import CONV_COMPLETIONS, CONV_PROMPTS, TEXT_COMPLETIONS, TEXT_PROMPTS


def test_orm_by_name_scores_the_tiny_reward_model():
    orm = rh_trl.ORM("rh_trl:tiny-rm")
    model, tokenizer = tiny_model("tiny-rm")
    expected = []
    with torch.no_grad():  # standard strings: prompt + completion + EOS, the tokenizer's own special tokens
        for prompt, completion in zip(TEXT_PROMPTS, TEXT_COMPLETIONS, strict=True):
            ids = tokenizer(prompt + completion + tokenizer.eos_token, return_tensors="pt")["input_ids"]
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert orm.score(TEXT_PROMPTS, TEXT_COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    assert orm.__name__.startswith("orm_rh_trl_tiny-rm")
    assert load_tokenizer(None, orm.model).get_vocab() == tokenizer.get_vocab()  # found from the model alone
    assert config_dict("rh_trl:tiny-rm") == model.config.to_dict() | {"_name_or_path": ""}


def test_drsow_and_specs_by_name_equal_the_built_models():
    strong, strong_tok = tiny_model("tiny-policy")
    weak, weak_tok = tiny_model("tiny-lm-chatml")
    expected = rh_trl.DrSow(strong, weak, strong_tokenizer=strong_tok, weak_tokenizer=weak_tok)
    by_name = rh_trl.DrSow("rh_trl:tiny-policy", "rh_trl:tiny-lm-chatml")
    from_spec = build_reward(
        {"type": "drsow", "strong": "rh_trl:tiny-policy", "weak": "rh_trl:tiny-lm-chatml"}
    )
    want = expected.score(CONV_PROMPTS, CONV_COMPLETIONS)
    assert by_name.score(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx(want, abs=1e-5)
    assert from_spec.score(CONV_PROMPTS, CONV_COMPLETIONS) == pytest.approx(want, abs=1e-5)
    assert by_name.__name__.startswith("drsow_rh_trl_tiny-policy_vs_rh_trl_tiny-lm-chatml")


def test_other_constructors_take_the_names():
    policy, tokenizer = tiny_model("tiny-policy")
    encoder = rh_trl.TextEncoder("rh_trl:tiny-policy")  # AutoModel: the causal LM's trunk
    reference = rh_trl.TextEncoder(policy.model, tokenizer)
    samples = [to_sample(p, c) for p, c in zip(CONV_PROMPTS, CONV_COMPLETIONS, strict=True)]
    vectors = torch.stack(encoder.embed(samples).vectors)
    assert torch.allclose(vectors, torch.stack(reference.embed(samples).vectors)) and vectors.shape[0] == 3
    assert type(rh_trl.PairwisePM("rh_trl:tiny-policy").model).__name__ == "LlamaForCausalLM"
    assert (
        type(rh_trl.GenRM("rh_trl:tiny-lm-chatml", template="reward").generator.model).__name__
        == "LlamaForCausalLM"
    )
    minilm = rh_trl.TextEncoder("rh_trl:minilm")
    assert (
        minilm.kind == "sentence"
        and minilm.tokenizer.get_vocab() == minilm_tokenizer(chat_template=False).get_vocab()
    )


def test_a_wrong_or_unknown_name_is_explained():
    with pytest.raises(
        rh_trl.ModelLoadError,
        match=r"'rh_trl:tiny-policy' is a LlamaForCausalLM, not what this reward loads \(AutoModelForSequenceClassification\).*rh_trl:tiny-rm \(sequence classification\)",
    ):
        rh_trl.ORM("rh_trl:tiny-policy")
    with pytest.raises(rh_trl.ModelLoadError, match=r"not what this reward loads \(CLoudModel\)"):
        rh_trl.CLoud("rh_trl:tiny-policy")
    with pytest.raises(
        rh_trl.ModelLoadError,
        match=r"unknown offline model 'rh_trl:tiny-pol' \(did you mean 'rh_trl:tiny-policy'\?\); known: \['rh_trl:minilm', ",
    ):
        rh_trl.DrSow("rh_trl:tiny-pol", "rh_trl:tiny-lm-chatml")
    strong, _ = tiny_model("tiny-policy")
    with pytest.raises(rh_trl.ModelLoadError, match=r"pass the tokenizer too.*strong_tokenizer="):
        rh_trl.DrSow(strong, strong)
