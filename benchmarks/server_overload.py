"""The reward server under overload, with 1 MB prompts mixed in: this checkout against another one.

First the server's capacity is measured: samples scored per second of compute while 64 back-to-back clients
keep it busy with short requests (its own ``/metrics/json``, so pauses of clients that honour 429s do not count).
Then, for each load level, a fresh server process is started and offered an open-loop stream of requests at
that multiple of its capacity for ``--duration`` seconds: requests of ``--samples`` short samples, and every
``--long-every``-th request one sample with a 1 MB prompt. Every request has the client's deadline as its
timeout. Reported per level and version:

- goodput: short samples answered with a reward within the deadline, per second;
- p50/p99 latency of the short requests answered with 200 (a timeout is counted in the next column);
- answers: 200s, 429s (refused at once with Retry-After), other errors, and timeouts;
- what happened to the 1 MB prompts; the server's peak RSS; seconds from SIGTERM to exit.

``--before PATH`` runs the same load against the code at PATH (e.g. a ``git worktree`` of main) with the same
YAML config, so the "after" column shows this checkout's defaults.

    git worktree add /tmp/rh_trl-main main
    python benchmarks/server_overload.py --before /tmp/rh_trl-main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parents[1]
CONFIG = """
graceful_shutdown_s: 5
rewards:
  - name: rm
    type: tiny
    options: {{style: llama, seed: 0, layers: {layers}, hidden: {hidden}}}
    max_wait_ms: 10
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before", help="a checkout of the code to compare with (its server runs from there)"
    )
    parser.add_argument("--levels", default="1,2,4", help="offered load as multiples of the capacity")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of offered load per level")
    parser.add_argument(
        "--deadline", type=float, default=10.0, help="the client's timeout per request, seconds"
    )
    parser.add_argument("--samples", type=int, default=8, help="short samples per request")
    parser.add_argument(
        "--long-every", type=int, default=25, help="one request in this many has a 1 MB prompt"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--capacity", type=float, help="requests/s at capacity (default: measured first)")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``rh-trl serve`` from a given checkout, with its peak RSS sampled while it runs."""

    def __init__(self, code: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rh_trl.cli", "serve", "--config", str(config), "--port", str(self.port)],
            env=env,
            cwd=code,  # python -m puts the working directory first on sys.path
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.peak_rss_mb = 0.0
        self._sampling = True
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server from {code} did not start")
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self._sampling and self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.25)

    def terminate(self, limit: float = 30.0) -> float | None:
        """SIGTERM; seconds until the process exited, or None if it had to be killed after ``limit``."""
        self._sampling = False
        start = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=limit)
            return time.time() - start
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def bodies(samples: int) -> tuple[bytes, bytes]:
    """A request of short samples (a ~30-token prompt, ~100-token answers) and one with a 1 MB prompt."""
    prompt = "Explain, step by step and with an example, how a river carves a canyon over time."
    completions = [
        " Water flows downhill and picks up sand and stones; " * 4 + f"answer number {i}."
        for i in range(samples)
    ]
    short = json.dumps({"model": "rm", "prompts": [prompt] * samples, "completions": completions}).encode()
    long = json.dumps({"model": "rm", "prompts": ["word " * 200_000], "completions": [" ok"]}).encode()
    return short, long


@dataclass
class Outcome:
    long: bool
    status: str  # "200", "429", other status codes, "timeout", "error"
    seconds: float
    scored: int = 0  # rewards that are not None


@dataclass
class Level:
    offered_rps: float
    outcomes: list[Outcome] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    exit_seconds: float | None = None


async def post(http: httpx.AsyncClient, url: str, body: bytes, long: bool, deadline: float) -> Outcome:
    start = time.perf_counter()
    try:
        response = await http.post(
            url + "/v1/rewards", content=body, headers={"Content-Type": "application/json"}, timeout=deadline
        )
    except httpx.TimeoutException:
        return Outcome(long, "timeout", deadline)
    except httpx.HTTPError:
        return Outcome(long, "error", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    scored = 0
    if response.status_code == 200:
        scored = sum(r is not None for r in response.json()["rewards"])
    return Outcome(long, str(response.status_code), seconds, scored)


async def open_loop(
    url: str, rate: float, args: argparse.Namespace, short: bytes, long: bytes
) -> list[Outcome]:
    """Requests at fixed times (``rate`` per second) for ``args.duration`` seconds, each with the deadline."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(limits=limits) as http:
        loop = asyncio.get_running_loop()
        start, tasks, i = loop.time(), [], 0
        while i / rate < args.duration:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            is_long = args.long_every > 0 and i % args.long_every == args.long_every - 1
            tasks.append(
                asyncio.create_task(post(http, url, long if is_long else short, is_long, args.deadline))
            )
            i += 1
        return list(await asyncio.gather(*tasks))


async def closed_loop(url: str, clients: int, seconds: float, short: bytes) -> float:
    """Requests per second that ``clients`` back-to-back clients get answered (short requests only; a 429 is
    retried after its ``Retry-After``)."""
    done = 0

    async def client(http: httpx.AsyncClient, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            response = await http.post(
                url + "/v1/rewards", content=short, headers={"Content-Type": "application/json"}, timeout=60
            )
            if response.status_code == 429:  # the server's own limit: back off as it asks
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                continue
            response.raise_for_status()
            done += 1

    async with httpx.AsyncClient() as http:
        await client(http, time.perf_counter() + 1)  # warm-up
        done = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds) for _ in range(clients)))
        return done / (time.perf_counter() - start)


def run_level(
    code: Path, config: Path, rate: float, args: argparse.Namespace, short: bytes, long: bytes
) -> Level:
    server = ServerProcess(code, config)
    level = Level(rate)
    try:
        level.outcomes = asyncio.run(open_loop(server.url, rate, args, short, long))
    finally:
        level.peak_rss_mb = server.peak_rss_mb
        level.exit_seconds = server.terminate()
    return level


def summary(level: Level, args: argparse.Namespace) -> dict[str, str]:
    shorts = [o for o in level.outcomes if not o.long]
    longs = [o for o in level.outcomes if o.long]
    in_time = [o for o in shorts if o.status == "200" and o.seconds <= args.deadline]
    latencies = sorted(o.seconds for o in shorts if o.status == "200")

    def pct(q: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(q * len(latencies)))]:.2f}" if latencies else "-"

    count = {key: sum(o.status == key for o in shorts) for key in ("200", "429", "timeout")}
    other = len(shorts) - sum(count.values())
    long_none = sum(o.status == "200" and o.scored == 0 for o in longs)
    long_late = sum(o.status == "timeout" for o in longs)
    return {
        "offered req/s": f"{level.offered_rps:.1f}",
        "goodput": f"{sum(o.scored for o in in_time) / args.duration:.0f}",
        "p50": pct(0.5),
        "p99": pct(0.99),
        "200/429/other/timeout": f"{count['200']}/{count['429']}/{other}/{count['timeout']}",
        "1 MB: None/timeout": f"{long_none}/{long_late} of {len(longs)}",
        "peak RSS MB": f"{level.peak_rss_mb:.0f}",
        "SIGTERM->exit s": f"{level.exit_seconds:.1f}" if level.exit_seconds is not None else ">30 (killed)",
    }


def main() -> None:
    args = parse_args()
    short, long = bodies(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serve.yaml"
        config.write_text(CONFIG.format(layers=args.layers, hidden=args.hidden))
        capacity = args.capacity
        if capacity is None:
            server = ServerProcess(HERE, config)
            try:
                asyncio.run(closed_loop(server.url, 64, 10.0, short))
                rm = httpx.get(server.url + "/metrics/json").json()["rewards"]["rm"]
                capacity = rm["samples"] / rm["compute_seconds"] / args.samples
            finally:
                server.terminate()
        print(
            f"capacity: {capacity:.1f} requests/s of {args.samples} samples ({capacity * args.samples:.0f} "
            f"samples/s); deadline {args.deadline:g} s; one request in {args.long_every} has a 1 MB prompt; "
            f"{args.duration:g} s per level; {os.cpu_count()} CPU cores",
            flush=True,
        )
        versions = [("before", Path(args.before).resolve())] if args.before else []
        versions.append(("after", HERE))
        rows = []
        for multiple in [float(x) for x in args.levels.split(",")]:
            for label, code in versions:
                level = run_level(code, config, multiple * capacity, args, short, long)
                rows.append((f"{multiple:g}x", label, summary(level, args)))
                print(f"  {rows[-1][0]} {label}: {rows[-1][2]}", flush=True)
    keys = list(rows[0][2])
    print()
    print("| load | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    by_level: dict[str, dict[str, dict[str, str]]] = {}
    for level_name, label, values in rows:
        by_level.setdefault(level_name, {})[label] = values
    for level_name, versions_seen in by_level.items():
        cells = []
        for key in keys:
            if "before" in versions_seen:
                cells.append(f"{versions_seen['before'][key]} → {versions_seen['after'][key]}")
            else:
                cells.append(versions_seen["after"][key])
        print(f"| {level_name} | " + " | ".join(cells) + " |")
    if any("before" in v for v in by_level.values()):
        print("\ngoodput after / before:", end="")
        for level_name, v in by_level.items():
            before, after = float(v["before"]["goodput"]), float(v["after"]["goodput"])
            print(
                f"  {level_name}: {after / before:.1f}x" if before else f"  {level_name}: {after:.0f} vs 0",
                end="",
            )
        print()


if __name__ == "__main__":
    main()
