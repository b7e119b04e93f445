"""Shared by the PPO tests (``-m ppo``): the documentation's blocks, a real ``rh-trl serve`` process, tiny saved
models."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def docs_block(marker: str, page: str = "docs/ppo.md") -> str:
    """The fenced block that follows ``<!-- marker -->`` on a documentation page (what it tells users to run)."""
    text = (ROOT / page).read_text()
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    assert match, f"{page} has no fenced block after <!-- {marker} -->"
    return match.group(1)


class ServeProcess:
    """``rh-trl serve --config CONFIG --port PORT`` in a subprocess (the command line users run), its log kept."""

    def __init__(self, config: str | Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rh_trl.cli", "serve", "--config", str(config), "--port", str(port)],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rh-trl serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rh-trl serve did not come up in 120 s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metrics(self, name: str) -> dict:
        return httpx.get(self.url + "/metrics/json").json()["rewards"][name]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def save_tiny_prm(path: Path) -> Path:
    """An RLHFlow-style next-token PRM (Llama-style tokenizer, random causal LM) saved where ``rh_trl.load`` reads
    it: it has no reward for an empty response (no steps), as real PRMs do."""
    from rh_trl.testing import bpe_tokenizer, tiny_causal_lm

    tokenizer = bpe_tokenizer("llama")
    tiny_causal_lm(tokenizer, seed=12).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
