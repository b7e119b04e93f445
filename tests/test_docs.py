"""The documentation's Python code blocks run as written, page by page, offline.

Each page's blocks run in order in one namespace (a later block may use an earlier one's names), in a fresh
interpreter in a temporary directory. A block that needs what these tests cannot have (a GPU, a hub model, a
server, a trained checkpoint) follows a ``<!-- skip: why -->`` line and is left out, with that reason; any other
block must run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(?:<!-- skip: (?P<skip>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)\n```", re.DOTALL)


def python_blocks(page: Path) -> list[tuple[str, str | None]]:
    """``(code, skip reason or None)`` for each Python block of ``page``."""
    return [(m["code"], m["skip"]) for m in BLOCK.finditer(page.read_text())]


PAGES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def test_every_page_with_code_is_collected():
    assert len(PAGES) >= 5 and all(p.is_relative_to(DOCS) for p in PAGES)
    skipped = [(p.name, why) for p in PAGES for _, why in python_blocks(p) if why is not None]
    assert all(why.strip() for _, why in skipped), "a skipped block must say why"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_code_blocks_run(page, tmp_path):
    blocks = python_blocks(page)
    runnable = [code for code, skip in blocks if skip is None]
    if not runnable:
        pytest.skip("; ".join(sorted({skip for _, skip in blocks if skip})))
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(runnable) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, f"{page.relative_to(ROOT)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
