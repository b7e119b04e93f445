"""GRPO, RLOO and online DPO on two processes (accelerate, gloo): each reward call, put back together from the
processes' shares, equals one process scoring it whole, and the logged statistics are those of every completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import trainer_worker as worker

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
#: win probabilities agree to 1e-6; the ORM's logits (around -5) to float32's rounding of other batch shapes
TOLERANCE = {"pairpm": 1e-6, "judge": 1e-6, "listwise": 1e-6, "orm": 1e-5}


def run_trainer(trainer: str, out: Path) -> tuple[list[list[dict]], dict]:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs/accelerate/cpu_ddp.yaml"), "--main_process_port", "0", str(Path(worker.__file__)),
        trainer, str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    calls = [json.loads((out / f"calls{rank}.json").read_text()) for rank in range(2)]
    return calls, json.loads((out / "log_history.json").read_text())


def whole_calls(calls: list[list[dict]]) -> list[dict]:
    """Each reward call with every process's share joined in rank order."""
    joined = []
    assert len(calls[0]) == len(calls[1]) > 0
    for first, second in zip(*calls, strict=True):
        assert (first["reward"], first["step"], first["training"]) == (
            second["reward"], second["step"], second["training"]
        )  # fmt: skip
        joined.append(
            {
                "reward": first["reward"],
                "step": first["step"],
                "training": first["training"],
                **{key: first[key] + second[key] for key in ("prompts", "completions", "rewards")},
            }
        )
    return joined


def _maxima(values: list[float]) -> list[float]:
    """The maximum of each evaluation call (4 completions each): TRL averages a metric over an evaluation's calls."""
    return [max(values[k : k + 4]) for k in range(0, len(values), 4)]


@pytest.fixture(scope="module")
def alone():
    return {reward.__name__: reward for reward in worker.build_rewards()}


@pytest.mark.parametrize("trainer", ["grpo", "rloo", "online_dpo"])
def test_rewards_on_two_processes_equal_one_process(tmp_path, alone, trainer):
    calls, history = run_trainer(trainer, tmp_path)
    assert history["num_processes"] == 2
    split_groups = 0
    for call in whole_calls(calls):
        reward = alone[call["reward"]]
        expected = reward(prompts=call["prompts"], completions=call["completions"])
        got = call["rewards"]
        assert [g is None for g in got] == [e is None for e in expected]
        tolerance = TOLERANCE[call["reward"]]
        assert max(abs(g - e) for g, e in zip(got, expected, strict=True) if g is not None) <= tolerance
        half = len(calls[0][0]["prompts"])
        split_groups += any(p in call["prompts"][half:] for p in call["prompts"][:half])
    if (
        trainer != "online_dpo"
    ):  # GRPO and RLOO spread each group over the processes; online DPO keeps pairs local
        assert split_groups == len(whole_calls(calls))

    if trainer == "online_dpo":  # no log_metric there: the numbers are in last_stats, checked above
        return
    if trainer == "grpo":  # it also evaluated after each step: three calls of one whole group each
        evaluations = [c for c in whole_calls(calls) if not c["training"]]
        assert len(evaluations) == 2 * 3 * len(worker.build_rewards())
        logged_eval = [log for log in history["log_history"] if "eval_reward_stats/orm/min" in log]
        for log, k in zip(logged_eval, (0, 3), strict=True):
            values = [v for c in evaluations if c["reward"] == "orm" for v in c["rewards"]][
                4 * k : 4 * k + 12
            ]
            assert log["eval_reward_stats/orm/max"] == pytest.approx(np.mean(_maxima(values)), abs=1e-5)
    logged = [log for log in history["log_history"] if "reward_stats/orm/min" in log]
    orm_calls = [c for c in whole_calls(calls) if c["reward"] == "orm" and c["training"]]
    assert len(logged) == len(orm_calls) == 2
    for log, call in zip(logged, orm_calls, strict=True):
        values = np.array(call["rewards"], dtype=np.float64)
        assert log["reward_stats/orm/min"] == pytest.approx(values.min(), abs=1e-5)
        assert log["reward_stats/orm/max"] == pytest.approx(values.max(), abs=1e-5)
        assert log["reward_stats/orm/mean"] == pytest.approx(values.mean(), abs=1e-5)
        assert log["reward_stats/orm/std"] == pytest.approx(values.std(), abs=1e-5)
        assert log["reward_stats/orm/p50"] == pytest.approx(np.median(values), abs=1e-5)
        assert log["orm/max"] == pytest.approx(values.max(), abs=1e-5)
        assert log["pairpm/num_comparisons"] == len(values) // 4 * 12  # 4 per group: 12 ordered comparisons
