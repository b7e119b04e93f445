"""rh_trl rewards inside real TRL trainers (GRPO, RLOO, experimental online DPO) on CPU."""

from __future__ import annotations

import math

import pytest

import rh_trl

from .trainer_runs import COMMON, prompt_dataset, train_grpo


def completion_length(completions, **kwargs) -> list[float]:
    """A plain TRL reward function next to the rh_trl one."""
    return [float(len(c[0]["content"])) for c in completions]


@pytest.mark.slow
def test_grpo_two_steps_with_orm_and_plain_function(tmp_path, policy, llama_tok, rm_minilm, minilm_tok):
    orm = rh_trl.ORM(rm_minilm, minilm_tok, name="minilm_rm")
    seen_columns: list[str] = []

    def record(prompts, completions, **kwargs):
        seen_columns.extend(kwargs)
        return [0.0] * len(prompts)

    trainer = train_grpo(tmp_path, policy, llama_tok, [orm, completion_length, record])
    logs = [h for h in trainer.state.log_history if "rewards/minilm_rm/mean" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["rewards/minilm_rm/mean"])
        assert math.isfinite(h["rewards/completion_length/mean"])
        # per-call statistics arrive through log_metric under the reward's name
        assert h["minilm_rm/num_none"] == 0 and h["minilm_rm/seconds"] > 0
        assert h["minilm_rm/min"] <= h["minilm_rm/mean"] <= h["minilm_rm/max"]
    assert "topic" in seen_columns  # dataset columns reach rewards


@pytest.mark.slow
def test_rloo_one_step(tmp_path, policy, llama_tok, rm_chatml, chatml_tok):
    from trl import RLOOConfig, RLOOTrainer

    orm = rh_trl.ORM(rm_chatml, chatml_tok, name="chatml_rm")
    args = RLOOConfig(output_dir=str(tmp_path), num_generations=2, max_steps=1, beta=0.0, **COMMON)
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=[orm],
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=llama_tok,
    )
    trainer.train()
    assert any("rewards/chatml_rm/mean" in h for h in trainer.state.log_history)


@pytest.mark.slow
def test_online_dpo_one_step(tmp_path, llama_tok, rm_minilm, minilm_tok):
    pytest.importorskip("trl.experimental.online_dpo")
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from rh_trl.testing import tiny_causal_lm

    orm = rh_trl.ORM(rm_minilm, minilm_tok, name="dpo_rm")
    calls: list[int] = []
    original = orm.compute

    def counting(batch):
        calls.append(len(batch))
        return original(batch)

    orm.compute = counting
    settings = {k: v for k, v in COMMON.items() if k != "max_completion_length"}
    args = OnlineDPOConfig(output_dir=str(tmp_path), max_steps=1, max_new_tokens=8, **settings)
    trainer = OnlineDPOTrainer(
        model=tiny_causal_lm(llama_tok, seed=9),
        reward_funcs=[orm],
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=llama_tok,
    )
    trainer.train()
    assert calls and calls[0] == 2 * COMMON["per_device_train_batch_size"]  # both completions of each prompt
    assert trainer.state.global_step == 1
