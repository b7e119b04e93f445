"""TRL's colocated vLLM beside rh_trl's vLLM rewards in one process, and the process-level rules of in-process engines:
the memory split, the ``__main__`` guard, and a clean exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import rh_trl
from rh_trl.engines import vllm_llm
from rh_trl.integrations.trl_vllm import prepare_colocate
from tests.conftest import CONV_COMPLETIONS, CONV_PROMPTS
from tests.vllm.conftest import ENGINE_KWARGS

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("colocate_worker.py")


@pytest.fixture(scope="module", autouse=True)
def no_servers(servers):
    servers.only()  # nothing here needs a server: their memory goes to the engines started here


def run_python(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def test_grpo_with_trl_colocated_vllm_and_a_vllm_reward_in_one_process(tmp_path, checkpoints):
    done = run_python([str(WORKER), str(checkpoints.strong), str(checkpoints.orm), str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["reward_engine"] == "VLLMPoolingEngine"
    # TRL's weight sync reaches the colocated engine: at every step the engine sampled with the policy's current
    # weights (TRL logs how far its sampling log-probs are from the trainer's), and after a last sync it computes
    # what the trained policy computes, within the two engines' numeric difference (2e-3 before training), while
    # training moved the log-probs a hundred times more than that
    differences = [
        log["sampling/sampling_logp_difference/max"] for log in result["log_history"] if "loss" in log
    ]
    assert len(differences) == 3 and max(differences) <= 0.05, differences
    assert result["engine_vs_hf_before"] <= 0.01, result["engine_vs_hf_before"]
    assert result["sync_diff"] <= 0.05 and result["training_moved"] >= 100 * result["engine_vs_hf_before"], (
        result
    )
    # every reward the vLLM reward gave inside the run equals the transformers engine on the same completions
    hf = rh_trl.ORM(str(checkpoints.orm), name="orm")
    assert len(result["calls"]) == 3
    for call in result["calls"]:
        expected = hf.score(call["prompts"], call["completions"])
        assert max(abs(a - b) for a, b in zip(call["rewards"], expected, strict=True)) <= 1e-4
    logged = [log for log in result["log_history"] if "rewards/orm/mean" in log]
    assert len(logged) == 3


def test_a_memory_split_over_the_whole_accelerator_is_refused_before_anything_starts(
    checkpoints, monkeypatch
):
    """On a GPU (the CPU build sizes its KV cache by VLLM_CPU_KVCACHE_SPACE and is not checked)."""
    assert not vllm_llm.splits_accelerator_memory()
    monkeypatch.setattr(vllm_llm, "splits_accelerator_memory", lambda: True)
    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.7)
    try:
        prepare_colocate(args)
        with pytest.raises(
            ValueError, match=r"colocated vLLM engine .* 0\.7 \+ orm \(rh_trl, being built\) 0\.4 = 1\.1 > 1"
        ):
            rh_trl.ORM(
                str(checkpoints.orm),
                engine="vllm",
                vllm_kwargs={**ENGINE_KWARGS, "gpu_memory_utilization": 0.4},
            )
    finally:
        vllm_llm._reserved.clear()


def test_an_engine_built_outside_the_main_guard_is_a_clear_error(tmp_path, checkpoints):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""\
            import rh_trl
            rm = rh_trl.ORM({str(checkpoints.orm)!r}, engine="vllm", vllm_kwargs={ENGINE_KWARGS!r})
            print(rm.score(["Hi"], ["Hello"]))
        """)
    )
    done = run_python([str(script)], tmp_path, timeout=300)
    assert done.returncode != 0
    assert "unguarded.py, line 2: a vLLM engine is built at the top level of the script" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
    assert "bootstrapping phase" not in done.stderr


def test_a_script_with_an_in_process_engine_exits_cleanly(tmp_path, checkpoints):
    """The engines still running at exit are shut down first: exit status 0, no abort at interpreter exit."""
    script = tmp_path / "guarded.py"
    script.write_text(
        textwrap.dedent(f"""\
            import rh_trl

            def main():
                rm = rh_trl.ORM({str(checkpoints.orm)!r}, engine="vllm", vllm_kwargs={ENGINE_KWARGS!r})
                print("rewards", rm.score({CONV_PROMPTS!r}, {CONV_COMPLETIONS!r}))

            if __name__ == "__main__":
                main()
        """)
    )
    done = run_python([str(script)], tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rewards [" in done.stdout and "terminate called" not in done.stderr
