"""PairwisePM against probabilities computed here from the model's full logits: group win rates, online DPO's
pairs (with a real OnlineDPOTrainer run), GRPO, and RLHFlow's published inference code token for token."""

from __future__ import annotations

import math

import pytest
import torch

from rh_trl.callbacks import WithStatistics
from rh_trl.formatting import RewardInputError
from rh_trl.rewards.pairwise import PairwisePM
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm

from .rlhflow_card import card_ids, llama3_tokenizer
from .trainer_runs import COMMON, prompt_dataset, train_grpo

TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer("llama")


@pytest.fixture(scope="module")
def lm(tok):
    model = tiny_causal_lm(tok, seed=11).eval()
    with torch.no_grad():  # a random LM is nearly indifferent between A and B: widen its head
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def context_text(messages) -> str:
    out = "\n"
    for m in messages:
        out += "\n\n<turn> " + m["role"] + "\n " + m["content"]
    return out + "\n\n\n"


@torch.no_grad()
def p_first(lm, tok, messages, a: str, b: str) -> float:
    """P("A") vs P("B") at the last position of one unpadded forward pass, in one order."""
    content = "[CONTEXT] " + context_text(messages) + " [RESPONSE A] " + a + " [RESPONSE B] " + b + " \n"
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<s>")
    ids = tok(text[len("<s>") :], add_special_tokens=False)["input_ids"]
    logits = lm(torch.tensor([ids])).logits[0, -1]
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    return math.exp(logits[a_id]) / (math.exp(logits[a_id]) + math.exp(logits[b_id]))


def p_both(lm, tok, messages, a, b) -> float:
    return (p_first(lm, tok, messages, a, b) + 1 - p_first(lm, tok, messages, b, a)) / 2


PROMPT = [{"role": "user", "content": "Name three things related to coffee."}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Describe trains."},
    {"role": "assistant", "content": "Fast."},
    {"role": "user", "content": "And the moon?"},
]
GROUP = ["Beans, cups and mornings.", "I don't know.", "Coffee is a drink made from beans.", "No."]


def test_compare_matches_logits_and_swaps(lm, tok):
    pm = PairwisePM(lm, tok, max_tokens_per_batch=64)
    for messages, a, b in [(PROMPT, GROUP[0], GROUP[1]), (MULTI, "Bright at night.", "A moon.")]:
        p = pm.compare(messages, a, b)
        assert abs(p - p_both(lm, tok, messages, a, b)) <= TOL
        assert abs(pm.compare(messages, b, a) - (1 - p)) <= 1e-12
        assert 0 < p < 1 and abs(p - 0.5) > 1e-4  # content matters beyond float32 noise
    # a string prompt is one user turn
    assert (
        abs(
            pm.compare("Name three things related to coffee.", GROUP[0], GROUP[2])
            - p_both(lm, tok, PROMPT, GROUP[0], GROUP[2])
        )
        <= TOL
    )
    assert pm.engine.last_stats.batches > 1  # the small budget forced several micro-batches


def test_group_win_rate_by_hand(lm, tok):
    pm = PairwisePM(lm, tok)
    completions = [[{"role": "assistant", "content": c}] for c in GROUP]
    metrics = {}
    rewards = pm([PROMPT] * 4, completions, log_metric=lambda k, v: metrics.__setitem__(k, v))
    expected = []
    for i in range(4):
        wins = [p_both(lm, tok, PROMPT, GROUP[i], GROUP[j]) for j in range(4) if j != i]
        expected.append(sum(wins) / 3)
    assert max(abs(r - e) for r, e in zip(rewards, expected, strict=True)) <= TOL
    assert (
        abs(sum(rewards) - 2.0) <= 1e-9
    )  # win rates in a round robin sum to (n - 1) / 2 * n / (n - 1) = n / 2
    assert metrics[f"{pm.__name__}/num_comparisons"] == 12


def test_groups_inferred_explicit_and_reference(lm, tok):
    pm = PairwisePM(lm, tok)
    other = [{"role": "user", "content": "Describe trains."}]
    prompts = [PROMPT, PROMPT, other, other]
    comps = [GROUP[0], GROUP[1], "Loud.", "Long and fast."]
    inferred = pm(prompts, comps)
    assert abs(inferred[0] - p_both(lm, tok, PROMPT, GROUP[0], GROUP[1])) <= TOL
    assert abs(inferred[2] - p_both(lm, tok, other, "Loud.", "Long and fast.")) <= TOL
    explicit = PairwisePM(lm, tok, group_size=2)(prompts, comps)
    assert max(abs(x - y) for x, y in zip(inferred, explicit, strict=True)) <= 1e-12

    with pytest.raises(RewardInputError, match="group_size=3 does not divide the batch of 4"):
        PairwisePM(lm, tok, group_size=3)(prompts, comps)
    with pytest.raises(RewardInputError, match="mix different prompts"):
        PairwisePM(lm, tok, group_size=4)(prompts, comps)

    refs = ["Beans.", "Cups.", "Rails.", "Steam."]
    against_ref = pm(prompts, comps, reference=refs)
    expected = [
        p_both(lm, tok, p, c, r) for p, c, r in zip([PROMPT, PROMPT, other, other], comps, refs, strict=True)
    ]
    assert max(abs(x - y) for x, y in zip(against_ref, expected, strict=True)) <= TOL


def test_online_dpo_layout_compares_each_completion_with_its_own_prompts_other(lm, tok):
    """OnlineDPOTrainer scores [p1..pn, p1..pn]: prompt i's completions sit at i and i + n."""
    other = [{"role": "user", "content": "Describe trains."}]
    third = "Say something about the sea."
    prompts = [PROMPT, other, third] * 2
    comps = [GROUP[0], "Loud.", "Blue.", GROUP[2], "Long and fast.", "Wet and wide."]
    pm = PairwisePM(lm, tok)
    rewards = pm(prompts, comps)
    for i in range(3):
        want = p_both(
            lm, tok, [{"role": "user", "content": third}] if i == 2 else prompts[i], comps[i], comps[i + 3]
        )
        assert abs(rewards[i] - want) <= TOL
        assert abs(rewards[i] + rewards[i + 3] - 1.0) <= 1e-12  # the pair's two win probabilities
    assert pm.last_stats["num_no_opponent"] == 0 and pm.last_stats["num_comparisons"] == 6
    with pytest.raises(RewardInputError, match="online DPO scores"):  # the positional override says why
        PairwisePM(lm, tok, group_size=2)(prompts, comps)


def test_lone_completion_gets_none_counted(lm, tok):
    pm = PairwisePM(lm, tok)
    rewards = pm([PROMPT, [{"role": "user", "content": "Other."}]], ["a", "b"])
    assert rewards == [None, None]
    assert pm.last_stats["num_no_opponent"] == 2


def test_tokenizer_without_single_token_letters(lm):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "x": 1, "y": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    bad = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", chat_template="{{ messages }}")
    bad.encode = lambda text, add_special_tokens=False: [0, 0] if text in ("A", "B") else [1]  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="'A' and 'B' to be single tokens"):
        PairwisePM(lm, bad)


def test_grpo_two_steps(tmp_path, tok, lm):
    pm = PairwisePM(lm, tok, name="pairpm_test")
    policy = tiny_causal_lm(tok, seed=5)
    trainer = train_grpo(tmp_path, policy, tok, [pm], dataset=prompt_dataset(8), max_completion_length=6)
    logs = [h for h in trainer.state.log_history if "rewards/pairpm_test/mean" in h]
    assert len(logs) == 2
    for h in logs:
        # a round robin's win rates average exactly 1/2 when every comparison is scored
        assert abs(h["rewards/pairpm_test/mean"] - 0.5) <= 1e-5
        assert h["pairpm_test/num_none"] == 0


# -- a real online DPO run -------------------------------------------------------------------------------------


class Recorder:
    """Passes a reward call through and keeps what went in and came out (OnlineDPO passes no log_metric)."""

    def __init__(self, reward):
        self.reward = reward
        self.__name__ = reward.__name__
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        values = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.calls.append((list(prompts), list(completions), list(values), dict(self.reward.last_stats)))
        return values


def per_prompt_zero_spread(prompts, values) -> float:
    by_prompt: dict[str, list[float]] = {}
    for p, v in zip(prompts, values, strict=True):
        by_prompt.setdefault(repr(p), []).append(v)
    return sum(max(vs) - min(vs) <= 1e-9 for vs in by_prompt.values()) / len(by_prompt)


def test_online_dpo_run_rewards_are_win_probabilities_within_each_prompt(tmp_path, tok, lm):
    pytest.importorskip("trl.experimental.online_dpo")
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    dataset = prompt_dataset(4)
    texts = [row["prompt"][0]["content"] for row in dataset]
    flat = {texts[0]: 1.0, texts[1]: 2.0}  # two prompts get one reward whatever the completion

    def prompt_reward(prompts, completions, completion_ids, **kwargs):
        return [
            flat.get(p[0]["content"], float(sum(ids))) for p, ids in zip(prompts, completion_ids, strict=True)
        ]

    pm = Recorder(WithStatistics(PairwisePM(lm, tok, name="pairpm_dpo")))
    mixed = Recorder(WithStatistics(prompt_reward))
    settings = {k: v for k, v in COMMON.items() if k != "max_completion_length"}  # online DPO: max_new_tokens
    args = OnlineDPOConfig(output_dir=str(tmp_path), max_steps=2, max_new_tokens=6, **settings)
    trainer = OnlineDPOTrainer(
        model=tiny_causal_lm(tok, seed=5),
        reward_funcs=[pm, mixed],
        args=args,
        train_dataset=dataset,
        processing_class=tok,
    )
    trainer.train()

    assert len(pm.calls) == 2 and len(mixed.calls) == 2
    for prompts, completions, rewards, stats in pm.calls:
        n = len(prompts) // 2
        assert n == 4 and prompts[:n] == prompts[n:]  # 4 prompts in one call, laid out [p1..p4, p1..p4]
        for i in range(n):
            a, b = completions[i][0]["content"], completions[i + n][0]["content"]
            assert abs(rewards[i] - p_both(lm, tok, prompts[i], a, b)) <= TOL
            assert abs(rewards[i + n] - p_both(lm, tok, prompts[i], b, a)) <= TOL
        assert stats["frac_zero_spread_groups"] == per_prompt_zero_spread(prompts, rewards)
    for prompts, _, rewards, stats in mixed.calls:
        assert per_prompt_zero_spread(prompts, rewards) == 0.5  # prompts 0 and 1 flat, 2 and 3 not
        assert stats["frac_zero_spread_groups"] == 0.5


# -- RLHFlow's published inference code, token for token -------------------------------------------------------

CARD_CONTEXTS = [
    [{"role": "user", "content": "Describe trains."}],
    [
        {"role": "user", "content": "Describe trains."},
        {"role": "assistant", "content": "Fast."},
        {"role": "user", "content": "And the moon?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe trains."},
        {"role": "assistant", "content": "Fast.\n\nAnd loud."},
        {"role": "user", "content": "  And the moon? "},
    ],
]


@pytest.fixture(scope="module")
def llama3_tok():
    return llama3_tokenizer()


@torch.no_grad()
def card_p_both(lm, tok, instruction, a: str, b: str) -> float:
    """The card's probability that ``a`` is better: both orders, softmax over the A/B logits at the end."""
    a_id, b_id = tok.encode("A", add_special_tokens=False)[0], tok.encode("B", add_special_tokens=False)[0]
    probs = []
    for first, second in ((a, b), (b, a)):
        logits = lm(torch.tensor([card_ids(tok, instruction, first, second)])).logits[0, -1]
        probs.append(math.exp(logits[a_id]) / (math.exp(logits[a_id]) + math.exp(logits[b_id])))
    return (probs[0] + 1 - probs[1]) / 2


def test_rlhflow_layout_reproduces_the_card_token_for_token(llama3_tok):
    lm = tiny_causal_lm(llama3_tok, seed=12).eval()
    with torch.no_grad():
        lm.lm_head.weight.normal_(0.0, 0.5)
    card_pm = PairwisePM(lm, llama3_tok, layout="rlhflow")
    own_pm = PairwisePM(lm, llama3_tok)
    for context in CARD_CONTEXTS:
        for a, b in (("Bright at night.", "A moon."), ("No.", "It <|begin_of_text|>orbits.")):
            want = card_ids(llama3_tok, context, a, b)
            assert card_pm.encode(context, a, b) == want
            assert own_pm.encode(context, a, b) != want  # rh_trl's own layout is another one
        p = card_pm.compare(context, "Bright at night.", "A moon.")
        assert abs(p - card_p_both(lm, llama3_tok, context, "Bright at night.", "A moon.")) <= TOL
    # a string prompt is the card's single user turn
    assert card_pm.encode("Describe trains.", "x", "y") == card_ids(llama3_tok, CARD_CONTEXTS[0], "x", "y")
    with pytest.raises(
        ValueError, match=r"unknown pairwise layout 'card'; expected one of \['rh_trl', 'rlhflow'\]"
    ):
        PairwisePM(lm, llama3_tok, layout="card")
