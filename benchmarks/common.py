"""Shared pieces of the benchmarks: synthetic GRPO-like batches, peak-memory measurement, and results written as
JSON for the documentation's plots (``--json``; ``docs/gen_benchmark_plots.py`` draws ``benchmarks/results/``)."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rh_trl.testing import bundled_prompts

#: model shapes (random weights) of the engine benchmarks' ``--preset``; "tiny" runs anywhere, the others on a GPU
MODEL_PRESETS = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4},
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
}  # fmt: skip


def lognormal_lengths(n: int, median: int, max_len: int, sigma: float = 0.9, seed: int = 0) -> list[int]:
    """``n`` completion lengths, lognormal around ``median``, clipped to ``[16, max_len]``; the longest is set
    to ``max_len`` so every batch has the long straggler that GRPO batches have."""
    rng = random.Random(seed)
    lengths = [min(max_len, max(16, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]
    lengths[max(range(n), key=lengths.__getitem__)] = max_len
    return lengths


def synthetic_completions(tokenizer: Any, lengths: list[int], seed: int = 0) -> list[str]:
    """One text per requested length, of exactly that many tokens for byte-level BPE tokenizers: words drawn
    from the bundled prompts, each a whole number of tokens after a space."""
    rng = random.Random(seed)
    words = sorted(
        {w for row in bundled_prompts() for m in row["prompt"] for w in m["content"].split() if w.isalpha()}
    )
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    texts = []
    for n in lengths:
        parts, used = [], 0
        while used < n:
            word = rng.choice(words)
            parts.append(" " + word)
            used += cost[word]
        texts.append("".join(parts))
    return texts


def conversational_batch(tokenizer: Any, lengths: list[int], group_size: int = 8, seed: int = 0):
    """TRL conversational prompts (each repeated ``group_size`` times, as GRPO does) and completions."""
    rows = bundled_prompts()
    prompts = [rows[(i // group_size) % len(rows)]["prompt"] for i in range(len(lengths))]
    completions = [
        [{"role": "assistant", "content": t}] for t in synthetic_completions(tokenizer, lengths, seed)
    ]
    return prompts, completions


@dataclass
class Measured:
    value: Any
    seconds: float
    peak_mb: float


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(fn: Callable[[], Any], device: torch.device) -> Measured:
    """Run ``fn`` once; wall time and peak memory above the starting point (GPU: allocated; CPU: resident)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with contextlib.suppress(OSError):  # reset the resident-set high-water mark (Linux)
            Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kb("VmRSS") * 1024
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kb("VmHWM") * 1024
    return Measured(value, seconds, max(0, peak - base) / 2**20)


def write_result(
    path: str | os.PathLike, benchmark: str, baseline: str, rows: list[dict[str, Any]], **context: Any
) -> None:
    """Write a benchmark's result: ``rows`` of ``{"path", "seconds", "ratio", …}`` (``ratio``: how many times
    faster than ``baseline``), with the date, the machine and ``context``."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    result = {
        "benchmark": benchmark,
        "baseline": baseline,
        "date": datetime.date.today().isoformat(),
        "machine": f"{device}, {platform.machine()}",
        **context,
        "rows": rows,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def start_vllm_serve(
    path: Path,
    served_name: str,
    log: Path,
    *,
    dtype: str,
    max_model_len: int,
    gpu_memory_utilization: float,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str]:
    """Start ``vllm serve`` for the checkpoint at ``path`` on a free local port (output to ``log``) and wait until
    ``/health`` answers; returns the process and its base URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization), *extra,
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"vllm serve did not start within 15 minutes; see {log}")
