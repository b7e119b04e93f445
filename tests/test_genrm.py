"""GenRM: verdict parsing, a real HTTP round trip to a scripted chat server, the local engine, GRPO."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from rh_trl.engines.generation import Generation, HFGenerator
from rh_trl.engines.http import ModelNotServedError, RetryPolicy
from rh_trl.formatting import RewardInputError
from rh_trl.rewards.genrm import GenRM
from rh_trl.rewards.genrm_templates import (
    NUMBER_PARSER,
    REWARD_PARSER,
    JudgeTemplate,
    VerdictParser,
    builtin_template,
    rating_parser,
)
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm

from .chat_server import ServerThread, free_port, make_app
from .trainer_runs import prompt_dataset, train_grpo

FAST_RETRY = RetryPolicy(attempts=2, initial=0.01, max=0.02, timeout=5.0)

REWARD_CASES = [
    ("The answer is correct and complete.\nReward: 0.8", 0.8),
    ("Reward: **0.25**", 0.25),
    ("The format is 'Reward: x'. Weighing everything...\nReward: 1", 1.0),  # the last match wins
    ("reward = 0.5", 0.5),
    ("Reward: 0", 0.0),
    ("Reward: .75.", 0.75),
    ("Reward: 1.5", None),  # off the scale
    ("Reward: -0.2", None),
    ("I think it deserves a high score.", None),  # no verdict
    ("Reward:", None),
    ("", None),
    (None, None),
]
RATING_CASES = [
    ("The response is helpful but shallow.\n\nRating: [[7]]", 0.7),
    ("Rating: [[8.5]]", 0.85),
    ("Use 'Rating: [[5]]'. My verdict: [[9]]", 0.9),
    ("Rating: 6", 0.6),
    ("Rating: [[10]]", 1.0),
    ("Rating: [[11]]", None),
    ("Rating: [[seven]]", None),
    ("It is ok. 7/10 maybe", None),
]


@pytest.mark.parametrize(("text", "expected"), REWARD_CASES)
def test_reward_parser(text, expected):
    value = REWARD_PARSER.parse(text)
    assert value == pytest.approx(expected) if expected is not None else value is None


@pytest.mark.parametrize(("text", "expected"), RATING_CASES)
def test_rating_parser(text, expected):
    value = rating_parser(normalize=True).parse(text)
    assert value == pytest.approx(expected) if expected is not None else value is None


def test_other_parsers():
    assert rating_parser(normalize=False).parse("Rating: [[7]]") == 7.0
    assert NUMBER_PARSER.parse("Score 3, no wait, 8.5") == 8.5
    assert NUMBER_PARSER.parse("nothing here") is None
    verdict = VerdictParser()
    assert verdict.parse("A is longer, but [[B]]") == 0.0
    assert verdict.parse("Format: [[A]] or [[B]]. Final: [[A]]") == 1.0
    assert verdict.parse("[[C]]") == 0.5
    assert verdict.parse("Both are fine.") is None


def test_template_errors():
    with pytest.raises(ValueError, match="unknown judge template 'nope'"):
        builtin_template("nope")
    with pytest.raises(ValueError, match=r"never shows \['response'\]"):
        GenRM(engine=object(), template=JudgeTemplate("Q: {question}", REWARD_PARSER))


class ScriptedJudge:
    """A generator with known answers, chosen by the content of the last message."""

    def __init__(self, answer):
        self.answer = answer
        self.seen = []

    def generate_chat(self, conversations):
        self.seen.extend(conversations)
        return [self.answer(c[-1]["content"]) for c in conversations]


PROMPTS = [
    [{"role": "user", "content": "Write one sentence about the moon."}],
    [{"role": "user", "content": "Name three things related to coffee."}],
    [{"role": "user", "content": "Describe trains in a few words."}],
]
COMPLETIONS = ["The moon is bright.", "Beans, cups.", "Fast."]


def moon_coffee_trains(content: str) -> str:
    if "moon" in content:
        return "Vivid and correct.\nReward: 0.8"
    if "coffee" in content:
        return "Reward: 1.5"  # off the scale
    return "A fine answer overall."  # no verdict


def test_scripted_generator_unparsed_and_log_extra(caplog):
    judge = ScriptedJudge(moon_coffee_trains)
    rm = GenRM(engine=judge, template="reward", name="judge_scripted")
    extra, metrics = {}, {}
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        rewards = rm(
            PROMPTS,
            COMPLETIONS,
            log_extra=lambda k, v: extra.__setitem__(k, v),
            log_metric=lambda k, v: metrics.__setitem__(k, v),
        )
    assert rewards == [pytest.approx(0.8), None, None]
    assert metrics["judge_scripted/num_unparsed"] == 2
    assert metrics["judge_scripted/num_none"] == 2
    assert extra["judge_scripted/judgement"][0].startswith("Vivid")
    assert "no readable verdict" in caplog.text
    system, user = judge.seen[0]
    assert system["role"] == "system" and "Reward: x" in system["content"]
    assert (
        user["content"] == "Question:\nWrite one sentence about the moon.\n\nResponse:\nThe moon is bright."
    )


def test_reference_column_template_and_missing_column():
    judge = ScriptedJudge(lambda c: "Reward: 0.5")
    rm = GenRM(engine=judge, template="rating_reference")
    with pytest.raises(RewardInputError, match=r"no column 'reference'; available columns: \['answer'\]"):
        rm(PROMPTS, COMPLETIONS, answer=["a", "b", "c"])
    custom = JudgeTemplate("Q: {question}\nGold: {answer}\nA: {response}\nScore 0-10.", NUMBER_PARSER)
    judge = ScriptedJudge(lambda c: "7" if "Gold: 42" in c else "2")
    rm = GenRM(engine=judge, template=custom)
    assert rm(PROMPTS[:2], COMPLETIONS[:2], answer=["42", "x"]) == [7.0, 2.0]
    assert (
        judge.seen[0][-1]["content"]
        == "Q: Write one sentence about the moon.\nGold: 42\nA: The moon is bright.\nScore 0-10."
    )


def pairwise_answer(content: str) -> str:
    """A judge that prefers the response containing 'good', whatever its position."""
    a = re.search(r"\[The Start of Response A\]\n(.*?)\n\[The End", content, re.S).group(1)
    b = re.search(r"\[The Start of Response B\]\n(.*?)\n\[The End", content, re.S).group(1)
    if "good" in a and "good" not in b:
        return "A is better. [[A]]"
    if "good" in b and "good" not in a:
        return "B is better. [[B]]"
    return "[[C]]"


def test_pairwise_both_orders_cancel_position_bias():
    prompts = [PROMPTS[0]] * 3
    comps = ["a good one", "bad", "also bad"]
    biased = ScriptedJudge(lambda c: "[[A]]")  # always picks the first position
    rm = GenRM(engine=biased, template="pairwise")
    assert rm(prompts, comps) == [0.5, 0.5, 0.5]
    assert len(biased.seen) == 6  # 3 pairs, both orders
    fair = GenRM(engine=ScriptedJudge(pairwise_answer), template="pairwise")
    # win rates: good beats both; the two bad ones tie with each other and lose to good
    assert fair(prompts, comps) == [1.0, 0.25, 0.25]
    assert fair(prompts, comps, reference=["good ref"] * 3) == [0.5, 0.0, 0.0]


@pytest.fixture(scope="module")
def server_url():
    rules = [
        ("moon", "Vivid and correct.\nReward: 0.8"),
        ("coffee", "Rating looks fine. Reward: 0.3"),
        ("trains", "I refuse to give a number."),
    ]
    app = make_app("judge-7b", rules)
    with ServerThread(app) as url:
        url_state = (url, app)
        yield url_state


def test_server_round_trip(server_url):
    url, app = server_url
    rm = GenRM(url + "/v1", engine="openai", served_model="judge-7b", max_new_tokens=64, retry=FAST_RETRY)
    start = len(app.state.requests)
    rewards = rm(PROMPTS, COMPLETIONS)
    assert rewards == [pytest.approx(0.8), pytest.approx(0.3), None]
    assert rm.last_stats["num_unparsed"] == 1 and rm.last_stats["num_server_failed"] == 0
    sent = app.state.requests[start:]
    assert len(sent) == 3 and {r.model for r in sent} == {"judge-7b"}
    assert all(r.max_tokens == 64 and r.temperature == 0.0 and r.messages[0].role == "system" for r in sent)
    # the synchronous API gives the same numbers, also twice in a row (a fresh event loop each time)
    assert rm.score(PROMPTS, COMPLETIONS) == rewards


def test_former_spellings_warn_and_do_the_same(server_url):
    url, _ = server_url
    with pytest.warns(
        DeprecationWarning, match=r"GenRM\(model, base_url=URL\) is deprecated; write GenRM\(URL"
    ):
        old = GenRM("judge-7b", base_url=url, retry=FAST_RETRY, name="old_spelling")
    assert old(PROMPTS, COMPLETIONS) == [pytest.approx(0.8), pytest.approx(0.3), None]
    assert old.__name__ == "old_spelling" and old.client.model == "judge-7b"
    judge = ScriptedJudge(moon_coffee_trains)
    with pytest.warns(
        DeprecationWarning, match=r"GenRM\(generator=…\) is deprecated; write GenRM\(engine=…\)"
    ):
        scripted = GenRM(generator=judge, template="reward")
    assert scripted.engine is judge and scripted(PROMPTS, COMPLETIONS)[0] == pytest.approx(0.8)


def test_listwise_judge_sees_each_group_once(caplog):
    """One call per prompt's group, every completion of it shown; each gets its own score from the answer."""
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2 + [PROMPTS[2]]
    completions = ["Bright.", "Cold and far.", "Round.", "Beans.", "Cups.", "Fast."]

    def rank(content: str) -> str:
        if "coffee" in content:
            return "Scores: [4, 9, 2]"  # three scores for two responses: unreadable
        if "trains" in content:
            return "Scores: [6]"
        return "Thinking.\nScores: [8, 10, 3]"

    judge = ScriptedJudge(rank)
    rm = GenRM(engine=judge, template="listwise", name="ranked")
    extra = {}
    with caplog.at_level(logging.WARNING, logger="rh_trl"):
        rewards = rm(prompts, completions, log_extra=lambda k, v: extra.__setitem__(k, v))
    assert rewards == [0.8, 1.0, pytest.approx(0.3), None, None, 0.6]
    assert (
        len(judge.seen) == 3 and rm.last_stats["num_judge_calls"] == 3 and rm.last_stats["num_unparsed"] == 1
    )
    first = judge.seen[0][-1]["content"]
    assert all(f"[The Start of Response {k}]\n{c}\n" in first for k, c in enumerate(completions[:3], 1))
    assert "3 responses to the same user question" in judge.seen[0][0]["content"]
    assert extra["ranked/judgement"][:3] == ["Thinking.\nScores: [8, 10, 3]"] * 3
    assert "hold no readable 'Scores: [...]'" in caplog.text


def test_wrong_model_name_is_a_configuration_error_naming_the_served_ones(server_url):
    """A 404 for the model's name is not one sample's failure: every request would fail the same way."""
    url, _ = server_url
    rm = GenRM(url, engine="openai", served_model="other-model", retry=FAST_RETRY)
    with pytest.raises(
        ModelNotServedError, match=r"does not serve the model 'other-model'; it serves \['judge-7b'\]"
    ):
        rm(PROMPTS[:1], COMPLETIONS[:1])


def test_server_down_gives_none_counted(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rm = GenRM([url, url + "/v1"], engine="openai", served_model="judge-7b", retry=FAST_RETRY)
    with caplog.at_level(logging.ERROR, logger="rh_trl"):
        rewards = rm(PROMPTS, COMPLETIONS)
    assert rewards == [None, None, None]
    assert rm.last_stats["num_server_failed"] == 3 and rm.last_stats["num_unparsed"] == 0
    assert "3 of 3 judge request(s) failed" in caplog.text


@pytest.fixture(scope="module")
def chatml():
    return bpe_tokenizer("chatml", vocab_size=400)


@pytest.fixture(scope="module")
def judge_lm(chatml):
    return tiny_causal_lm(chatml, seed=4).eval()


@torch.no_grad()
def test_hf_generator_left_padding_matches_single_prompts(judge_lm, chatml):
    gen = HFGenerator(judge_lm, chatml, max_new_tokens=6, batch_size=3)
    prompts = [
        chatml(t)["input_ids"] for t in ["The moon", "Name three things related to coffee please", "Hi"]
    ]
    prompts.append(prompts[0])  # a duplicate is generated once
    outputs = gen.generate(prompts)
    for ids, out in zip(prompts, outputs, strict=True):
        full = judge_lm.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=6, pad_token_id=chatml.pad_token_id
        )[0, len(ids) :].tolist()
        if chatml.eos_token_id in full:
            full = full[: full.index(chatml.eos_token_id)]
        assert out.token_ids == full
        assert out.text == chatml.decode(full, skip_special_tokens=True)
    assert outputs[0] == outputs[3]


def test_local_engine_random_model_does_not_crash(judge_lm, chatml):
    rm = GenRM(judge_lm, chatml, max_new_tokens=8, device="cpu")
    rewards = rm(PROMPTS, COMPLETIONS)
    assert len(rewards) == 3
    # random text: every answer without a readable verdict is counted, none silently becomes 0
    assert rm.last_stats["num_unparsed"] == sum(r is None for r in rewards)
    assert rm.last_stats["num_server_failed"] == 0


def test_local_engine_with_scripted_generation(judge_lm, chatml, monkeypatch):
    rm = GenRM(judge_lm, chatml, max_new_tokens=8, device="cpu")
    seen = []

    def scripted(conversations, **kwargs):
        seen.extend(conversations)
        return [Generation(moon_coffee_trains(c[-1]["content"]), [], True) for c in conversations]

    monkeypatch.setattr(rm.generator, "generate_chat", scripted)
    assert rm(PROMPTS, COMPLETIONS) == [pytest.approx(0.8), None, None]
    assert rm.last_stats["num_unparsed"] == 2 and len(seen) == 3


@pytest.mark.slow
def test_grpo_two_steps_with_chat_server(tmp_path, server_url):
    url, _ = server_url
    tok = bpe_tokenizer("llama")
    rm = GenRM(url, engine="openai", served_model="judge-7b", name="genrm_test", retry=FAST_RETRY)
    policy = tiny_causal_lm(tok, seed=5)
    trainer = train_grpo(tmp_path, policy, tok, [rm], dataset=prompt_dataset(8), max_completion_length=6)
    logs = [h for h in trainer.state.log_history if "genrm_test/num_unparsed" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["genrm_test/num_server_failed"] == 0
        assert h["genrm_test/num_none"] == h["genrm_test/num_unparsed"]
