"""The README's "Try it in Python, offline" script runs as written, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .ppo_support import ROOT, docs_block


@pytest.mark.slow
def test_try_it_in_python_script_runs_as_written(tmp_path):
    script = tmp_path / "try_it.py"
    script.write_text(docs_block("try-it-in-python", "README.md"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(re.findall(r"^(drsow|orm) mean reward per step: (\[.*\])$", done.stdout, re.MULTILINE))
    assert set(printed) == {"drsow", "orm"}, done.stdout[-2000:]
    means = {name: [float(v) for v in values.strip("[]").split(",")] for name, values in printed.items()}
    assert len(means["drsow"]) == len(means["orm"]) == 5  # one per step
    # the scales docs/getting-started.md's "Mixing rewards of different scales" states: DrSow about +20, ORM about -5
    assert 10 < sum(means["drsow"]) / 5 < 40 and -8 < sum(means["orm"]) / 5 < -2
