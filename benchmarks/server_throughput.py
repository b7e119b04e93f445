"""The reward server with dynamic batching against the same server scoring one request per forward pass.

Without batching a server runs one forward pass per request, as OpenRLHF's ``serve_rm`` does when each
rollout posts its own query. Here ``--clients`` concurrent clients each send one sample per request, for
``--rounds`` rounds, to a server hosting the same reward model twice: once with dynamic batching and once
without. Rewards are checked to agree between the two.

    python benchmarks/server_throughput.py                       # 32 clients, 4-layer model, CPU
    python benchmarks/server_throughput.py --hidden 1024 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from common import conversational_batch, lognormal_lengths  # noqa: E402

import rh_trl  # noqa: E402
from rh_trl.serve.app import create_app  # noqa: E402
from rh_trl.serve.config import ServerConfig  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_reward_model  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8, help="requests per client")
    parser.add_argument("--median", type=int, default=150, help="median completion length in tokens")
    parser.add_argument("--max-len", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive(url: str, model: str, prompts, completions, clients: int, rounds: int):
    """Every client sends one sample per request; returns (seconds, rewards by sample index)."""
    results: dict[int, float] = {}

    async def client(k: int, http: httpx.AsyncClient) -> None:
        for r in range(rounds):
            i = (k * rounds + r) % len(prompts)
            body = {"model": model, "prompts": [prompts[i]], "completions": [completions[i]]}
            response = await http.post(url + "/v1/rewards", json=body)
            response.raise_for_status()
            results[i] = response.json()["rewards"][0]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await client(0, http)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        return time.perf_counter() - start, results


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = bpe_tokenizer("llama")
    model = tiny_reward_model(tok, layers=args.layers, hidden=args.hidden).to(args.device)
    n = args.clients * args.rounds
    prompts, completions = conversational_batch(
        tok, lognormal_lengths(n, args.median, args.max_len), group_size=1
    )
    reward = rh_trl.ORM(model, tok, name="rm", device=args.device)
    config = ServerConfig.model_validate(
        {
            "rewards": [
                {"name": "batched", "type": "python", "target": "-:-", "max_wait_ms": args.max_wait_ms},
                {"name": "unbatched", "type": "python", "target": "-:-", "batching": False},
            ]
        }
    )
    port = free_port()
    app = create_app(config, {"batched": reward, "unbatched": reward})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        t_off, r_off = asyncio.run(drive(url, "unbatched", prompts, completions, args.clients, args.rounds))
        t_on, r_on = asyncio.run(drive(url, "batched", prompts, completions, args.clients, args.rounds))
        metrics = httpx.get(url + "/metrics/json").json()["rewards"]
    finally:
        server.should_exit = True
        thread.join()
    diff = max(abs(r_on[i] - r_off[i]) for i in r_on)
    on, off = metrics["batched"], metrics["unbatched"]
    print(
        f"{args.clients} clients x {args.rounds} requests, one sample each; {args.layers}-layer model, "
        f"hidden {args.hidden}, {args.device}, median {args.median} tokens"
    )
    print(f"{'server':<26}{'seconds':>9}{'requests/s':>12}{'forward calls':>15}{'mean batch':>12}")
    print(
        f"{'one forward per request':<26}{t_off:>9.2f}{n / t_off:>12.1f}{off['batches']:>15}{off['mean_batch_samples']:>12.1f}"
    )
    print(
        f"{'dynamic batching':<26}{t_on:>9.2f}{n / t_on:>12.1f}{on['batches']:>15}{on['mean_batch_samples']:>12.1f}"
    )
    print(f"max abs reward difference {diff:.1e}; dynamic batching is {t_off / t_on:.1f}x faster")


if __name__ == "__main__":
    main()
