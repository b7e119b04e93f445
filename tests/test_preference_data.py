"""Reading preference formats, and tokenizing pairs exactly as ORM scores them."""

from __future__ import annotations

import gzip
import json

import pytest

from rh_trl.data.evaluation import accuracy_report, shorter_reply
from rh_trl.data.preferences import (
    PreferenceDataError,
    hh_to_messages,
    load_pairs,
    split_pairs,
    tokenize_pairs,
)
from rh_trl.formatting import ChatFormatter, to_sample

HH = {
    "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?\n\nAssistant: Bake it.",
    "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\nHuman: Then?\n\nAssistant: No idea.",
}


def test_hh_text_becomes_conversations():
    assert hh_to_messages(HH["chosen"])[:2] == [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour and water."},
    ]
    (pair,) = load_pairs([HH])
    assert pair["prompt"][-1] == {"role": "user", "content": "Then?"} and len(pair["prompt"]) == 3
    assert pair["chosen"] == [{"role": "assistant", "content": "Bake it."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No idea."}]


def test_trl_explicit_implicit_and_llmbar_formats(tmp_path):
    explicit = {"prompt": "Q?", "chosen": "good", "rejected": "bad", "margin": 1.5}
    implicit = {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
    }
    llmbar = {"input": "Q?", "output_1": "bad", "output_2": "good", "label": 2}
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in (explicit, implicit, llmbar)))
    pairs = load_pairs(path)
    for pair in pairs:
        assert pair["prompt"] == [{"role": "user", "content": "Q?"}]
        assert pair["chosen"][0]["content"] == "good" and pair["rejected"][0]["content"] == "bad"
    assert pairs[0]["margin"] == 1.5


def test_bad_preference_data_is_explained(tmp_path):
    with pytest.raises(
        PreferenceDataError, match=r"'chosen' and 'rejected'.*got columns \['answer', 'prompt'\]"
    ):
        load_pairs([{"prompt": "Q", "answer": "A"}])
    diverging = {
        "chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "b"}],
    }
    with pytest.raises(PreferenceDataError, match="row 2: chosen and rejected do not share their prompt"):
        load_pairs([HH, diverging])
    assert len(load_pairs([HH, diverging], skip_invalid=True)) == 1
    with pytest.raises(PreferenceDataError, match="all 1 rows were invalid"):
        load_pairs([diverging], skip_invalid=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreferenceDataError, match="no rows"):
        load_pairs(empty)
    with pytest.raises(PreferenceDataError, match="0 rows after filtering"):
        tokenize_pairs([], None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")


def test_tokenize_pairs_matches_orm_rendering_and_truncates_left(chatml_tok):
    (pair,) = load_pairs([HH])
    formatter = ChatFormatter(chatml_tok, max_length=20)
    rows, counts = tokenize_pairs([pair], formatter)
    full = chatml_tok(
        chatml_tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    assert rows[0]["chosen_ids"] == full[-20:]  # this tokenizer has no BOS: the last 20 tokens
    assert rows[0]["chosen_ids"] == formatter.encode(to_sample(pair["prompt"], pair["chosen"])).input_ids
    assert counts == {"pairs": 1, "truncated": 2, "response_truncated": 0}


def test_split_is_reproducible():
    pairs = [{"i": i} for i in range(50)]
    train, held_out = split_pairs(pairs, 0.2, seed=3)
    assert len(held_out) == 10 and split_pairs(pairs, 0.2, seed=3)[1] == held_out
    assert sorted(p["i"] for p in train + held_out) == list(range(50))


def test_accuracy_report_by_hand():
    pairs = [{"subset": "llmbar-natural"}] * 3 + [{"subset": "hh-rlhf-harmless"}] * 2
    chosen = [1.0, 0.0, 2.0, 5.0, None]
    rejected = [0.0, 1.0, 2.0, 1.0, 0.0]
    report = accuracy_report(pairs, chosen, rejected)
    assert report["skipped"] == 1 and report["scored"] == 4
    assert report["subsets"]["llmbar-natural"] == {"n": 3, "accuracy": pytest.approx(1.5 / 3)}
    assert report["accuracy"] == pytest.approx(2.5 / 4)
    assert report["sections"] == {"chat_hard": pytest.approx(0.5), "safety": 1.0}
    assert report["section_score"] == pytest.approx(0.75)
    assert shorter_reply(["p", "p"], ["abc", [{"role": "assistant", "content": "a"}]]) == [-3.0, -1.0]
