"""A real TRL trainer on several processes with rh_trl rewards, each reward call recorded.

    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml trainer_worker.py {grpo|rloo|online_dpo} OUT
    DS_ACCELERATOR=cpu accelerate launch --config_file configs/accelerate/cpu_zero3.yaml trainer_worker.py grpo OUT sharded

Every process writes ``OUT/calls<rank>.json`` (for each reward call: its share of prompts and completions, and
the rewards it returned); the first also writes ``OUT/log_history.json``. tests/distributed/test_trainers.py puts
each call's shares back together and scores the whole call on one process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402

import rh_trl  # noqa: E402
from rh_trl.callbacks import WithStatistics  # noqa: E402
from rh_trl.testing import bundled_prompts, tiny_model  # noqa: E402
from tests.distributed.lockstep_worker import HashJudge  # noqa: E402

COMMON = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "learning_rate": 1e-4,
    "logging_steps": 1,
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "save_strategy": "no",
    "seed": 0,
}


def build_rewards() -> list[Any]:
    """The rewards of the run, built in the same order on every process and in the test."""
    return [
        WithStatistics(rh_trl.ORM("rh_trl:tiny-rm", name="orm")),
        rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", name="pairpm"),
        rh_trl.GenRM(engine=HashJudge(), template="pairwise", name="judge"),
        rh_trl.GenRM(engine=HashJudge(), template="listwise", name="listwise"),
    ]


def build_sharded_rewards() -> list[Any]:
    """Each reward model twice: sharded over the processes (``zero3=True``) and a whole copy per process."""
    rewards = []
    for zero3, suffix in ((True, "sharded"), (False, "whole")):
        rewards += [
            rh_trl.ORM("rh_trl:tiny-rm", name=f"orm_{suffix}", zero3=zero3),
            rh_trl.PRM("rh_trl:tiny-lm-chatml", kind="next_token", name=f"prm_{suffix}", zero3=zero3),
            rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", name=f"pairpm_{suffix}", zero3=zero3),
        ]
    return rewards


class Recorded:
    """A reward whose calls are recorded (TRL sees the same name, arguments and values)."""

    def __init__(self, reward: Any, calls: list[dict]) -> None:
        self.reward = reward
        self.calls = calls
        self.__name__ = reward.__name__
        self.trainer: Any = None  # set once the trainer exists: training and evaluation calls are told apart

    def __call__(self, prompts, completions, **kwargs):
        values = self.reward(prompts=prompts, completions=completions, **kwargs)
        step = kwargs["trainer_state"].global_step
        training = self.trainer is None or self.trainer.model.training
        self.calls.append(
            {
                "reward": self.__name__,
                "step": step,
                "training": training,
                "prompts": prompts,
                "completions": completions,
                "rewards": values,
            }
        )
        return values


def main() -> None:
    trainer_name, out = sys.argv[1], Path(sys.argv[2])
    sharded = sys.argv[3:] == ["sharded"]  # under a ZeRO-3 launch: sharded reward models beside whole ones
    if sharded:
        from trl import GRPOConfig  # the run's ZeRO-3 config is active once the training arguments exist

        GRPOConfig(output_dir=str(out / "run"), num_generations=4, **COMMON)
    calls: list[dict] = []
    rewards = [Recorded(r, calls) for r in (build_sharded_rewards() if sharded else build_rewards())]
    policy, tokenizer = tiny_model("tiny-policy")
    dataset = Dataset.from_list([{"prompt": row["prompt"]} for row in bundled_prompts()[:16]])
    if trainer_name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        # and an evaluation after each step, on 3 prompts: 12 completions over 2 processes in batches of 4
        args = GRPOConfig(
            output_dir=str(out / "run"), num_generations=4, max_completion_length=8, eval_strategy="steps",
            eval_steps=1, per_device_eval_batch_size=2, **COMMON,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=rewards,
            args=args,
            train_dataset=dataset,
            eval_dataset=dataset.select(range(3)),
            processing_class=tokenizer,
        )
    elif trainer_name == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(
            output_dir=str(out / "run"), num_generations=4, max_completion_length=8, beta=0.0, **COMMON
        )
        trainer = RLOOTrainer(
            model=policy, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    elif trainer_name == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(output_dir=str(out / "run"), max_new_tokens=8, **COMMON)
        trainer = OnlineDPOTrainer(
            model=policy, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer
        )
    else:
        raise SystemExit(f"unknown trainer {trainer_name!r}")
    for reward in rewards:
        reward.trainer = trainer
    trainer.train()
    rank = trainer.accelerator.process_index
    (out / f"calls{rank}.json").write_text(json.dumps(calls))
    if sharded:  # what each process holds of each reward model
        from rh_trl.engines.zero3 import parameter_bytes

        memory = {r.__name__: parameter_bytes(r.reward.engine.module) for r in rewards}
        (out / f"memory{rank}.json").write_text(json.dumps(memory))
    if rank == 0:
        history = {
            "log_history": trainer.state.log_history,
            "num_processes": trainer.accelerator.num_processes,
        }
        (out / "log_history.json").write_text(json.dumps(history))


if __name__ == "__main__":
    main()
