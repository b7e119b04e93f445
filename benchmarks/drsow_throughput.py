"""rh_trl.DrSow's openai engine against one sequential request per sample, on the same two servers.

Two OpenAI-compatible servers (``python -m rh_trl.testing.openai_compat_server``, each a tiny causal LM with its own
tokenizer, each its own process with one torch thread: the CPU analogue of one GPU per server) stand in for
``vllm serve``. Like vLLM, they score concurrent requests together (continuous batching).

* baseline (RewardHub's pattern): for every sample, one /v1/completions request with prompt_logprobs to the
  strong server, then one to the weak server, waiting for each answer.
* DrSow's openai engine: several sequences per request, many requests in flight, both servers at once; once
  against servers that run one request per forward pass, once against servers that gather the requests that
  arrive while a forward pass runs into the next one.

Three shapes: ``short`` (2 layers x 128 hidden, 256 completions of median 32 tokens, longest 128: short
answers, where each request's fixed cost dominates, as on a GPU where a forward pass costs little per token),
``small`` (2 x 128, 128 completions of median 120 tokens, longest 600) and ``realistic`` (4 x 256, 64 completions
of median 300 tokens, longest 1,500), where CPU forward passes cost far more than the HTTP round trips: there a
2-core machine bounds any client near 2x (the two servers running at once), since a CPU forward pass costs per
token however it is batched. Each client runs ``--repeats`` times, interleaved, and its
fastest run is reported (the cores are shared).

    python benchmarks/drsow_throughput.py                    # all three shapes
    python benchmarks/drsow_throughput.py --shapes small     # one shape
    python benchmarks/drsow_throughput.py --strong-url http://gpu:8001 --weak-url http://gpu:8002 \
        --strong-tokenizer org/aligned --weak-tokenizer org/base   # two running `vllm serve` (launch_drsow.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from common import conversational_batch, lognormal_lengths  # noqa: E402

from rh_trl.formatting import to_sample  # noqa: E402
from rh_trl.rewards.drsow import DrSow  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    median: int
    max_len: int
    num: int


SHAPES = {
    "short": Shape(2, 128, 32, 128, 256),
    "small": Shape(2, 128, 120, 600, 128),
    "realistic": Shape(4, 256, 300, 1500, 64),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", default="short,small,realistic", help=f"comma-separated, from {sorted(SHAPES)}"
    )
    parser.add_argument("--num", type=int, default=None, help="completions per call (default: per shape)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each client; the fastest is reported")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per request (DrSow)")
    parser.add_argument(
        "--max-concurrency", type=int, default=8, help="requests in flight per server (DrSow)"
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="servers' padded tokens per forward"
    )
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of each server process")
    running = parser.add_argument_group("running servers instead of local stand-ins (e.g. two `vllm serve`)")
    running.add_argument("--strong-url", default=None, help="e.g. http://gpu-host:8001")
    running.add_argument("--weak-url", default=None)
    running.add_argument(
        "--strong-tokenizer", default=None, help="the strong model's tokenizer (path or hub id)"
    )
    running.add_argument("--weak-tokenizer", default=None)
    running.add_argument(
        "--strong-model", default=None, help="served model name (default: the server's only one)"
    )
    running.add_argument("--weak-model", default=None)
    running.add_argument("--api-key", default=None)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    model_dir: Path, name: str, log: Path, *, threads: int, max_batch_tokens: int, batch_requests: bool
) -> Iterator[str]:
    """Run ``python -m rh_trl.testing.openai_compat_server`` on ``model_dir`` in a child process; yield its URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "rh_trl.testing.openai_compat_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--port",
        str(port),
        "--torch-threads",
        str(threads),
        "--max-batch-tokens",
        str(max_batch_tokens),
        "--log-level",
        "warning",
    ]
    if not batch_requests:
        command.append("--no-batch-requests")
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"server {name} exited with {process.returncode}:\n{log.read_text()[-2000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start within 180 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sequential(drsow: DrSow, urls: dict[str, str], prompts, completions, headers: dict) -> list[float]:
    """The obvious client: per sample, one request to each server in turn, waiting for each answer."""
    rewards = []
    with httpx.Client(timeout=300, headers=headers) as client:
        for p, c in zip(prompts, completions, strict=True):
            sample = to_sample(p, c)
            total = 0.0
            for side, sign in (("strong", 1.0), ("weak", -1.0)):
                span = drsow.encoders[side].encode(sample)
                ids = span.input_ids[: span.end]
                body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}
                if drsow.engines[side].model is not None:
                    body["model"] = drsow.engines[side].model
                answer = client.post(urls[side] + "/v1/completions", json=body)
                answer.raise_for_status()
                entries = answer.json()["choices"][0]["prompt_logprobs"]
                total += sign * sum(entries[t][str(ids[t])]["logprob"] for t in range(span.start, span.end))
            rewards.append(total)
    return rewards


def server_stats(url: str) -> dict | None:
    """The stand-in server's scheduler counters (``GET /stats``), or None for a server without them."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        answer = httpx.get(url + "/stats", timeout=10)
        if answer.status_code == 200:
            return answer.json()
    return None


def measure(label: str, servers: dict[str, dict[str, str]], make: Any, prompts, completions, args) -> float:
    """Time the sequential client and DrSow against each server pair in ``servers`` (label -> {side: url});
    ``make(urls)`` builds the DrSow. Prints a table; returns sequential / DrSow on the first pair."""
    rewards = {name: make(urls) for name, urls in servers.items()}
    first = next(iter(servers))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    for reward in rewards.values():  # warm-up: every server, both clients
        reward(prompts[:4], completions[:4])
    sequential(rewards[first], servers[first], prompts[:4], completions[:4], headers)

    times = {"sequential": math.inf, **dict.fromkeys(servers, math.inf)}
    diff = 0.0  # largest reward difference from the sequential client, over every run
    for _ in range(args.repeats):  # interleaved; the best of each, since the machine may be shared
        start = time.perf_counter()
        baseline = sequential(rewards[first], servers[first], prompts, completions, headers)
        times["sequential"] = min(times["sequential"], time.perf_counter() - start)
        for name, reward in rewards.items():
            before_run = {side: server_stats(url) for side, url in servers[name].items()}
            start = time.perf_counter()
            scores = reward(prompts, completions)
            times[name] = min(times[name], time.perf_counter() - start)
            if name == first:
                before, after = before_run, {side: server_stats(url) for side, url in servers[name].items()}
            diff = max(diff, *(abs(x - y) for x, y in zip(scores, baseline, strict=True)))  # type: ignore[operator]
    tokens = sum(
        len(rewards[first].encoders["strong"].encode(to_sample(p, c)).input_ids)
        for p, c in zip(prompts, completions, strict=True)
    )
    print(f"\n[{label}] {len(prompts)} conversational completions, {tokens} strong-model tokens")
    print(f"{'client':<66} {'seconds':>8} {'samples/s':>10}")
    drsow_label = f"DrSow openai (batch {args.batch_size}, {args.max_concurrency} in flight)"
    seq = times["sequential"]
    print(f"{'one request per sample and model, sequential':<66} {seq:8.2f} {len(prompts) / seq:10.1f}")
    for name in servers:
        row = f"{drsow_label}, {name}"
        print(f"{row:<66} {times[name]:8.2f} {len(prompts) / times[name]:10.1f}")
    if all(v is not None for v in (*before.values(), *after.values())):
        strong = {
            k: after["strong"][k] - before["strong"][k] for k in after["strong"] if k != "padding_efficiency"
        }
        busy = {side: after[side]["seconds"] - before[side]["seconds"] for side in after}
        print(
            f"strong server, {first}: {strong['sequences']} sequences in {strong['forwards']} forward passes "
            f"({strong['sequences'] / max(1, strong['forwards']):.1f} per pass), padding efficiency "
            f"{strong['real_tokens'] / max(1, strong['padded_tokens']):.2f}; last run's forward passes busy: strong "
            f"{busy['strong']:.2f} s, weak {busy['weak']:.2f} s (no client beats the slower server's time)"
        )
    ratio = times["sequential"] / times[first]
    print(f"max abs reward difference {diff:.2e}; DrSow {ratio:.1f}x faster than sequential")
    return ratio


def run_local(name: str, shape: Shape, args: argparse.Namespace, workdir: Path) -> float:
    """Two stand-in servers per side (gathering concurrent requests, and one request per pass) on tiny models."""
    strong_tok, weak_tok = bpe_tokenizer("llama"), bpe_tokenizer("chatml", vocab_size=400)
    dirs = {"strong": workdir / f"{name}-strong", "weak": workdir / f"{name}-weak"}
    for seed, (side, tok) in enumerate((("strong", strong_tok), ("weak", weak_tok)), start=1):
        tiny_causal_lm(tok, seed=seed, layers=shape.layers, hidden=shape.hidden).save_pretrained(dirs[side])
        tok.save_pretrained(dirs[side])
    prompts, completions = conversational_batch(
        strong_tok, lognormal_lengths(args.num or shape.num, shape.median, shape.max_len)
    )
    options = {"threads": args.server_threads, "max_batch_tokens": args.max_batch_tokens}
    with contextlib.ExitStack() as stack:
        servers = {
            label: {
                side: stack.enter_context(
                    serve(
                        dirs[side],
                        side,
                        workdir / f"{name}-{side}-{batching}.log",
                        batch_requests=batching,
                        **options,
                    )
                )
                for side in ("strong", "weak")
            }
            for label, batching in (("requests batched", True), ("one request per pass", False))
        }

        def make(urls: dict[str, str]) -> DrSow:
            return DrSow(
                urls["strong"],
                urls["weak"],
                strong_tokenizer=strong_tok,
                weak_tokenizer=weak_tok,
                engine="openai",
                batch_size=args.batch_size,
                max_concurrency=args.max_concurrency,
            )

        label = (
            f"{name}: {shape.layers}-layer models, hidden {shape.hidden}, median {shape.median} tokens, max "
            f"{shape.max_len}; two server processes, {args.server_threads} torch thread(s) each"
        )
        return measure(label, servers, make, prompts, completions, args)


def run_remote(name: str, shape: Shape, args: argparse.Namespace) -> float:
    """The same comparison against two running servers (e.g. ``vllm serve`` on GPUs)."""
    from transformers import AutoTokenizer

    toks = {
        side: AutoTokenizer.from_pretrained(getattr(args, f"{side}_tokenizer")) for side in ("strong", "weak")
    }
    prompts, completions = conversational_batch(
        toks["strong"], lognormal_lengths(args.num or shape.num, shape.median, shape.max_len)
    )

    def make(urls: dict[str, str]) -> DrSow:
        return DrSow(
            urls["strong"],
            urls["weak"],
            strong_tokenizer=toks["strong"],
            weak_tokenizer=toks["weak"],
            strong_model=args.strong_model,
            weak_model=args.weak_model,
            api_key=args.api_key,
            engine="openai",
            batch_size=args.batch_size,
            max_concurrency=args.max_concurrency,
        )

    servers = {"running servers": {"strong": args.strong_url, "weak": args.weak_url}}
    label = f"{name} lengths (median {shape.median}, max {shape.max_len}) against {args.strong_url}, {args.weak_url}"
    return measure(label, servers, make, prompts, completions, args)


def main() -> None:
    args = parse_args()
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; choose from {sorted(SHAPES)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPU cores; 1-minute load average before the run {load:.2f}")
    if args.strong_url or args.weak_url:
        missing = [
            o
            for o in ("strong_url", "weak_url", "strong_tokenizer", "weak_tokenizer")
            if not getattr(args, o)
        ]
        if missing:
            raise SystemExit(
                f"with running servers, also give {', '.join('--' + m.replace('_', '-') for m in missing)}"
            )
        for name in names:
            run_remote(name, SHAPES[name], args)
        return
    with tempfile.TemporaryDirectory(prefix="drsow-bench-") as tmp:
        for name in names:
            run_local(name, SHAPES[name], args, Path(tmp))


if __name__ == "__main__":
    main()
