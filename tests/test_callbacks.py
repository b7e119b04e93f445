"""Reward offloading, statistics and normalization, checked against hand computations and in real trainers."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from datasets import Dataset

import rh_trl
from rh_trl.callbacks import NormalizedReward, RewardNormalizer, RewardOffloadCallback, WithStatistics
from rh_trl.testing import bundled_prompts, tiny_causal_lm, tiny_reward_model

TOL = 1e-9

GRPO_COMMON = {
    "per_device_train_batch_size": 4,
    "num_generations": 4,
    "max_completion_length": 8,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "seed": 0,
    "disable_tqdm": True,
    "activation_checkpointing": False,
}


def prompt_dataset(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"]} for r in bundled_prompts()[:n]])


def text_length(completions, **kwargs) -> list[float]:
    return [float(len(c[0]["content"])) for c in completions]


# -- statistics ------------------------------------------------------------------------------------------------

FIXED = [0.5, None, 2.0, -1.0, 3.0, 3.0, 3.0, 3.0, 7.25, 1.5, None, None]
TEXTS = ["a" * n for n in (3, 9, 4, 1, 12, 2, 6, 6, 20, 5, 7, 8)]


def fixed_reward(prompts, completions, **kwargs):
    return list(FIXED)


def hand_quantile(sorted_values, q):
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def test_statistics_equal_hand_computation():
    logged: dict[str, float] = {}
    wrapped = WithStatistics(fixed_reward, group_size=4)
    assert wrapped.__name__ == "fixed_reward"
    out = wrapped(["p"] * 12, TEXTS, log_metric=lambda k, v: logged.__setitem__(k, v), trainer_state=None)
    assert out == FIXED

    pairs = [(r, len(t)) for r, t in zip(FIXED, TEXTS, strict=False) if r is not None]
    values = [r for r, _ in pairs]
    lengths = [n for _, n in pairs]
    s = sorted(values)
    mean = sum(values) / len(values)
    expected = {
        "mean": mean,
        "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
        "min": s[0],
        "max": s[-1],
        "p10": hand_quantile(s, 0.1),
        "p50": hand_quantile(s, 0.5),
        "p90": hand_quantile(s, 0.9),
        "frac_none": 3 / 12,
        # groups: [0.5, 2, -1] spread; [3, 3, 3, 3] flat; [7.25, 1.5] spread -> 1 of 3
        "frac_zero_spread_groups": 1 / 3,
        "length_corr": statistics.correlation(values, [float(n) for n in lengths]),
    }
    assert set(logged) == {f"reward_stats/fixed_reward/{k}" for k in expected}
    for key, value in expected.items():
        assert abs(logged[f"reward_stats/fixed_reward/{key}"] - value) < TOL, key


def test_statistics_use_token_lengths_and_skip_ragged_groups(caplog):
    ids = [[1] * n for n in (5, 1, 2, 8, 3, 3, 9, 4, 2, 2, 6, 1)]
    wrapped = WithStatistics(fixed_reward, group_size=5)  # 12 rows are not whole groups of 5
    for _ in range(2):
        wrapped(["p"] * 12, TEXTS, completion_ids=ids)
    pairs = [(r, len(i)) for r, i in zip(FIXED, ids, strict=False) if r is not None]
    expected = statistics.correlation([r for r, _ in pairs], [float(n) for _, n in pairs])
    assert abs(wrapped.last_stats["length_corr"] - expected) < TOL
    assert math.isnan(wrapped.last_stats["frac_zero_spread_groups"])  # not a made-up number, and said once:
    assert caplog.text.count("frac_zero_spread_groups is not reported: group_size=5 does not divide") == 1


def test_zero_spread_groups_by_prompt_in_online_dpo_layout(caplog):
    """Online DPO scores [p1, p2, p1, p2]: prompt 1's rewards are (1, 1) (flat), prompt 2's (5, 7)."""

    def reward(prompts, completions, **kwargs):
        return [1.0, 5.0, 1.0, 7.0]

    prompts, completions = ["p1", "p2", "p1", "p2"], ["a", "b", "c", "d"]
    wrapped = WithStatistics(reward)
    wrapped(prompts, completions)
    assert wrapped.last_stats["frac_zero_spread_groups"] == 0.5
    grpo = WithStatistics(reward)  # the same rewards laid out as GRPO groups [p1, p1, p2, p2]
    grpo(["p1", "p1", "p2", "p2"], completions)
    assert grpo.last_stats["frac_zero_spread_groups"] == 0.0

    positional = WithStatistics(reward, group_size=2)  # consecutive pairs mix prompts here: no number
    positional(prompts, completions)
    assert math.isnan(positional.last_stats["frac_zero_spread_groups"])
    assert "completions 0..1 mix different prompts" in caplog.text


def test_wrappers_reject_modules_and_wrong_lengths():
    with pytest.raises(TypeError, match="nn.Module"):
        WithStatistics(torch.nn.Linear(2, 1))
    with pytest.raises(ValueError, match="returned 12 values for 3 completions"):
        NormalizedReward(fixed_reward)(["p"] * 3, ["a", "b", "c"])


# -- normalization ---------------------------------------------------------------------------------------------


def test_normalizer_equals_hand_whitening_and_clipping():
    batches = [[1.0, None, 3.0, 10.0], [2.0, -4.0, None, 0.5], [100.0, 1.0, 1.0, 2.0]]
    calls = iter(batches)
    norm = NormalizedReward(lambda prompts, completions, **kw: next(calls), clip=1.5)
    seen: list[float] = []
    for batch in batches:
        out = norm(["p"] * 4, ["c"] * 4)
        seen += [v for v in batch if v is not None]
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((v - mean) ** 2 for v in seen) / len(seen))
        for got, raw in zip(out, batch, strict=False):
            if raw is None:
                assert got is None
            else:
                assert abs(got - max(-1.5, min(1.5, (raw - mean) / std))) < 1e-12
    assert norm.moments.count == len(seen)


def grpo_run(tmp_path, llama_tok, *, max_steps, callbacks, rewards, resume=None, save_steps=2):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        **GRPO_COMMON,
    )
    trainer = GRPOTrainer(
        model=tiny_causal_lm(llama_tok, seed=3),
        reward_funcs=rewards,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=llama_tok,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_normalizer_state_survives_checkpoint_resume(tmp_path, llama_tok):
    full = RewardNormalizer([text_length, WithStatistics(lambda completions, **kw: [1.0] * len(completions))])
    grpo_run(tmp_path / "full", llama_tok, max_steps=4, callbacks=[full], rewards=full.rewards)

    first = RewardNormalizer([text_length])
    grpo_run(tmp_path / "cut", llama_tok, max_steps=2, callbacks=[first], rewards=first.rewards)
    saved = (tmp_path / "cut" / "checkpoint-2" / "reward_normalizer.json").read_text()
    assert '"count": 8' in saved  # 2 steps x 4 completions

    resumed = RewardNormalizer([text_length])  # fresh statistics: they must come from the checkpoint
    trainer = grpo_run(
        tmp_path / "cut",
        llama_tok,
        max_steps=4,
        callbacks=[resumed],
        rewards=resumed.rewards,
        resume=str(tmp_path / "cut" / "checkpoint-2"),
    )
    want = full.rewards[0].moments
    got = resumed.rewards[0].moments
    assert got.count == want.count == 16
    assert abs(got.mean - want.mean) < 1e-9 and abs(got.m2 - want.m2) < 1e-6
    # statistics of the wrapped rewards reach the trainer's logs, normalized rewards are what TRL sums
    logs = [h for h in trainer.state.log_history if "rewards/text_length/mean" in h]
    assert logs and all(abs(h["rewards/text_length/mean"]) <= 5.0 for h in logs)


def test_normalizer_needs_saved_state_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward_normalizer.json"):
        RewardNormalizer([text_length], resume_from=tmp_path).load(tmp_path)


# -- offloading ------------------------------------------------------------------------------------------------


def first_param_device(model) -> str:
    return next(model.parameters()).device.type


class DeviceProbe(rh_trl.callbacks.offload.TrainerCallback):
    """Records where the reward model's parameters are at each step event."""

    def __init__(self, model) -> None:
        self.model = model
        self.events: list[tuple[str, str]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.events.append(("step_begin", first_param_device(self.model)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.events.append(("pre_optimizer_step", first_param_device(self.model)))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.events.append(("optimizer_step", first_param_device(self.model)))


def run_offloaded_grpo(tmp_path, llama_tok, chatml_tok, score_device: str, offload_device: str):
    from trl import GRPOConfig, GRPOTrainer

    orm = rh_trl.ORM(tiny_reward_model(chatml_tok, seed=2), chatml_tok, name="offloaded_rm")
    scored: list[tuple[list, list, list, str]] = []
    compute = orm.compute

    def spy(batch):
        out = compute(batch)
        scored.append(
            (list(batch.prompts), list(batch.completions), out.rewards, first_param_device(orm.model))
        )
        return out

    orm.compute = spy
    offload = RewardOffloadCallback(
        [WithStatistics(orm)], score_device=score_device, offload_device=offload_device
    )
    probe = DeviceProbe(orm.model)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, save_strategy="no", **GRPO_COMMON)
    trainer = GRPOTrainer(
        model=tiny_causal_lm(llama_tok, seed=3),
        reward_funcs=[orm],
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=llama_tok,
        callbacks=[offload, probe],
    )
    trainer.train()
    return orm, offload, probe, scored


def assert_same_scores(scored, chatml_tok):
    reference = rh_trl.ORM(tiny_reward_model(chatml_tok, seed=2), chatml_tok, name="reference_rm")
    for prompts, completions, rewards, _ in scored:
        want = reference.score(prompts, completions)
        assert max(abs(a - b) for a, b in zip(rewards, want, strict=False)) < 1e-5


def test_offload_moves_reward_model_off_device_between_scoring(tmp_path, llama_tok, chatml_tok):
    # On CPU the "training device" is the CPU, so weights wait as empty `meta` placeholders: observable.
    orm, offload, probe, scored = run_offloaded_grpo(tmp_path, llama_tok, chatml_tok, "cpu", "meta")
    assert len(scored) == 2 and all(device == "cpu" for *_, device in scored)  # loaded for scoring
    assert {kind for kind, _ in probe.events} == {"step_begin", "pre_optimizer_step", "optimizer_step"}
    assert all(device == "meta" for _, device in probe.events)  # away during forward/backward/optimizer
    assert first_param_device(orm.model) == "meta" and offload.loads == 2
    assert_same_scores(scored, chatml_tok)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_frees_accelerator_memory(tmp_path, llama_tok, chatml_tok):
    model = tiny_reward_model(chatml_tok, seed=2, hidden=256, layers=4).cuda()
    orm = rh_trl.ORM(model, chatml_tok, name="cuda_rm")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    before = torch.cuda.memory_allocated()
    offload = RewardOffloadCallback([orm], score_device="cuda", offload_device="cpu")
    offload.offload_all()
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert freed >= weights and first_param_device(model) == "cpu"
    seen: list[str] = []
    out = orm.score(["Hi"], ["Hello there"])
    seen.append(first_param_device(model))
    assert seen == ["cpu"] and out[0] is not None
