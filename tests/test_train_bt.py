"""The Bradley-Terry recipe on tiny models: single process and two CPU processes; the output loads into ORM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rh_trl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

PROMPTS = [[{"role": "user", "content": "Name three things related to coffee."}]] * 2
COMPLETIONS = [
    [{"role": "assistant", "content": "Sure. coffee three things."}],
    [{"role": "assistant", "content": "No."}],
]


@pytest.mark.slow
def test_train_bt_single_process_then_orm(tmp_path):
    import train_bt

    summary = train_bt.main(["--config", str(ROOT / "configs/bt/tiny.yaml"), "--output_dir", str(tmp_path)])
    assert summary["eval_accuracy"] > 0.9  # the synthetic signal is easy
    assert summary["eval_accuracy_before_training"] < summary["eval_accuracy"] - 0.2
    assert 0.0 <= summary["eval_accuracy_shorter_reply"] <= 1.0
    reward = rh_trl.ORM(str(tmp_path), dtype="float32", device="cpu")
    assert reward.norm == pytest.approx((summary["reward_mean"], summary["reward_std"]))
    normalized = reward.score(PROMPTS, COMPLETIONS)
    raw = rh_trl.ORM(str(tmp_path), dtype="float32", device="cpu", normalize=False).score(
        PROMPTS, COMPLETIONS
    )
    mean, std = summary["reward_mean"], summary["reward_std"]
    assert normalized == pytest.approx([(r - mean) / std for r in raw], abs=1e-5)
    assert normalized[0] > normalized[1]


@pytest.mark.slow
def test_train_bt_two_cpu_processes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
        str(ROOT / "recipes/train_bt.py"), "--config", str(ROOT / "configs/bt/tiny.yaml"), "--output_dir", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "bt_summary.json").read_text())
    assert summary["train_pairs"] == 72 and summary["num_processes"] == 2
    scores = rh_trl.ORM(str(tmp_path), dtype="float32", device="cpu").score(PROMPTS, COMPLETIONS)
    assert scores[0] > scores[1]


@pytest.mark.slow
def test_eval_rm_recipe(tmp_path):
    import eval_rm

    rows = [
        {"prompt": "Q?", "chosen": "a fine long answer", "rejected": "no"},
        {"prompt": "Q?", "chosen": "ok", "rejected": "a long rambling answer"},
    ]
    data = tmp_path / "mini.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    report = eval_rm.main(
        [
            "--baseline",
            "shorter",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path / "m.png"),
        ]
    )
    assert report["accuracy"] == 0.5  # the shorter reply is chosen in one pair of two
    assert report["subsets"] == {
        tmp_path.name: {"n": 2, "accuracy": 0.5}
    }  # a lone file is named by its folder
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == 0.5
    assert (tmp_path / "m.png").stat().st_size > 0
    tiny = eval_rm.main(["--model", "rh_trl:tiny-rm", "--data", str(data)])
    assert tiny["scored"] == 2


def test_rh_trl_eval_command_matches_python_scores(tmp_path, capsys):
    from rh_trl.cli import main
    from rh_trl.rewards.factory import build_reward

    rows = [
        {"prompt": f"Question {i}?", "chosen": "yes " * (i + 1), "rejected": "no, because " * (5 - i)}
        for i in range(5)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        main(["eval", "--model", "rh_trl:tiny-rm", "--data", str(data), "--output", str(tmp_path / "r.json")])
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())

    reward = build_reward({"type": "orm", "model": "rh_trl:tiny-rm"})
    prompts = [r["prompt"] for r in rows]
    chosen = reward.score(prompts, [r["chosen"] for r in rows])
    rejected = reward.score(prompts, [r["rejected"] for r in rows])
    expected = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)
    assert report["accuracy"] == expected
    assert report["scored"] == 5
    assert "accuracy" in capsys.readouterr().out
