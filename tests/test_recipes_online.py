"""The online RLHF recipes end to end on tiny offline models: GRPO, online DPO, iterative DPO."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import rh_trl
from rh_trl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))


def config(tmp_path: Path, recipe: str, **overrides) -> str:
    settings = yaml.safe_load((ROOT / "configs" / recipe / "tiny.yaml").read_text())
    settings.update(output_dir=str(tmp_path / "out"), **overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


@pytest.mark.slow
def test_grpo_recipe_with_normalized_rewards_and_statistics(tmp_path):
    import grpo

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say something about {w}."}) for w in "abcdefgh"))
    result = grpo.main(
        ["--config", config(tmp_path, "grpo", dataset_path=str(prompts), offload_rewards=True)]
    )
    logs = [h for h in result["log_history"] if "rewards/tiny_rm/mean" in h]
    assert len(logs) == 2 and result["reward_names"] == ["tiny_rm"]
    for h in logs:
        assert abs(h["rewards/tiny_rm/mean"]) <= 5.0  # normalized and clipped
        assert h["reward_stats/tiny_rm/p10"] <= h["reward_stats/tiny_rm/p50"] <= h["reward_stats/tiny_rm/p90"]
        assert math.isfinite(h["reward_norm/tiny_rm/running_std"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_online_dpo_recipe(tmp_path):
    pytest.importorskip("trl.experimental.online_dpo")
    import online_dpo

    result = online_dpo.main(["--config", config(tmp_path, "online_dpo")])
    assert any("loss" in h or "train_loss" in h for h in result["log_history"])
    assert result["reward_names"] == ["tiny_rm"]


@pytest.mark.slow
def test_iterative_dpo_pairs_best_and_worst_and_resumes(tmp_path):
    import iterative_dpo

    cfg = config(tmp_path, "iterative_dpo", max_prompts=4)
    result = iterative_dpo.main(["--config", cfg])
    out = tmp_path / "out"
    assert [it["iteration"] for it in result["iterations"]] == [0, 1]
    assert result["final_model"] == str(out / "iter_1" / "model")

    # pairs are the best and the worst response of each prompt, with scores an independent ORM reproduces
    model, tokenizer = tiny_model("tiny-rm")
    reference = rh_trl.ORM(model, tokenizer, name="reference_tiny_rm")
    samples = [json.loads(line) for line in (out / "iter_0" / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (out / "iter_0" / "pairs.jsonl").read_text().splitlines()]
    by_prompt = {json.dumps(p["prompt"]): p for p in pairs}
    for s in samples:
        completions = [[{"role": "assistant", "content": r}] for r in s["responses"]]
        want = reference.score([s["prompt"]] * len(completions), completions)
        assert max(abs(a - b) for a, b in zip(s["scores"], want, strict=False)) < 1e-5
        pair = by_prompt.get(json.dumps(s["prompt"]))
        if max(want) - min(want) > 1e-6:
            assert pair["chosen"][0]["content"] == s["responses"][want.index(max(want))]
            assert pair["rejected"][0]["content"] == s["responses"][want.index(min(want))]

    # a run stopped inside iteration 1 resumes there: iteration 0 is skipped, its samples are reused
    stamp = (out / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns
    (out / "iter_1" / "DONE").unlink()
    samples_1 = (out / "iter_1" / "samples.jsonl").read_text()
    again = iterative_dpo.main(["--config", cfg])
    assert (out / "iter_0" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / "iter_1" / "samples.jsonl").read_text() == samples_1
    assert (out / "iter_1" / "DONE").is_file() and again["iterations"][0] == result["iterations"][0]


@pytest.mark.slow
def test_grpo_recipe_under_accelerate_launch(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
        str(ROOT / "recipes" / "grpo.py"), "--config", config(tmp_path, "grpo", max_steps=1),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
