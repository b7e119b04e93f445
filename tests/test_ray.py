"""Past one machine, on a local Ray (``-m ray``; .ci/ray.sh installs Ray): a Ray Serve replica killed under load
loses no sample silently, ``rh-trl serve --ray`` is one command, and ``rh-trl score --ray`` / ``annotate --ray``
on Ray Data write what the local commands write, resuming after the last finished block."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")

import rh_trl.cli.resumable as resumable  # noqa: E402
from rh_trl.cli import main  # noqa: E402
from rh_trl.engines.http import RetryPolicy  # noqa: E402
from rh_trl.rewards.remote import RemoteRM  # noqa: E402
from rh_trl.serve.config import build_reward  # noqa: E402

from .test_server import RayServer, free_port, server_config, start_local_ray  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# -- Ray Serve: a replica killed under load -------------------------------------------------------------------


def replica_actors(deployment: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]
    )


def test_a_killed_replica_is_restarted_and_no_sample_is_lost_silently():
    import ray
    from ray import serve

    spec = {
        "name": "tiny",
        "type": "tiny",
        "options": {"style": "llama", "seed": 0},
        "max_wait_ms": 5,
        "ray": {"num_replicas": 2},
    }
    config = server_config(rewards=[spec])
    local = build_reward(config.rewards[0])
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(24)]
    completions = [f" It is {2 * i}." + " More." * (i % 5) for i in range(24)]
    expected = local.score(prompts, completions)
    calls: list[tuple[list[float | None], int, float, float]] = []
    stop = threading.Event()

    with RayServer(config) as srv:
        before = replica_actors("reward0_tiny")
        assert len(before) == 2
        rm = RemoteRM(
            srv.url, "tiny", chunk_size=4, retry=RetryPolicy(attempts=8, initial=0.2, max=2.0, timeout=30)
        )

        def score_in_a_loop() -> None:
            while not stop.is_set():
                start = time.monotonic()
                rewards = rm.score(prompts, completions)
                failed = int(rm.last_stats.get("num_server_failed", 0))
                calls.append((rewards, failed, start, time.monotonic()))

        worker = threading.Thread(target=score_in_a_loop)
        worker.start()
        try:
            while len(calls) < 3:
                time.sleep(0.05)
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
            deadline = time.time() + 120
            while time.time() < deadline:
                now = replica_actors("reward0_tiny")
                status = serve.status().applications["rh_trl"].deployments["reward0_tiny"]
                replaced = before[0] not in now and set(now) - set(before)  # Serve's status lags the kill
                if replaced and status.replica_states.get("RUNNING", 0) == 2:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"Serve did not replace the killed replica: {serve.status()}")
            restarted_at = len(calls)
            while len(calls) < restarted_at + 3:
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join(timeout=120)
        metrics = srv.metrics()["rewards"]["tiny"]

    assert any(start < killed_at < end for _, _, start, end in calls)  # a call was in flight at the kill
    lost = 0
    for rewards, failed, _, _ in calls:
        nones = sum(r is None for r in rewards)
        assert nones == failed  # every missing reward is counted as a failed server call, never silent
        lost += nones
        for got, want in zip(rewards, expected, strict=True):
            assert got is None or abs(got - want) <= TOL
    assert lost <= len(prompts)  # at most the chunks that were on the dying replica, after their retries
    assert metrics["replicas"] == 2


def test_serve_ray_is_one_command(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rh_trl.cli",
            "serve",
            "--ray",
            "--config",
            "configs/serve/ray.yaml",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        answer = httpx.post(
            url + "/v1/rewards", json={"model": "tiny", "prompts": ["a"], "completions": ["b"]}
        )
        assert answer.status_code == 200 and len(answer.json()["rewards"]) == 1
        models = httpx.get(url + "/v1/models").json()["data"]
        assert {m["id"] for m in models} == {"tiny", "tiny-chatml"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


# -- Ray Data: rh-trl score --ray and rh-trl annotate --ray ------------------------------------------------------


def score_rows_file(path: Path, n: int, conversational: bool = True) -> Path:
    """``n`` rows (in both TRL formats unless not ``conversational``), some without a readable completion (null
    rewards), some with an extra column."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            if i % 3 == 0 and conversational:
                row = {
                    "prompt": [{"role": "user", "content": f"Question {i}?"}],
                    "completion": [{"role": "assistant", "content": "Answer " * rng.randint(0, 12)}],
                }
            else:
                row = {"prompt": f"Say {i}", "completion": f" word{i}" * rng.randint(1, 6)}
            if i % 97 == 5:
                row["completion"] = None  # unreadable: null, counted as num_invalid
            if i % 5 == 0:
                row["meta"] = {"source": "x", "tags": [i, None]}
            f.write(json.dumps({"id": i, **row}) + "\n")
            if i == n // 2:
                f.write("\n")  # blank lines are not rows
    return path


def score_args(data: Path, output: Path, *extra: str) -> list[str]:
    """``rh-trl score`` of ``data`` into ``output`` with the offline tiny reward model."""
    return ["score", "--model", "rh_trl:tiny-rm", "--data", str(data), "--output", str(output), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "reward"} == {k: v for k, v in w.items() if k != "reward"}
        assert (g["reward"] is None) == (w["reward"] is None)
        if w["reward"] is not None:
            assert abs(g["reward"] - w["reward"]) <= TOL


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()


@pytest.fixture(scope="module")
def scored(tmp_path_factory, local_ray):
    """3,000 rows scored by the local command and by --ray: (input, local output, local summary lines)."""
    folder = tmp_path_factory.mktemp("score")
    data = score_rows_file(folder / "rows.jsonl", 3000)
    local = folder / "local.jsonl"
    assert main(score_args(data, local, "--no-progress")) == 0
    return data, local


def test_score_on_ray_equals_the_local_command_row_for_row(scored, tmp_path, capsys):
    data, local = scored
    capsys.readouterr()
    out = tmp_path / "ray.jsonl"
    from rh_trl.cli.score import ScoreSummary

    assert main(score_args(data, out, "--ray")) == 0
    printed = capsys.readouterr().out
    want = read_jsonl(local)
    assert_same_rows(read_jsonl(out), want)
    assert sum(row["reward"] is None for row in want) == 31
    summary = ScoreSummary.of(str(out), [r["reward"] for r in want], "orm_rh_trl_tiny-rm (ORM)", {})
    assert f"scored 3000 rows with orm_rh_trl_tiny-rm (ORM) -> {out}" in printed
    assert "no reward (null): 31" in printed and "num_invalid 31" in printed
    assert summary.report().splitlines()[1].split()[:2] == printed.splitlines()[1].split()[:2]  # the mean
    assert not (tmp_path / "ray.jsonl.partial").exists()


def test_score_on_ray_writes_parquet_as_the_local_command(tmp_path, local_ray):
    import pandas as pd

    from rh_trl.cli.score import plain

    data = score_rows_file(tmp_path / "rows.jsonl", 500, conversational=False)
    outputs = {}
    for name, extra in (("local", []), ("ray", ["--ray"])):
        outputs[name] = tmp_path / f"{name}.parquet"
        assert main(score_args(data, outputs[name], "--no-progress", *extra)) == 0
    got, want = (
        [plain(r) for r in pd.read_parquet(outputs[k]).to_dict(orient="records")] for k in ("ray", "local")
    )
    assert_same_rows(got, want)


def test_a_restarted_score_run_does_not_score_finished_blocks_again(scored, tmp_path, monkeypatch):
    import rh_trl.cli.ray_data as ray_data

    data, local = scored
    out = tmp_path / "ray.jsonl"
    args = score_args(data, out, "--ray", "--batch-size", "100")
    real_write, commits = resumable.write_state, []

    def dying(folder, state):
        real_write(folder, state)
        commits.append(state["rows_done"])
        if len(commits) == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(resumable, "write_state", dying)
    assert main(args) == 130  # interrupted
    monkeypatch.setattr(resumable, "write_state", real_write)
    done = commits[-1]
    assert (
        0 < done < 3000
        and json.loads((tmp_path / "ray.jsonl.partial" / "state.json").read_text())["rows_done"] == done
    )

    real_batches, seen = ray_data.scored_batches, {"skip": None, "rows": 0}

    def counting(data, actor, kwargs, options, skip, batch_size):
        seen["skip"] = skip
        for block in real_batches(data, actor, kwargs, options, skip, batch_size):
            seen["rows"] += len(block["problem"])
            yield block

    monkeypatch.setattr(ray_data, "scored_batches", counting)
    assert main(args) == 0
    assert seen == {"skip": done, "rows": 3000 - done}  # only the rows after the finished blocks were scored
    assert_same_rows(read_jsonl(out), read_jsonl(local))

    # other settings are refused, naming what changed, and a bad row is named
    monkeypatch.setattr(resumable, "write_state", dying)
    commits.clear()
    assert main([*args[:-2], "--batch-size", "50", "--overwrite"]) == 130
    monkeypatch.setattr(resumable, "write_state", real_write)
    assert main([*args[:-2], "--batch-size", "64", "--overwrite"]) == 2


def test_score_on_ray_names_a_bad_row(tmp_path, local_ray, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert main(["score", "--model", "rh_trl:tiny-rm", "--data", str(data), "--ray"]) == 2
    err = capsys.readouterr().err
    assert "row 2: has no ['completion'] column" in err and len(err.strip().splitlines()) == 1


def test_annotate_on_ray_writes_what_the_local_command_writes(tmp_path, local_ray):
    rng = random.Random(1)
    rows = [
        {"prompt": f"Question {i}?", "responses": [f" answer {j}" * rng.randint(1, 4) for j in range(4)]}
        for i in range(300)
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = json.dumps({"type": "orm", "model": "rh_trl:tiny-rm", "name": "rm"})
    common = ["annotate", str(data), "--reward", reward, "--chunk-size", "16", "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "local")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "ray"), "--ray"]) == 0
    for name in ("pairs.jsonl", "best_of_n.jsonl"):
        got, want = read_jsonl(tmp_path / "ray" / name), read_jsonl(tmp_path / "local" / name)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            numbers = ("score", "scores", "score_chosen", "score_rejected", "margin")
            assert {k: v for k, v in g.items() if k not in numbers} == {
                k: v for k, v in w.items() if k not in numbers
            }
            for key in numbers:
                if key in w:
                    a, b = (g[key], w[key]) if key == "scores" else ([g[key]], [w[key]])
                    assert all(math.isclose(x, y, abs_tol=TOL) for x, y in zip(a, b, strict=True))
    state = json.loads((tmp_path / "ray" / "state.json").read_text())
    assert state["rows_done"] == 300
