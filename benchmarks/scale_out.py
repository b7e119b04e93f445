"""Past one machine, measured on this one: Ray Serve replicas and Ray Data against one process.

1. Batching per replica: the dynamic batcher of ``rh-trl serve`` (what each Ray Serve replica runs) against
   Ray Serve's own ``@serve.batch`` (requests concatenated into one scoring call on a worker thread), one
   replica each, ``--clients`` clients sending one sample per request.
2. Replicas: 1 against 2 replicas of the same reward behind Ray Serve (dynamic batcher), same load.
3. Rows: ``rh-trl score --ray`` (an actor pool of 2, one model load each) against the local ``rh-trl score``
   on the same ``--rows`` rows; the outputs are checked to agree.

Everything runs on one local Ray with this machine's CPUs, so on 2 cores little gain is expected: the point is
that the same commands run on a cluster. Needs ``rh_trl[ray]``.

    python benchmarks/scale_out.py
    python benchmarks/scale_out.py --clients 64 --rows 6000 --layers 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402
from common import lognormal_lengths, synthetic_completions  # noqa: E402

from rh_trl.rewards.base import RewardOutput  # noqa: E402
from rh_trl.serve.config import ServerConfig, build_reward  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=24, help="requests per client")
    parser.add_argument("--rows", type=int, default=3000, help="rows scored by rh-trl score")
    parser.add_argument("--median", type=int, default=60, help="median completion length in tokens")
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    return parser.parse_args()


class ServeBatchReplica:
    """A reward replica batching with Ray Serve's ``@serve.batch`` instead of the dynamic batcher: the requests
    of a batch are concatenated into one scoring call (on a thread, so the replica keeps taking requests)."""

    async def __init__(self, config_data: dict[str, Any], name: str, store: Any) -> None:
        from ray import serve

        config = ServerConfig.model_validate(config_data)
        spec = next(s for s in config.rewards if s.name == name)
        self.reward = build_reward(spec)
        self._batched = serve.batch(
            max_batch_size=spec.max_batch_items, batch_wait_timeout_s=spec.max_wait_ms / 1e3
        )(self._score_batch)

    async def _score_batch(self, requests: list[tuple[list[Any], list[Any]]]) -> list[RewardOutput]:
        prompts = [p for ps, _ in requests for p in ps]
        completions = [c for _, cs in requests for c in cs]

        def score() -> RewardOutput:
            return self.reward._compute_checked(self.reward._make_batch(prompts, completions, None, {}))

        output = await asyncio.to_thread(score)
        answers, offset = [], 0
        for ps, _ in requests:
            answers.append(RewardOutput(output.rewards[offset : offset + len(ps)], {}, {}))
            offset += len(ps)
        return answers

    async def score(
        self, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput:
        return await self._batched((prompts, completions))

    async def describe(self) -> dict[str, Any]:
        return {"reward_name": self.reward.__name__}


async def drive(url: str, prompts: Sequence[Any], completions: Sequence[Any], clients: int, rounds: int):
    """Every client sends one sample per request; returns (requests/s, rewards by sample index)."""
    results: dict[int, float] = {}

    async def client(k: int, http: httpx.AsyncClient) -> None:
        for r in range(rounds):
            i = (k * rounds + r) % len(prompts)
            body = {"model": "rm", "prompts": [prompts[i]], "completions": [completions[i]]}
            response = await http.post(url + "/v1/rewards", json=body)
            response.raise_for_status()
            results[i] = response.json()["rewards"][0]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))  # warm-up: every replica loaded
        start = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        return clients * rounds / (time.perf_counter() - start), results


def serve_rate(
    args, port: int, replicas: int, replica: type | None, prompts, completions
) -> tuple[float, dict]:
    from ray import serve

    from rh_trl.serve.ray_serve import RewardReplica, serve_on_ray

    spec = {
        "name": "rm",
        "type": "tiny",
        "options": {"style": "llama", "seed": 0, "layers": args.layers, "hidden": args.hidden},
        "max_wait_ms": args.max_wait_ms,
        "ray": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1.5 / replicas}},
    }
    config = ServerConfig.model_validate({"port": port, "rewards": [spec]})
    url = serve_on_ray(config, blocking=False, replica=replica or RewardReplica)
    try:
        return asyncio.run(drive(url, prompts, completions, args.clients, args.rounds))
    finally:
        serve.delete(config.ray.app_name)


def score_rate(args, data: Path, model_dir: Path, folder: Path, ray: bool) -> tuple[float, Path]:
    from rh_trl.cli import main

    output = folder / ("ray.jsonl" if ray else "local.jsonl")
    command = [
        "score",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(output),
        "--no-progress",
    ]
    start = time.perf_counter()
    assert main([*command, *(["--ray"] if ray else [])]) == 0
    return args.rows / (time.perf_counter() - start), output


def main() -> None:
    args = parse_args()
    import ray

    from rh_trl.testing import bpe_tokenizer, tiny_reward_model

    root = str(HERE.parent)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        },
    )
    tok = bpe_tokenizer("llama")
    n = args.clients * args.rounds
    prompts = [f"Question {i}: say something." for i in range(n)]
    completions = synthetic_completions(tok, lognormal_lengths(n, args.median, args.max_len))
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(
        f"{os.cpu_count()} CPU cores; {args.layers}-layer tiny model, hidden {args.hidden}; {args.clients} clients x "
        f"{args.rounds} requests of one sample (median {args.median} tokens); one local Ray"
    )
    rates = {}
    answers = {}
    for label, replicas, replica in (
        ("1 replica, dynamic batcher", 1, None),
        ("1 replica, serve.batch", 1, ServeBatchReplica),
        ("2 replicas, dynamic batcher", 2, None),
    ):
        rates[label], answers[label] = serve_rate(args, port, replicas, replica, prompts, completions)
        print(f"  {label:<30} {rates[label]:8.1f} requests/s")
    base = answers["1 replica, dynamic batcher"]
    diff = max(abs(a[i] - base[i]) for a in answers.values() for i in base)
    print(
        f"dynamic batcher / serve.batch, 1 replica: {rates['1 replica, dynamic batcher'] / rates['1 replica, serve.batch']:.2f}x"
    )
    print(
        f"2 replicas / 1 replica: {rates['2 replicas, dynamic batcher'] / rates['1 replica, dynamic batcher']:.2f}x"
        f"  (max abs reward difference {diff:.1e})"
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = folder / "rm"
        tiny_reward_model(tok, layers=args.layers, hidden=args.hidden).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        rows = synthetic_completions(
            tok, lognormal_lengths(args.rows, args.median, args.max_len, seed=1), seed=1
        )
        data = folder / "rows.jsonl"
        data.write_text(
            "".join(json.dumps({"prompt": f"Q{i}", "completion": c}) + "\n" for i, c in enumerate(rows))
        )
        local_rate, local_out = score_rate(args, data, model_dir, folder, ray=False)
        ray_rate, ray_out = score_rate(args, data, model_dir, folder, ray=True)
        local_rewards = [json.loads(line)["reward"] for line in local_out.read_text().splitlines()]
        ray_rewards = [json.loads(line)["reward"] for line in ray_out.read_text().splitlines()]
        diff = max(abs(a - b) for a, b in zip(local_rewards, ray_rewards, strict=True))
    print(f"rh-trl score, {args.rows} rows (command wall time, model loads included):")
    print(f"  local                          {local_rate:8.1f} rows/s")
    print(f"  --ray (2 actors)               {ray_rate:8.1f} rows/s")
    print(f"Ray Data / local: {ray_rate / local_rate:.2f}x  (max abs reward difference {diff:.1e})")
    ray.shutdown()


if __name__ == "__main__":
    main()
