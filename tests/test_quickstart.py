"""The quickstart trains a tiny policy whose reward-model score rises; the CLI runs it."""

from __future__ import annotations

from rh_trl import quickstart
from rh_trl.cli import build_parser


def test_quickstart_reward_rises(tmp_path):
    result = quickstart.run(steps=30, output_dir=str(tmp_path), progress=False)
    assert len(result.rewards) == 30
    assert result.improvement > 1.0  # GRPO pushed the reward model's score up
    assert "reward-model score" in quickstart.report(result)


def test_cli_parses_quickstart():
    args = build_parser().parse_args(["quickstart", "--steps", "3"])
    assert args.steps == 3 and args.handler.__name__ == "_quickstart"
