"""The CLoud recipe: the joint loss against an independent computation, every stage end to end on a tiny model
(critique SFT → regenerated critiques → joint BT + LM; the classic baseline), the outputs loaded into
rh_trl.CLoud / rh_trl.ORM, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import rh_trl
from rh_trl.data.preferences import PreferenceDataError, split_pairs
from rh_trl.rewards.cloud import CLOUD_PREAMBLE, CLoudModel
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm
from rh_trl.training import cloud as cloud_training

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import train_cloud  # noqa: E402

TOL = 1e-5
TINY = str(ROOT / "configs/cloud/tiny.yaml")
ROWS = [
    {
        "prompt": "What is 7 + 5?",
        "chosen": "7 + 5 = 12.",
        "rejected": "13",
        "chosen_critique": "Correct: 7 plus 5 is 12.",
        "rejected_critique": "Incorrect, the sum is 12 and the answer gives no working at all.",
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I have 3 apples."},
            {"role": "assistant", "content": "Okay."},
            {"role": "user", "content": "I eat one. How many are left?"},
        ],
        "chosen": [{"role": "assistant", "content": "You have 2 apples left."}],
        "rejected": [{"role": "assistant", "content": "You have 4 apples left, since eating adds one."}],
        "chosen_critique": "Right: 3 - 1 = 2 ✓",
        "rejected_critique": "Wrong.",
    },
    {
        "prompt": "Name a primary color.",
        "chosen": "Red.",
        "rejected": "Green is a fruit, and the moon is made of cheese.",
        "chosen_critique": "Correct and brief.",
        "rejected_critique": "Off topic: the question asked for a primary color; green is not a fruit.",
    },
]


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def as_messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def critique_prefix(prompt, response) -> str:
    """ChatML by hand: the conversation, then an open user turn holding the preamble."""
    return chatml(as_messages(prompt, "user") + as_messages(response, "assistant")) + (
        "<|im_start|>user\n" + CLOUD_PREAMBLE
    )


# ---------------------------------------------------------------------------------------------------------------
# The joint loss
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def independent_side(model, tok, prompt, response, critique):
    """Token ids, the head's reward at the closing <|im_end|>, and the critique tokens' negative log-likelihoods,
    from the plain causal LM's own forward (logits and last hidden state)."""
    prefix = critique_prefix(prompt, response)
    text = prefix + critique + "<|im_end|>"
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    # critique tokens: every token that reaches into the critique, and the closing <|im_end|>
    positions = [t for t, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(prefix)]
    assert positions and positions[-1] == len(ids) - 1 and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    out = model.lm(torch.tensor([ids]), output_hidden_states=True)
    head = model.reward_head
    reward = float(head.out_proj(torch.tanh(head.dense(out.hidden_states[-1][0, -1])))[0])
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)
    nll = [-float(logp[t - 1, ids[t]]) for t in positions]
    return ids, reward, nll


def test_joint_loss_is_bt_plus_weighted_critique_lm_loss(tmp_path):
    tok = bpe_tokenizer("chatml", vocab_size=400)
    model = train_cloud.CLoudJointModel.from_causal_lm(tiny_causal_lm(tok, seed=11)).eval()
    with torch.no_grad():
        model.reward_head.out_proj.weight.normal_(0.0, 1.0)  # spread the rewards
    pairs = train_cloud.read_critique_pairs(ROWS)
    rows, counts = train_cloud.joint_rows(pairs, train_cloud.CritiqueRenderer(tok), max_length=None)
    assert counts == {"pairs": 3, "truncated": 0, "too_long": 0}
    batch = train_cloud.PairCollator(tok.pad_token_id)(rows)
    lm_weight = 0.75
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = train_cloud.CLoudJointTrainer(model=model, args=args, lm_weight=lm_weight)
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, batch))
        outputs = model(**batch)

    rewards, nll = {}, []
    for i, row in enumerate(ROWS):
        for k, side in enumerate(("chosen", "rejected")):
            ids, reward, side_nll = independent_side(
                model, tok, row["prompt"], row[side], row[f"{side}_critique"]
            )
            b = k * len(ROWS) + i  # the collator puts every chosen side first
            n = int(batch["attention_mask"][b].sum())
            assert batch["input_ids"][b, :n].tolist() == ids  # exactly the sequence rh_trl.CLoud scores
            assert batch["attention_mask"][b, n:].sum() == 0
            rewards[i, side] = reward
            nll += side_nll
    bt = sum(math.log1p(math.exp(-(rewards[i, "chosen"] - rewards[i, "rejected"]))) for i in range(3)) / 3
    lm = sum(nll) / len(nll)
    assert len({round(r, 4) for r in rewards.values()}) == 6  # a test that can tell the sides apart
    assert abs(loss - (bt + lm_weight * lm)) <= TOL
    assert max(abs(float(outputs.rewards[k * 3 + i]) - rewards[i, s]) for i in range(3) for k, s in enumerate(("chosen", "rejected"))) <= TOL  # fmt: skip
    assert abs(float(outputs.lm_loss) - lm) <= TOL
    assert trainer._metrics["eval"]["bt_loss"][-1] == pytest.approx(bt, abs=TOL)


def test_cloud_loss_arguments():
    c, r = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    loss, parts = cloud_training.cloud_loss(c, r, torch.tensor(2.0), 1.25)
    bt = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(3.0))) / 2
    assert abs(float(loss) - (bt + 2.5)) <= TOL and abs(float(parts["bt_loss"]) - bt) <= TOL
    assert abs(float(cloud_training.cloud_loss(c, r, None, 0.0)[0]) - bt) <= TOL
    with pytest.raises(ValueError, match="needs an LM loss"):
        cloud_training.cloud_loss(c, r, None, 1.25)
    with pytest.raises(ValueError, match="differ in shape"):
        cloud_training.cloud_loss(c, r[:1], None, 0.0)


def test_sft_sequence_is_the_generation_prefix_then_the_critique():
    tok = bpe_tokenizer("chatml", vocab_size=400)
    pairs = train_cloud.read_critique_pairs(ROWS[:1])
    rows, _ = train_cloud.sft_rows(pairs, train_cloud.CritiqueRenderer(tok), max_length=None)
    prefix = tok(critique_prefix(ROWS[0]["prompt"], ROWS[0]["chosen"]), add_special_tokens=False)["input_ids"]
    critique = tok(ROWS[0]["chosen_critique"], add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert rows[0]["input_ids"] == prefix + critique + [end]
    assert rows[0]["labels"] == [-100] * len(prefix) + critique + [end]
    # cut from the left to fit; a critique that cannot fit leaves its side out
    short, counts = train_cloud.sft_rows(
        pairs, train_cloud.CritiqueRenderer(tok), max_length=len(critique) + 10
    )
    assert counts["truncated"] == 1 and counts["too_long"] == 1  # the rejected critique is longer than 10 + …
    assert short[0]["input_ids"] == (prefix + critique + [end])[-(len(critique) + 10) :]


def test_truncation_keeps_the_bos_and_the_critique():
    tok = bpe_tokenizer("llama")  # BOS added by the template
    pairs = train_cloud.read_critique_pairs(ROWS[1:2])
    renderer = train_cloud.CritiqueRenderer(tok)
    (full,), _ = train_cloud.joint_rows(pairs, renderer, max_length=None)
    (cut,), counts = train_cloud.joint_rows(pairs, renderer, max_length=len(full["chosen_input_ids"]) - 5)
    assert full["chosen_input_ids"][0] == tok.bos_token_id and counts["truncated"] == 2
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:1] + full["chosen_input_ids"][6:]
    assert cut["chosen_labels"] == full["chosen_labels"][:1] + full["chosen_labels"][6:]
    assert cut["chosen_labels"][-1] == tok.eos_token_id  # the template closes the critique turn with </s>


# ---------------------------------------------------------------------------------------------------------------
# Every stage, end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cloud")
    summary = train_cloud.main(["--config", TINY, "--output_dir", str(out)])
    return out, summary


@pytest.mark.slow
def test_every_stage_runs_and_reports(full_run):
    out, summary = full_run
    assert summary["stages"] == ["sft", "regenerate", "joint"] and summary["train_pairs"] == 27
    assert summary["sft"]["sequences"] == 54 and summary["sft"]["last_loss"] < summary["sft"]["first_loss"]
    assert summary["regenerate"]["pairs"] == 27 and summary["regenerate"]["failed"] == 0
    assert summary["joint"]["critiques"] == "regenerated" and summary["joint"]["pairs"] == 27
    assert summary["joint"]["last_lm_loss"] < summary["joint"]["first_lm_loss"]
    for key in ("eval_accuracy", "classic_eval_accuracy", "eval_accuracy_shorter_reply"):
        assert 0.0 <= summary[key] <= 1.0
    assert 0.0 <= summary["eval"]["accuracy_oracle_critiques"] <= 1.0
    assert json.loads((out / "cloud_summary.json").read_text()) == json.loads(json.dumps(summary))


def check_greedy_critiques(sft_dir: Path, rows: list[dict], max_new_tokens: int) -> None:
    """Each row's critiques are the saved SFT model's greedy continuations of CLoud's prefix (plain generate)."""
    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    tok = AutoTokenizer.from_pretrained(sft_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        for side in ("chosen", "rejected"):
            ids = tok(critique_prefix(row["prompt"], row[side]), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                new = sft.generate(
                    torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[end],
                    pad_token_id=tok.pad_token_id,
                )[0, len(ids) :].tolist()  # fmt: skip
            new = new[: new.index(end)] if end in new else new
            assert row[f"{side}_critique"] == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_regenerated_critiques_are_the_sft_models_greedy_critiques(full_run):
    out, _ = full_run
    rows = [json.loads(line) for line in (out / "self_critiques.jsonl").read_text().splitlines()]
    assert len(rows) == 27 and all(r["oracle_chosen_critique"] != r["chosen_critique"] for r in rows)
    check_greedy_critiques(out / "critique_sft", rows[:3], 8)


@pytest.mark.slow
def test_outputs_load_into_cloud_and_orm(full_run):
    out, _ = full_run
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CLoudModel"] and config["model_type"] == "rh_trl_cloud"
    assert type(AutoModel.from_pretrained(out)) is CLoudModel
    prompts = ["What is 2 + 2?", "What is 2 + 2?"]
    completions = ["2 + 2 = 4.", "2 + 2 = 5."]
    cloud = rh_trl.CLoud(str(out), max_new_tokens=8, device="cpu", dtype="float32")
    scores = cloud.score(prompts, completions)
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert cloud.last_stats["num_none"] == 0
    classic = rh_trl.ORM(str(out / "classic"), device="cpu", dtype="float32").score(prompts, completions)
    assert all(isinstance(s, float) and math.isfinite(s) for s in classic)


@pytest.mark.slow
def test_joint_stage_on_dataset_critiques_learns_to_read_them(tmp_path):
    """Joint training alone (from the base LM) on the oracle critiques: the head learns to read them, checked on
    held-out pairs by a forward pass written here."""
    summary = train_cloud.main(
        ["--config", TINY, "--output_dir", str(tmp_path), "--stages", "joint", "--classic", "false",
         "--sft_model_path", "rh_trl:tiny-lm-chatml", "--joint_critiques", "dataset", "--max_steps", "10", "--max_critique_tokens", "4"]
    )  # fmt: skip
    assert summary["joint"]["critiques"] == "dataset"
    assert summary["eval"]["accuracy_oracle_critiques"] >= 8 / 9
    model = CLoudModel.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pairs = train_cloud.read_critique_pairs(train_cloud.BUILTIN_DATA)
    _, held_out = split_pairs(pairs, 0.25, 0)
    wins = 0
    for pair in held_out:
        rewards = []
        for side in ("chosen", "rejected"):
            text = critique_prefix(pair["prompt"], pair[side]) + pair[f"{side}_critique"] + "<|im_end|>"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                hidden = model.lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
                rewards.append(float(model.reward_head(hidden)))
        wins += rewards[0] > rewards[1]
    assert wins / len(held_out) == pytest.approx(summary["eval"]["accuracy_oracle_critiques"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_critique_column_is_a_clear_error(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "rejected_critique"} for r in ROWS]
    data = _write(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        PreferenceDataError, match=r"row 0: missing critique column\(s\) \['rejected_critique'\]"
    ):
        train_cloud.main(["--config", TINY, "--output_dir", str(tmp_path / "o"), "--dataset_path", data])
    # the classic baseline alone needs no critiques
    assert len(train_cloud.read_critique_pairs(data, require_critiques=False)) == 3
    bad = _write(tmp_path / "b.jsonl", [{**ROWS[0], "chosen_critique": 3}])
    with pytest.raises(PreferenceDataError, match="'chosen_critique' must be a string"):
        train_cloud.read_critique_pairs(bad)
    with pytest.raises(PreferenceDataError, match="'chosen_critique' is empty"):
        train_cloud.read_critique_pairs([{**ROWS[0], "chosen_critique": "  "}])
    assert train_cloud.read_critique_pairs([{**ROWS[0], "chosen_critique": ["first", "second"]}])[0][
        "chosen_critique"
    ] == "first"  # fmt: skip


def test_empty_data_and_bad_settings_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreferenceDataError, match="no rows in"):
        train_cloud.main(
            ["--config", TINY, "--output_dir", str(tmp_path / "o"), "--dataset_path", str(empty)]
        )
    with pytest.raises(ValueError, match="in the order"):
        train_cloud.main(["--config", TINY, "--output_dir", str(tmp_path / "o"), "--stages", "joint", "sft"])
    with pytest.raises(ValueError, match="unknown stage"):
        train_cloud.main(["--config", TINY, "--output_dir", str(tmp_path / "o"), "--stages", "rl"])
    with pytest.raises(FileNotFoundError, match="run stage 'sft' first"):
        train_cloud.main(
            ["--config", TINY, "--output_dir", str(tmp_path / "o"), "--stages", "regenerate", "joint"]
        )
    with pytest.raises(ValueError, match="unknown training argument"):
        train_cloud.stage_arguments(
            TrainingArguments(output_dir=str(tmp_path), use_cpu=True), TrainingArguments, "x", {"lr": 1.0}
        )


def test_whole_model_loading_lifts_zero3_init_for_a_while():
    from transformers.integrations import deepspeed as hf_deepspeed

    class StandIn:  # what transformers asks of a DeepSpeed config
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self) -> bool:
            return True

    config = StandIn()
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with train_cloud.zero3_init_disabled():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    with train_cloud.zero3_init_disabled():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()


@pytest.mark.slow
def test_two_cpu_processes_regenerate_every_pair_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "recipes/train_cloud.py"),
        "--config", TINY, "--output_dir", str(tmp_path), "--stages", "sft", "regenerate", "--classic", "false",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "cloud_summary.json").read_text())
    assert summary["regenerate"]["pairs"] == 27 and "joint" not in summary
    rows = [json.loads(line) for line in (tmp_path / "self_critiques.jsonl").read_text().splitlines()]
    train, _ = split_pairs(train_cloud.read_critique_pairs(train_cloud.BUILTIN_DATA), 0.25, 0)
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in train]  # in order, each pair once
    check_greedy_critiques(tmp_path / "critique_sft", [rows[0], rows[-1]], 8)  # one from each process


def test_llama3_8b_config_parses_for_every_stage(tmp_path):
    from trl import ModelConfig, RewardConfig, SFTConfig, TrlParser

    parser = TrlParser((train_cloud.CLoudArguments, RewardConfig, ModelConfig))
    args, base, model_args = parser.parse_args_and_config(
        ["--config", str(ROOT / "configs/cloud/llama3_8b.yaml"), "--bf16", "false", "--use_cpu", "true"]
    )
    assert args.lm_weight == 1.25 and args.chosen_critique_column == "chosen_feedback"
    assert train_cloud.check_stages(args.stages, args.classic) == ["sft", "regenerate", "joint"]
    sft = train_cloud.stage_arguments(base, SFTConfig, str(tmp_path), args.sft_args, max_length=None)
    joint = train_cloud.stage_arguments(base, TrainingArguments, str(tmp_path), args.joint_args)
    classic = train_cloud.stage_arguments(base, RewardConfig, str(tmp_path), args.classic_args)
    assert (sft.learning_rate, joint.learning_rate, classic.learning_rate) == (5e-6, 1e-6, 5e-6)
    assert (sft.per_device_train_batch_size, joint.per_device_train_batch_size) == (4, 2)
    assert (
        classic.num_train_epochs == 2
        and joint.adam_beta2 == 0.95
        and sft.lr_scheduler_kwargs == {"min_lr_rate": 0.01}
    )
