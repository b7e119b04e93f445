"""CLoud: the score equals the head on [prompt, response, critique] computed here; save/load; server critiques; GRPO."""

from __future__ import annotations

import pytest
import torch

from rh_trl.engines.http import RetryPolicy
from rh_trl.rewards.cloud import CLOUD_PREAMBLE, CLoud, CLoudModel
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm

from .chat_server import ServerThread, free_port, make_app
from .trainer_runs import prompt_dataset, train_grpo

TOL = 1e-5
PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the moon."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe trains in a few words."},
    ],
    [{"role": "user", "content": "Name three things related to coffee."}],
]
COMPLETIONS = ["The moon is bright tonight.", "Fast, loud, and long.", "Beans, cups and mornings."]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer("chatml", vocab_size=400)


@pytest.fixture(scope="module")
def cloud_model(tok):
    model = CLoudModel.from_causal_lm(tiny_causal_lm(tok, seed=7)).eval()
    with torch.no_grad():
        model.reward_head.out_proj.weight.normal_(0.0, 1.0)  # spread the scores
    return model


@torch.no_grad()
def expected_score(model, tok, prompt, completion, critique: str) -> float:
    """ChatML by hand: the conversation, an open user turn with the preamble, the critique, <|im_end|>."""
    text = ""
    for m in [*prompt, {"role": "assistant", "content": completion}]:
        text += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    text += "<|im_start|>user\n" + CLOUD_PREAMBLE + critique + "<|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    hidden = model.lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    head = model.reward_head
    return float(head.out_proj(torch.tanh(head.dense(hidden)))[0])


@torch.no_grad()
def expected_critique(model, tok, prompt, completion, max_new_tokens: int) -> str:
    text = ""
    for m in [*prompt, {"role": "assistant", "content": completion}]:
        text += "<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n"
    text += "<|im_start|>user\n" + CLOUD_PREAMBLE
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.lm.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>")],
    )[0, len(ids) :].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if end in out:
        out = out[: out.index(end)]
    return tok.decode(out, skip_special_tokens=True).strip()


def test_scores_match_head_on_critique(cloud_model, tok):
    rm = CLoud(cloud_model, tok, max_new_tokens=6, batch_size=2, device="cpu", name="cloud_t")
    extra = {}
    rewards = rm(PROMPTS, COMPLETIONS, log_extra=lambda k, v: extra.__setitem__(k, v))
    critiques = extra["cloud_t/critique"]
    for p, c, crit, r in zip(PROMPTS, COMPLETIONS, critiques, rewards, strict=True):
        assert crit == expected_critique(cloud_model, tok, p, c, 6)
        assert abs(r - expected_score(cloud_model, tok, p, c, crit)) <= TOL
    assert len(set(rewards)) == 3
    assert rm.last_stats["num_none"] == 0 and rm.last_stats["num_critique_failed"] == 0
    # standard strings are a user turn and an assistant turn
    text_rewards = rm(["Write one sentence about the moon."], [COMPLETIONS[0]])
    assert abs(text_rewards[0] - rewards[0]) <= TOL


def test_save_load_round_trip(tmp_path, cloud_model, tok):
    cloud_model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = CLoud(str(tmp_path / "rm"), max_new_tokens=6, device="cpu", dtype="float32")
    original = CLoud(cloud_model, tok, max_new_tokens=6, device="cpu")
    a, b = original(PROMPTS, COMPLETIONS), loaded(PROMPTS, COMPLETIONS)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL
    from transformers import AutoModel

    assert isinstance(AutoModel.from_pretrained(tmp_path / "rm"), CLoudModel)


def test_from_causal_lm_keeps_lm_weights(tok):
    lm = tiny_causal_lm(tok, seed=8)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    after = CLoudModel.from_causal_lm(lm).lm.state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) == 0.0


def test_not_a_cloud_model(tok):
    with pytest.raises(TypeError, match="CLoudModel.from_causal_lm"):
        CLoud(tiny_causal_lm(tok), tok)


def test_server_critiques_and_failure(cloud_model, tok):
    app = make_app("cloud-lm", [("moon", "It is accurate."), ("coffee", "Too short.")], default="Fine.")
    with ServerThread(app) as url:
        rm = CLoud(url, tok, engine="openai", checkpoint=cloud_model, served_model="cloud-lm", device="cpu")
        rewards = rm(PROMPTS, COMPLETIONS)
        sent = app.state.requests[-1]
        assert (
            sent.model_extra["continue_final_message"] is True and sent.messages[-1].content == CLOUD_PREAMBLE
        )
    for p, c, crit, r in zip(
        PROMPTS, COMPLETIONS, ["It is accurate.", "Fine.", "Too short."], rewards, strict=True
    ):
        assert abs(r - expected_score(cloud_model, tok, p, c, crit)) <= TOL
    with pytest.warns(
        DeprecationWarning, match=r"CLoud\(model, critique_url=URL, critique_model=NAME\) is deprec"
    ):
        down = CLoud(  # the former spelling still works
            cloud_model,
            tok,
            critique_url=f"http://127.0.0.1:{free_port()}",
            critique_model="cloud-lm",
            device="cpu",
            retry=RetryPolicy(attempts=2, initial=0.01, max=0.02, timeout=2.0),
        )
    assert down(PROMPTS, COMPLETIONS) == [None, None, None]
    assert down.last_stats["num_critique_failed"] == 3


@pytest.mark.slow
def test_grpo_two_steps(tmp_path, cloud_model, tok):
    policy_tok = bpe_tokenizer("llama")
    rm = CLoud(cloud_model, tok, max_new_tokens=4, device="cpu", name="cloud_grpo")
    policy = tiny_causal_lm(policy_tok, seed=5)
    trainer = train_grpo(
        tmp_path, policy, policy_tok, [rm], dataset=prompt_dataset(8), max_completion_length=6
    )
    logs = [h for h in trainer.state.log_history if "rewards/cloud_grpo/mean" in h]
    assert len(logs) == 2
    assert all(h["cloud_grpo/num_none"] == 0 for h in logs)
