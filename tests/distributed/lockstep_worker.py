"""One process of a two-process run (torchrun, gloo) that calls rh_trl rewards as a trainer does: each process with
its share of one call, ``trainer_state`` passed. ``python -m torch.distributed.run --nproc_per_node 2
lockstep_worker.py SCENARIO OUT_DIR`` writes ``OUT_DIR/rank<r>.json``; tests/distributed/test_lockstep.py compares it
with one process scoring the whole call. The ``sharded`` scenario runs under ``accelerate launch`` with a ZeRO-3
config instead (tests/distributed/test_deepspeed.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import rh_trl  # noqa: E402
from rh_trl.callbacks import NormalizedReward, WithStatistics  # noqa: E402
from rh_trl.engines.ranks import DistributedRewardError  # noqa: E402

P1 = [{"role": "user", "content": "Write one sentence about the moon."}]
P2 = [{"role": "user", "content": "Name three things related to coffee."}]
P3 = [{"role": "user", "content": "Describe trains in a few words."}]
WORDS = [
    "the",
    "moon",
    "is",
    "bright",
    "cold",
    "far",
    "coffee",
    "beans",
    "cup",
    "hot",
    "dark",
    "trains",
    "run",
    "fast",
    "rails",
    "long",
]


def whole_call() -> tuple[list, list]:
    """Nine completions of three prompts; the first process gets 4 (a group split 3 + 1 over the processes, another
    1 + 2), the second 5 (uneven shares)."""
    prompts = [P1, P1, P1, P2, P2, P2, P3, P3, P3]
    completions = [
        [
            {
                "role": "assistant",
                "content": " ".join(WORDS[(3 * k + j) % len(WORDS)] for j in range(2 + k % 4)),
            }
        ]
        for k in range(len(prompts))
    ]
    return prompts, completions


SPLIT = 4


class HashJudge:
    """A deterministic judge. Pairwise: its verdict is a function of the two responses as shown. Listwise: each
    response's score is a function of that response's text, so that it does not depend on who asks."""

    def generate_chat(self, conversations):
        answers = []
        for conversation in conversations:
            content = conversation[-1]["content"]
            responses = re.findall(
                r"\[The Start of Response \d+\]\n(.*?)\n\[The End of Response", content, re.S
            )
            if "Response 1]" in content and "Response A]" not in content:
                scores = [hashlib.sha256(r.encode()).digest()[0] % 11 for r in responses]
                answers.append(f"Ranked.\nScores: {scores}")
                continue
            digest = hashlib.sha256(content.encode()).digest()[0]
            answers.append(f"My verdict: [[{'ABC'[digest % 3]}]]")
        return answers


def build_rewards() -> dict:
    """The rewards of every scenario, built the same way on every process (and in the test's own process)."""
    orm = rh_trl.ORM("rh_trl:tiny-rm", name="orm")
    return {
        "pairpm": rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", name="pairpm"),
        "judge": rh_trl.GenRM(engine=HashJudge(), template="pairwise", name="judge"),
        "listwise": rh_trl.GenRM(engine=HashJudge(), template="listwise", name="listwise"),
        "stats": WithStatistics(orm),
        "normalized": NormalizedReward(rh_trl.ORM("rh_trl:tiny-rm", name="orm_norm"), clip=None),
    }


def trainer_call(reward, prompts, completions, step: int = 1):
    """Call ``reward`` as GRPO does; return its rewards and the metrics it logged."""
    metrics: dict[str, float] = {}
    values = reward(
        prompts=prompts,
        completions=completions,
        completion_ids=None,
        trainer_state=SimpleNamespace(global_step=step),
        log_metric=metrics.__setitem__,
        log_extra=lambda column, values: None,
    )
    return values, metrics


def share(rank: int, items: list) -> list:
    return items[:SPLIT] if rank == 0 else items[SPLIT:]


def run(scenario: str, rank: int) -> dict:
    prompts, completions = whole_call()
    if scenario == "groups":  # every reward, twice (two calls), on uneven shares
        rewards = build_rewards()
        out = {}
        for name, reward in rewards.items():
            calls = [
                trainer_call(reward, share(rank, prompts), share(rank, completions), step) for step in (1, 2)
            ]
            out[name] = {"rewards": [c[0] for c in calls], "metrics": [c[1] for c in calls]}
        return out
    if scenario == "empty_share":  # the second process holds no completion of this call
        pm = build_rewards()["pairpm"]
        mine = (prompts, completions) if rank == 0 else ([], [])
        values, metrics = trainer_call(pm, *mine)
        return {"rewards": values, "metrics": metrics}
    if scenario == "score_on_one":  # score() and plain calls on the first process only: no exchange, no wait
        rewards = build_rewards()
        start = time.monotonic()
        values = {}
        if rank == 0:
            values["pairpm"] = rewards["pairpm"].score(prompts, completions)
            values["normalized"] = rewards["normalized"](prompts=prompts, completions=completions)
            values["stats"] = rewards["stats"](prompts=prompts, completions=completions)
        return {"rewards": values, "seconds": time.monotonic() - start}
    if scenario == "call_on_one":  # a trainer-style call on the first process only: a clear error, not a hang
        pm = build_rewards()["pairpm"]
        if rank == 1:
            return {"error": None}
        return _error(lambda: trainer_call(pm, share(rank, prompts), share(rank, completions)))
    if scenario == "failure_on_one":  # a bad call on the second process is raised on both
        pm = build_rewards()["pairpm"]
        mine_c = share(rank, completions) if rank == 0 else share(rank, completions)[:-1]
        return _error(lambda: trainer_call(pm, share(rank, prompts), mine_c))
    if scenario == "other_step":  # the processes are at different training steps
        pm = build_rewards()["pairpm"]
        return _error(lambda: trainer_call(pm, share(rank, prompts), share(rank, completions), step=1 + rank))
    if scenario == "other_group_size":  # the processes group completions differently
        pm = rh_trl.PairwisePM("rh_trl:tiny-lm-chatml", name="pairpm", group_size=3 if rank == 0 else None)
        return _error(lambda: trainer_call(pm, share(rank, prompts), share(rank, completions)))
    if scenario == "sharded":  # ZeRO-3 sharded reward models against whole copies, on uneven shares
        return run_sharded(rank, prompts, completions)
    raise SystemExit(f"unknown scenario {scenario!r}")


def run_sharded(rank: int, prompts: list, completions: list) -> dict:
    """One micro-batch per sequence, so that the processes need different numbers of forward passes (4 and 5;
    then 9 and 0), which a sharded model must run in step."""
    out = {}
    for zero3, kind in ((True, "sharded"), (False, "whole")):
        rewards = {
            "orm": rh_trl.ORM("rh_trl:tiny-rm", name=f"orm_{kind}", zero3=zero3, max_batch_size=1),
            "prm": rh_trl.PRM(
                "rh_trl:tiny-lm-chatml", kind="next_token", name=f"prm_{kind}", zero3=zero3, max_batch_size=1
            ),
            "pairpm": rh_trl.PairwisePM(
                "rh_trl:tiny-lm-chatml", name=f"pairpm_{kind}", zero3=zero3, max_batch_size=1
            ),
        }
        for name, reward in rewards.items():
            uneven = trainer_call(reward, share(rank, prompts), share(rank, completions))[0]
            everything = (prompts, completions) if rank == 0 else ([], [])
            lopsided = trainer_call(reward, *everything, step=2)[0]
            out[f"{name}_{kind}"] = {"uneven": uneven, "lopsided": lopsided}
            if zero3:
                out[f"{name}_{kind}"]["passes"] = reward.engine.last_stats.batches
    alone = rh_trl.ORM(
        "rh_trl:tiny-rm", name="orm_alone", zero3=True
    )  # built on every process, as it must be
    out["score_error"] = _error(lambda: alone.score(prompts, completions)) if rank == 0 else None
    return out


def _error(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
    except (DistributedRewardError, rh_trl.RewardInputError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if (
        scenario == "sharded"
    ):  # launched by accelerate with a ZeRO-3 config: the run's state, as a trainer has it
        from accelerate import Accelerator

        Accelerator()
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = run(scenario, rank)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if scenario not in ("call_on_one", "score_on_one"):
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
