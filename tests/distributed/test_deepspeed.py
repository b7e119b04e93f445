"""The recipes on two CPU processes with DeepSpeed ZeRO-2 and ZeRO-3 (DS_ACCELERATOR=cpu), against the same runs
with DDP (gloo): the trained weights and the logged rewards agree.

ZeRO reduces gradients in other buckets and orders than DDP, so float32 results differ in the last bits; after
the few steps here, every trained weight agrees with the DDP run's to 1e-4 and every logged reward to 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from rh_trl.models.loading import offline_model

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
pytest.importorskip(
    "deepspeed", reason="the DeepSpeed tests need deepspeed (pip install 'rh_trl[deepspeed]')"
)

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = {
    "ddp": ROOT / "configs/accelerate/cpu_ddp.yaml",
    "zero2": ROOT / "configs/accelerate/cpu_zero2.yaml",
    "zero3": ROOT / "configs/accelerate/cpu_zero3.yaml",
}
#: recipe → (config, extra arguments: few steps, so that the whole matrix stays within minutes)
RECIPES = {
    "train_bt": ("configs/bt/tiny.yaml", ["--eval_before_training", "false"]),
    "train_pairwise": ("configs/pairwise/tiny.yaml", ["--max_steps", "4", "--eval_before_training", "false"]),
    "grpo": ("configs/grpo/tiny.yaml", []),
    "online_dpo": ("configs/online_dpo/tiny.yaml", []),
}
TOLERANCE = 1e-4
#: the offline model each recipe starts from
STARTS = {"train_bt": "rh_trl:tiny-rm", "train_pairwise": "rh_trl:tiny-policy", "grpo": "rh_trl:tiny-policy",
          "online_dpo": "rh_trl:tiny-policy"}  # fmt: skip


@cache
def run(recipe: str, mode: str, root: str) -> Path:
    """The recipe's output directory after one run with ``mode``'s accelerate config (each run once per session)."""
    config, extra = RECIPES[recipe]
    out = Path(root) / f"{recipe}-{mode}"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE[mode]),
        "--main_process_port", "0", str(ROOT / "recipes" / f"{recipe}.py"), "--config", str(ROOT / config),
        "--output_dir", str(out), *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{recipe} under {mode}:\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights saved in {folder}"
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def logged_rewards(folder: Path) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [value for log in history for key, value in sorted(log.items()) if key.startswith("rewards/")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("deepspeed-runs"))


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_under_deepspeed_matches_ddp(recipe, mode, root):
    ddp, zero = weights(run(recipe, "ddp", root)), weights(run(recipe, mode, root))
    assert zero.keys() == ddp.keys()
    worst = max((zero[k].float() - ddp[k].float()).abs().max().item() for k in ddp)
    assert worst <= TOLERANCE, f"{recipe}: a weight differs from the DDP run's by {worst}"
    start = offline_model(STARTS[recipe])[
        0
    ].state_dict()  # and the runs trained: weights moved from the start
    assert max((ddp[k].float() - start[k].float()).abs().max().item() for k in ddp if k in start) > 1e-6
    if recipe in ("grpo", "online_dpo"):
        reference, got = logged_rewards(run(recipe, "ddp", root)), logged_rewards(run(recipe, mode, root))
        assert got and len(got) == len(reference)
        assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) <= TOLERANCE


def launch_worker(worker: str, *args: str) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE["zero3"]),
        "--main_process_port", "0", str(ROOT / "tests" / "distributed" / worker), *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]


def test_sharded_reward_models_equal_whole_copies(tmp_path):
    """ORM, PRM and PairwisePM with zero3=True on uneven shares (one micro-batch per sequence: the processes run 4
    and 5 passes, then 9 and none) against the same models whole."""
    launch_worker("lockstep_worker.py", "sharded", str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        for name in ("orm", "prm", "pairpm"):
            for shares in ("uneven", "lopsided"):
                sharded, whole = result[f"{name}_sharded"][shares], result[f"{name}_whole"][shares]
                assert len(sharded) == len(whole)
                assert all(abs(s - w) <= 1e-5 for s, w in zip(sharded, whole, strict=True)), (name, shares)
    assert len(results[0]["orm_sharded"]["lopsided"]) == 9 and results[1]["orm_sharded"]["lopsided"] == []
    error = results[0]["score_error"]["error"]
    assert error.startswith("RuntimeError: this reward model is sharded over the processes (zero3=True)"), (
        error
    )


def test_sharded_rewards_in_a_zero3_grpo_run(tmp_path):
    """A ZeRO-3 GRPO run scoring with each reward model sharded and whole: the same rewards at every call, and each
    process holding half of a sharded model's parameters."""
    launch_worker("trainer_worker.py", "grpo", str(tmp_path), "sharded")
    for rank in range(2):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        by_call: dict[tuple[int, str], dict[str, list]] = {}
        for call in calls:
            family, kind = call["reward"].rsplit("_", 1)
            by_call.setdefault((call["step"], family), {})[kind] = call["rewards"]
        assert {family for _, family in by_call} == {"orm", "prm", "pairpm"}
        for key, pair in by_call.items():
            assert len(pair["sharded"]) == len(pair["whole"]) > 0
            assert max(abs(s - w) for s, w in zip(pair["sharded"], pair["whole"], strict=True)) <= 1e-5, key
        memory = json.loads((tmp_path / f"memory{rank}.json").read_text())
        for family in ("orm", "prm", "pairpm"):
            held, whole = memory[f"{family}_sharded"]
            assert memory[f"{family}_whole"] == [whole, whole]
            assert held <= 0.51 * whole, (family, held, whole)
