"""The quickstart: a short GRPO run on tiny offline models with an rh_trl reward model.

Everything is built here, offline: a byte-level BPE tokenizer trained on the bundled prompts, a tiny random
policy, and a tiny random reward model with a *different* tokenizer and chat template (as real RMs have).
``GRPOTrainer`` trains the policy on ``[rh_trl.ORM(...), a plain length penalty]``; the reward model's score
should rise over the run. The output directory gets the trained policy (``policy/``, loadable with
``from_pretrained``), the reward curve (``reward_curve.json``) and its plot (``reward_curve.png``, when
matplotlib is installed).

    rh-trl quickstart                 # under a minute on 2 CPU cores
    rh-trl quickstart --steps 100 --output-dir runs/quickstart
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback

logger = logging.getLogger("rh_trl")


@dataclass
class QuickstartResult:
    """Per-step mean of the reward model's score, where the run was written and the files written there."""

    reward_name: str
    rewards: list[float]
    output_dir: str
    files: list[str] = field(default_factory=list)

    @property
    def improvement(self) -> float:
        """Mean reward over the last quarter of steps minus the first quarter."""
        k = max(1, len(self.rewards) // 4)
        return sum(self.rewards[-k:]) / k - sum(self.rewards[:k]) / k


def brevity(completions: list[Any], **kwargs: Any) -> list[float]:
    """A plain TRL reward function: a small penalty per character, next to the reward model."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [-len(t) / 100.0 for t in texts]


class _RewardBar(TrainerCallback):
    """A tqdm bar over training steps that shows the reward model's mean score."""

    def __init__(self, key: str, steps: int) -> None:
        self.key = key
        self.bar = tqdm(total=steps, desc="GRPO", unit="step")

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and self.key in logs:
            self.bar.set_postfix(rm_score=f"{logs[self.key]:+.3f}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar.close()


def run(
    steps: int = 60, output_dir: str | None = None, seed: int = 0, progress: bool = True
) -> QuickstartResult:
    """Train a tiny policy with GRPO for ``steps`` steps against a tiny reward model; return the reward curve."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # TRL imports vLLM when it is installed; the quickstart generates without it, so its notices are noise
    logging.getLogger("vllm").setLevel(logging.ERROR)
    with warnings.catch_warnings():  # TRL's own warnings about things this run does not use or cannot change
        # raised by TRL's own call into transformers
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # raised when TRL finds a vLLM newer than it lists; the quickstart generates without vLLM
        warnings.filterwarnings(
            "ignore", message="TRL currently supports vLLM versions", category=UserWarning
        )
        return _train(steps, output_dir, seed, progress)


def _train(steps: int, output_dir: str | None, seed: int, progress: bool) -> QuickstartResult:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import rh_trl
    from rh_trl.models.offline import bpe_tokenizer, bundled_prompts, tiny_causal_lm, tiny_reward_model

    policy_tokenizer = bpe_tokenizer("llama")
    reward_tokenizer = bpe_tokenizer("chatml", vocab_size=400)
    policy = tiny_causal_lm(policy_tokenizer, seed=seed)
    reward_model = tiny_reward_model(reward_tokenizer, seed=seed + 1)
    orm = rh_trl.ORM(reward_model, reward_tokenizer, name="tiny_rm")

    dataset = Dataset.from_list(bundled_prompts())
    output_dir = output_dir or tempfile.mkdtemp(prefix="rh_trl_quickstart_")
    args = GRPOConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=16,
        learning_rate=1e-2,
        beta=0.0,
        temperature=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        activation_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[orm, brevity],
        args=args,
        train_dataset=dataset,
        processing_class=policy_tokenizer,
    )
    key = f"rewards/{orm.__name__}/mean"
    trainer.remove_callback(
        PrinterCallback
    )  # the bar below shows the score; the full logs stay in log_history
    if progress:
        trainer.add_callback(_RewardBar(key, steps))
    trainer.train()
    curve = [h[key] for h in trainer.state.log_history if key in h and math.isfinite(h[key])]
    result = QuickstartResult(orm.__name__, curve, output_dir)
    result.files = save_outputs(trainer, result)
    return result


def save_outputs(trainer: Any, result: QuickstartResult) -> list[str]:
    """Write the trained policy, the reward curve and its plot to ``result.output_dir``; return the paths."""
    from rh_trl.models.loading import quiet_transformers

    out = Path(result.output_dir)
    with quiet_transformers():  # no bar per saved shard
        trainer.save_model(str(out / "policy"))
    curve = out / "reward_curve.json"
    curve.write_text(json.dumps({"reward": result.reward_name, "mean_per_step": result.rewards}, indent=1))
    files = [str(out / "policy"), str(curve)]
    from rh_trl.data.evaluation import pyplot

    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(result.rewards) + 1), result.rewards, color="#4c72b0")
        ax.set_xlabel("GRPO step")
        ax.set_ylabel("reward-model score (batch mean)")
        ax.set_title(f"rh-trl quickstart: {result.reward_name}")
        fig.tight_layout()
        fig.savefig(out / "reward_curve.png", dpi=120)
        plt.close(fig)
        files.append(str(out / "reward_curve.png"))
    return files


def report(result: QuickstartResult) -> str:
    """A few lines summarizing the reward curve."""
    k = max(1, len(result.rewards) // 4)
    first, last = sum(result.rewards[:k]) / k, sum(result.rewards[-k:]) / k
    return (
        f"GRPO with rh_trl.ORM ({result.reward_name}) for {len(result.rewards)} steps\n"
        f"  reward-model score, mean of first {k} steps: {first:+.3f}\n"
        f"  reward-model score, mean of last {k} steps:  {last:+.3f}  (change {last - first:+.3f})\n"
        + "".join(f"  wrote {path}\n" for path in result.files)
    ).rstrip("\n")
