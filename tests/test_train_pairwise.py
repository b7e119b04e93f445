"""The pairwise preference recipe: order balancing, rendering as PairwisePM reads it, left truncation of the
context, a single-process and a two-process run whose output loads into PairwisePM, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rh_trl
from rh_trl.data.preferences import PreferenceDataError
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import train_pairwise  # noqa: E402

TOL = 1e-5
PROMPT = [{"role": "user", "content": "Name three things related to coffee."}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Describe trains."},
    {"role": "assistant", "content": "Fast."},
    {"role": "user", "content": "And the moon?"},
]


def pairs_by_hand(n: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad answer {i}"}],
        }
        for i in range(n)
    ]


def context_by_hand(messages) -> str:
    out = "\n"
    for m in messages:
        out += "\n\n<turn> " + m["role"] + "\n " + m["content"]
    return out + "\n\n\n"


def pair_text_by_hand(tok, messages, a: str, b: str, context: str | None = None) -> str:
    """The comparison as RLHFlow's pairwise models read it, built here from strings."""
    context = context_by_hand(messages) if context is None else context
    content = "[CONTEXT] " + context + " [RESPONSE A] " + a + " [RESPONSE B] " + b + " \n"
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    bos = tok.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


@torch.no_grad()
def p_first_by_hand(lm, tok, messages, a: str, b: str) -> float:
    """softmax(logit_A, logit_B)[A] at the last position of one unpadded forward pass, in one order."""
    ids = tok(pair_text_by_hand(tok, messages, a, b), add_special_tokens=False)["input_ids"]
    logits = lm(torch.tensor([ids])).logits[0, -1].double()
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    return math.exp(logits[a_id]) / (math.exp(logits[a_id]) + math.exp(logits[b_id]))


def p_both_by_hand(lm, tok, messages, a, b) -> float:
    return (p_first_by_hand(lm, tok, messages, a, b) + 1 - p_first_by_hand(lm, tok, messages, b, a)) / 2


# -- comparisons ------------------------------------------------------------------------------------------------------


def test_order_is_balanced_seeded_and_points_to_chosen():
    pairs = pairs_by_hand(101)
    comparisons = train_pairwise.order_pairs(pairs, seed=3)
    assert len(comparisons) == 101
    for pair, c in zip(pairs, comparisons, strict=True):
        at_answer = c["response_a"] if c["answer"] == "A" else c["response_b"]
        other = c["response_b"] if c["answer"] == "A" else c["response_a"]
        assert at_answer == pair["chosen"][0]["content"] and other == pair["rejected"][0]["content"]
        assert c["prompt"] == pair["prompt"]
    answers = [c["answer"] for c in comparisons]
    assert answers.count("A") == 51  # half, rounded up
    assert answers == [c["answer"] for c in train_pairwise.order_pairs(pairs, seed=3)]  # reproducible
    other_seed = [c["answer"] for c in train_pairwise.order_pairs(pairs, seed=4)]
    assert other_seed != answers and other_seed.count("A") == 51
    # not a fixed pattern: both letters appear among the first ten and runs are short
    assert 2 <= answers[:10].count("A") <= 8

    both = train_pairwise.order_pairs(pairs[:5], seed=0, both_orders=True)
    assert [c["answer"] for c in both] == ["A", "B"] * 5
    for pair, (ab, ba) in zip(pairs[:5], zip(both[::2], both[1::2], strict=True), strict=True):
        assert ab["response_a"] == ba["response_b"] == pair["chosen"][0]["content"]
        assert ab["response_b"] == ba["response_a"] == pair["rejected"][0]["content"]


@pytest.mark.parametrize("style", ["llama", "chatml"])
def test_rows_are_what_pairwise_pm_reads(style):
    tok = bpe_tokenizer(style)
    pm = rh_trl.PairwisePM(tiny_causal_lm(tok), tok, device="cpu")
    comparisons = [
        {"prompt": PROMPT, "response_a": "Beans and cups.", "response_b": "No.", "answer": "A"},
        {"prompt": MULTI, "response_a": "A moon.", "response_b": "Bright at night.", "answer": "B"},
        {"prompt": "A plain string prompt?", "response_a": "yes", "response_b": "no", "answer": "B"},
    ]
    rows, counts = train_pairwise.tokenize_comparisons(comparisons, tok, truncation_length=None)
    assert counts == {"comparisons": 3, "truncated": 0, "too_long": 0, "answer_a": 1}
    for c, row in zip(comparisons, rows, strict=True):
        prompt_ids = row["input_ids"][:-1]
        assert prompt_ids == pm.encode(c["prompt"], c["response_a"], c["response_b"])
        messages = [{"role": "user", "content": c["prompt"]}] if isinstance(c["prompt"], str) else c["prompt"]
        by_hand = pair_text_by_hand(tok, messages, c["response_a"], c["response_b"])
        assert prompt_ids == tok(by_hand, add_special_tokens=False)["input_ids"]
        answer_id = tok.convert_tokens_to_ids(c["answer"])
        assert row["input_ids"][-1] == answer_id
        assert row["labels"] == [-100] * len(prompt_ids) + [answer_id]  # loss on the answer token only
    if style == "llama":
        assert not tok.decode(rows[0]["input_ids"]).startswith("<s>")  # PairwisePM strips the template's BOS


TRIMMING_TEMPLATE = (  # Llama 3 and Gemma trim each message's content
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("style", ["llama", "chatml-trim"])
def test_long_context_is_cut_from_the_left(style):
    tok = bpe_tokenizer(style.split("-")[0])
    if style == "chatml-trim":
        tok.chat_template = TRIMMING_TEMPLATE
    long_prompt = [
        {"role": "user", "content": "Tell me about the library and the quick brown fox. " * 6},
        {"role": "assistant", "content": "It jumps over the lazy dog."},
        {"role": "user", "content": "And then what?"},
    ]
    a, b = "Then it sleeps.", "No."
    comparison = {"prompt": long_prompt, "response_a": a, "response_b": b, "answer": "A"}
    full_rows, _ = train_pairwise.tokenize_comparisons([comparison], tok, truncation_length=None)
    full_length = len(full_rows[0]["input_ids"])
    limit = full_length - 40
    rows, counts = train_pairwise.tokenize_comparisons([comparison], tok, truncation_length=limit)
    assert counts["truncated"] == 1 and counts["too_long"] == 0
    pm = rh_trl.PairwisePM(tiny_causal_lm(tok), tok, device="cpu")
    assert full_rows[0]["input_ids"][:-1] == pm.encode(long_prompt, a, b)
    ids = rows[0]["input_ids"]
    assert limit - 3 <= len(ids) <= limit
    assert ids[-1] == tok.convert_tokens_to_ids("A") and rows[0]["labels"][-1] == ids[-1]
    # the text is the comparison with a suffix of the context: responses, template and the last turn intact
    text = tok.decode(ids[:-1])
    full_context = context_by_hand(long_prompt)
    head = pair_text_by_hand(tok, long_prompt, a, b, context="")
    prefix = head[: head.index("[CONTEXT] ") + len("[CONTEXT] ")]
    suffix = head[len(prefix) :]
    assert text.startswith(prefix) and text.endswith(suffix)
    kept = text[len(prefix) : len(text) - len(suffix)]
    assert 0 < len(kept) < len(full_context) and full_context.endswith(kept)
    assert kept.endswith("<turn> user\n And then what?\n\n\n")

    # responses that do not fit on their own are left out and counted; nothing left is an error
    ok = {"prompt": "Hi?", "response_a": "y", "response_b": "n", "answer": "B"}
    limit = len(train_pairwise.tokenize_comparisons([ok], tok, truncation_length=None)[0][0]["input_ids"])
    big = {"prompt": "Hi?", "response_a": "the lazy dog " * 20, "response_b": "n", "answer": "A"}
    rows, counts = train_pairwise.tokenize_comparisons([big, ok], tok, truncation_length=limit)
    assert counts == {"comparisons": 1, "truncated": 0, "too_long": 1, "answer_a": 0}
    assert len(rows[0]["input_ids"]) == limit
    with pytest.raises(PreferenceDataError, match="no comparisons left to train on: all 1 are longer"):
        train_pairwise.tokenize_comparisons([big], tok, truncation_length=limit)


# -- the recipe -------------------------------------------------------------------------------------------------------


def check_output_against_transformers(output_dir: Path) -> list[float]:
    """PairwisePM(output_dir) against P(A) computed here from the saved model's full logits; returns P(chosen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pm = rh_trl.PairwisePM(str(output_dir), dtype="float32", device="cpu")
    lm = AutoModelForCausalLM.from_pretrained(str(output_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(output_dir))
    assert tok.chat_template  # saved with the model
    cases = [
        (PROMPT, "Sure. three coffee things Name related to.", "I don't know."),
        (MULTI, "No.", "Sure. the moon And."),
    ]
    probs = pm.compare_many([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
    expected = [p_both_by_hand(lm, tok, *c) for c in cases]
    assert max(abs(p - e) for p, e in zip(probs, expected, strict=True)) <= TOL
    return probs


@pytest.mark.slow
def test_train_single_process_then_pairwise_pm(tmp_path, capsys):
    summary = train_pairwise.main(
        ["--config", str(ROOT / "configs/pairwise/tiny.yaml"), "--output_dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert "training comparisons: 72 from 72 pairs (36 answered A)" in out
    assert (
        summary["truncated"] > 0 and f"context cut from the left to 96 tokens: {summary['truncated']}" in out
    )
    assert summary["eval_pairs"] == 24 and summary["eval_skipped"] == 0
    assert summary["eval_accuracy"] >= 0.9  # the synthetic signal is easy
    assert summary["eval_mean_prob_chosen"] > summary["eval_mean_prob_chosen_before_training"] + 0.2
    assert json.loads((tmp_path / "pairwise_summary.json").read_text()) == json.loads(json.dumps(summary))
    p_a_is_chosen, p_a_is_rejected = check_output_against_transformers(tmp_path)
    assert p_a_is_chosen > 0.5 > p_a_is_rejected  # the chosen reply wins wherever it stands


@pytest.mark.slow
def test_train_two_cpu_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
        str(ROOT / "recipes/train_pairwise.py"), "--config", str(ROOT / "configs/pairwise/tiny.yaml"),
        "--output_dir", str(tmp_path), "--max_steps", "4", "--both_orders", "true", "--eval_before_training", "false",
        "--eval_strategy", "steps", "--eval_steps", "2",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "pairwise_summary.json").read_text())
    assert summary["train_comparisons"] == 144 and summary["answer_a"] == 72  # both orders of 72 pairs
    assert summary["num_processes"] == 2
    assert result.stdout.count("held-out accuracy on 24 pairs") == 1  # the main process evaluates
    assert "eval_loss" in result.stdout  # eval_strategy: the held-out comparisons as SFT rows
    check_output_against_transformers(tmp_path)


# -- bad input --------------------------------------------------------------------------------------------------------


def test_bad_input_is_explained(tmp_path):
    config = str(ROOT / "configs/pairwise/tiny.yaml")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"prompt": "Q?", "chosen": "yes"}) + "\n")
    with pytest.raises(PreferenceDataError, match="got columns \\['chosen', 'prompt'\\]"):
        train_pairwise.main(
            ["--config", config, "--output_dir", str(tmp_path), "--dataset_path", str(missing)]
        )
    with pytest.raises(PreferenceDataError, match="no comparisons left to train on: all 72 are longer than"):
        train_pairwise.main(["--config", config, "--output_dir", str(tmp_path), "--truncation_length", "12"])
    with pytest.raises(
        ValueError, match="LlamaForSequenceClassification; a pairwise preference model is a causal"
    ):
        train_pairwise.main(
            ["--config", config, "--output_dir", str(tmp_path), "--model_name_or_path", "rh_trl:tiny-rm"]
        )
