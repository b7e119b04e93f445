"""Rewards on two processes, as a trainer calls them: whole groups, statistics of every completion, no hang.

Each test starts two real processes (torchrun, gloo) running tests/distributed/lockstep_worker.py, and compares
what each process returned with this process scoring the whole call alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.distributed import lockstep_worker as worker

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(worker.__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, tmp_path: Path, timeout: float = 300, **env: str) -> list[dict]:
    """Run the worker's ``scenario`` on two processes; return each process's result, rank order."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(WORKER), scenario, str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def alone():
    """The same rewards in this process, scoring the whole call."""
    return worker.build_rewards()


def test_whole_groups_and_statistics_equal_one_process(tmp_path, alone):
    results = launch("groups", tmp_path)
    prompts, completions = worker.whole_call()
    for name in ("pairpm", "judge", "listwise", "stats", "normalized"):
        joined = [results[0][name]["rewards"][k] + results[1][name]["rewards"][k] for k in range(2)]
        expected = [
            alone[name](prompts=prompts, completions=completions) for _ in range(2)
        ]  # 2 calls: the normalizer moves
        for got, want in zip(joined, expected, strict=True):
            assert [g is None for g in got] == [w is None for w in want], name
            assert max(abs(g - w) for g, w in zip(got, want, strict=True) if g is not None) <= 1e-6, name

    # what each process logged describes every completion: both log the same numbers, those of the whole call
    for name, prefix in (
        ("pairpm", "pairpm"),
        ("stats", "reward_stats/orm"),
        ("normalized", "reward_norm/orm_norm"),
    ):
        m0, m1 = results[0][name]["metrics"][0], results[1][name]["metrics"][0]
        assert m0.keys() == m1.keys() and m0, name
        for key in m0:
            if not key.endswith("/seconds"):
                assert m0[key] == pytest.approx(m1[key], abs=1e-9), key
        assert any(key.startswith(prefix) for key in m0), (name, sorted(m0))

    values = np.array(alone["stats"].reward.score(prompts, completions), dtype=np.float64)
    stats = results[0]["stats"]["metrics"][0]
    assert stats["reward_stats/orm/min"] == pytest.approx(values.min(), abs=1e-6)
    assert stats["reward_stats/orm/max"] == pytest.approx(values.max(), abs=1e-6)
    assert stats["reward_stats/orm/mean"] == pytest.approx(values.mean(), abs=1e-6)
    assert stats["reward_stats/orm/std"] == pytest.approx(values.std(), abs=1e-6)
    assert stats["reward_stats/orm/p90"] == pytest.approx(np.quantile(values, 0.9), abs=1e-6)
    assert stats["orm/num_none"] == 0 and stats["orm/mean"] == pytest.approx(values.mean(), abs=1e-6)
    listwise = results[0]["listwise"]["metrics"][0]
    assert listwise["listwise/num_judge_calls"] == 3  # one call per prompt's whole group, over both processes
    assert all(r is not None for share in results for r in share["listwise"]["rewards"][0])
    pm = results[0]["pairpm"]["metrics"][0]
    assert pm["pairpm/num_comparisons"] == 3 * (3 * 2)  # every ordered comparison of the call, counted once
    assert pm["pairpm/num_comparisons"] == alone["pairpm"].last_stats["num_comparisons"]
    norm = results[1]["normalized"]["metrics"][1]
    assert norm["reward_norm/orm_norm/running_mean"] == pytest.approx(
        alone["normalized"].moments.mean, abs=1e-9
    )


def test_a_share_with_no_completion(tmp_path, alone):
    results = launch("empty_share", tmp_path)
    prompts, completions = worker.whole_call()
    assert results[1]["rewards"] == []
    expected = alone["pairpm"].score(prompts, completions)
    assert max(abs(g - w) for g, w in zip(results[0]["rewards"], expected, strict=True)) <= 1e-6
    m0, m1 = results[0]["metrics"], results[1]["metrics"]
    assert m0.keys() == m1.keys()
    assert all(m0[k] == pytest.approx(m1[k], abs=1e-9) for k in m0 if not k.endswith("/seconds"))
    assert m1["pairpm/num_comparisons"] == 3 * (3 * 2)  # the empty share logs the whole call's numbers


def test_score_on_one_process_does_not_wait(tmp_path, alone):
    results = launch("score_on_one", tmp_path, timeout=120)
    prompts, completions = worker.whole_call()
    got = results[0]["rewards"]
    assert got["pairpm"] == pytest.approx(alone["pairpm"].score(prompts, completions), abs=1e-6)
    assert got["normalized"] == pytest.approx(
        alone["normalized"](prompts=prompts, completions=completions), abs=1e-6
    )
    assert got["stats"] == pytest.approx(alone["stats"](prompts=prompts, completions=completions), abs=1e-6)
    assert results[1]["rewards"] == {}


def test_a_trainer_call_on_one_process_is_an_error_not_a_hang(tmp_path):
    results = launch("call_on_one", tmp_path, timeout=120, RH_TRL_RANK_TIMEOUT_S="3")
    error = results[0]["error"]
    assert error and "process(es) [1] did not reach" in error and "within 3 s" in error, error
    assert results[0]["seconds"] < 30


def test_a_failure_on_one_process_is_raised_on_both(tmp_path):
    results = launch("failure_on_one", tmp_path, timeout=120)
    assert results[1]["error"].startswith("RewardInputError: pairpm: got 5 prompts and 4 completions")
    assert "DistributedRewardError: pairpm: call 1 (step 1): process 1 failed" in results[0]["error"]
    assert "got 5 prompts and 4 completions" in results[0]["error"]
    assert results[0]["seconds"] < 30


@pytest.mark.parametrize("scenario", ["other_step", "other_group_size"])
def test_processes_that_disagree_get_a_clear_error(tmp_path, scenario):
    results = launch(scenario, tmp_path, timeout=120)
    for result in results:
        assert "DistributedRewardError" in result["error"] and "is at another call" in result["error"], result
        assert result["seconds"] < 30
    assert "every process must make the same reward calls" in results[0]["error"]
