"""``rh-trl quickstart`` trains a tiny policy whose reward-model score rises, writes the policy and the reward curve
to the directory it prints, and prints nothing else."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rh_trl.cli import build_parser
from rh_trl.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_command_trains_writes_its_outputs_and_prints_only_its_report(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "rh_trl.cli", "quickstart", "--steps", "30", "--output-dir", str(out)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # stderr holds the progress bar and nothing else (no warnings, no blank lines from tokenizer training)
    leftover = [
        part for part in re.split(r"[\r\n]+", done.stderr) if part.strip() and not part.startswith("GRPO:")
    ]
    assert not leftover, leftover
    curve = json.loads((out / "reward_curve.json").read_text())["mean_per_step"]
    first, last = sum(curve[:7]) / 7, sum(curve[-7:]) / 7
    assert len(curve) == 30 and last - first > 1.0  # GRPO pushed the reward model's score up
    files = [out / "policy", out / "reward_curve.json"]
    if importlib.util.find_spec("matplotlib"):
        files.append(out / "reward_curve.png")
        assert (out / "reward_curve.png").read_bytes().startswith(b"\x89PNG")
    assert done.stdout.splitlines() == [
        "GRPO with rh_trl.ORM (tiny_rm) for 30 steps",
        f"  reward-model score, mean of first 7 steps: {first:+.3f}",
        f"  reward-model score, mean of last 7 steps:  {last:+.3f}  (change {last - first:+.3f})",
        *(f"  wrote {path}" for path in files),
    ]
    trained = AutoModelForCausalLM.from_pretrained(out / "policy")
    initial, tokenizer = tiny_model("tiny-policy")
    assert AutoTokenizer.from_pretrained(out / "policy").get_vocab() == tokenizer.get_vocab()
    assert not torch.equal(
        trained.lm_head.weight, initial.lm_head.weight
    )  # the saved policy is the trained one


def test_cli_parses_quickstart():
    args = build_parser().parse_args(["quickstart", "--steps", "3"])
    assert args.steps == 3 and args.handler.__name__ == "_quickstart"
