"""The annotate job: scores, pair selection, best-of-N, and exact resume after a crash."""

from __future__ import annotations

import argparse
import json
import random

import pytest

import rh_trl
import rh_trl.cli.annotate as annotate_module
import rh_trl.cli.resumable as resumable
from rh_trl.cli.annotate import add_annotate_command, annotate
from rh_trl.testing import bundled_prompts, tiny_model


def word_count(prompts, completions, **kwargs):
    return [float(len(c[0]["content"].split())) for c in completions]


def dataset(n: int = 10, k: int = 4) -> list[dict]:
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    rows = []
    for row in bundled_prompts()[:n]:
        responses = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(k)]
        rows.append({"prompt": row["prompt"], "responses": responses})
    return rows


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_and_best_of_n_match_hand_selection(tmp_path):
    rows = dataset()
    rm_model, rm_tok = tiny_model("tiny-rm")
    orm = rh_trl.ORM(rm_model, rm_tok, name="annotate_rm")
    result = annotate(rows, tmp_path, [orm, word_count], [1.0, -0.5], chunk_size=3, progress=False)
    reference = rh_trl.ORM(*tiny_model("tiny-rm"), name="annotate_reference_rm")
    best = read(tmp_path / "best_of_n.jsonl")
    pairs = read(tmp_path / "pairs.jsonl")
    assert result.rows == 10 and len(best) == 10 and result.pairs == len(pairs)
    expected_pairs = []
    for row, b in zip(rows, best, strict=False):
        comps = [[{"role": "assistant", "content": r}] for r in row["responses"]]
        rm = reference.score([row["prompt"]] * 4, comps)
        want = [s - 0.5 * len(r.split()) for s, r in zip(rm, row["responses"], strict=False)]
        assert max(abs(a - b) for a, b in zip(b["scores"], want, strict=False)) < 1e-5
        hi, lo = want.index(max(want)), want.index(min(want))
        assert b["response"] == row["responses"][hi]
        if max(want) > min(want):
            expected_pairs.append((row["responses"][hi], row["responses"][lo]))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == expected_pairs


def test_all_pairs_above_margin():
    values = [0.0, 1.0, 3.0, None, 1.5]
    pairs, best, _ = annotate_module.select("p", list("abcde"), values, "all", 0.9)
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    # hand enumeration of pairs whose difference exceeds 0.9: (b,a) 1.0, (c,a) 3, (c,b) 2, (e,a) 1.5, (c,e) 1.5
    assert got == {("b", "a"), ("c", "a"), ("c", "b"), ("e", "a"), ("c", "e")}
    assert best["response"] == "c"
    pairs, _, tie = annotate_module.select("p", ["x", "y"], [2.0, 2.0], "best_worst", 0.0)
    assert pairs == [] and tie


@pytest.mark.parametrize("crash", ["after_state", "before_state"])
def test_killed_run_restarted_writes_exactly_the_uninterrupted_rows(tmp_path, monkeypatch, crash):
    rows = dataset(n=11)
    annotate(rows, tmp_path / "full", [word_count], chunk_size=3, progress=False)

    real_write, calls = resumable.write_state, []

    def dying(folder, state):
        calls.append(1)
        if len(calls) == 2 and crash == "before_state":  # chunk 2 appended and flushed, state not yet written
            raise KeyboardInterrupt("killed")
        real_write(folder, state)
        if len(calls) == 2 and crash == "after_state":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(resumable, "write_state", dying)
    with pytest.raises(KeyboardInterrupt):
        annotate(rows, tmp_path / "cut", [word_count], chunk_size=3, progress=False)
    monkeypatch.setattr(resumable, "write_state", real_write)
    if crash == "before_state":
        assert len(read(tmp_path / "cut" / "best_of_n.jsonl")) == 6  # the half-finished chunk is on disk
    result = annotate(rows, tmp_path / "cut", [word_count], chunk_size=3, progress=False)
    for name in ("pairs.jsonl", "best_of_n.jsonl"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text()
    assert result.rows == 11 and result.best == 11


def test_resume_with_other_settings_is_refused(tmp_path):
    annotate(dataset(n=2), tmp_path, [word_count], chunk_size=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        annotate(dataset(n=2), tmp_path, [word_count], chunk_size=2, progress=False)


def test_annotate_command_generates_with_policy_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": r["prompt"]}) for r in bundled_prompts()[:5]))
    cfg = tmp_path / "annotate.yaml"
    cfg.write_text(
        "rewards:\n  - {type: orm, model: 'rh_trl:tiny-rm', name: cli_rm}\n"
        "policy: rh_trl:tiny-policy\nnum_samples: 3\nmax_new_tokens: 6\nchunk_size: 2\n"
    )
    parser = argparse.ArgumentParser()
    add_annotate_command(parser.add_subparsers(dest="command"))

    def run(out):
        args = parser.parse_args(
            ["annotate", str(prompts), "--config", str(cfg), "--output-dir", str(out), "--no-progress"]
        )
        return args.func(args)

    full = run(tmp_path / "full")
    assert full.rows == 5 and full.best == 5
    best = read(tmp_path / "full" / "best_of_n.jsonl")
    assert all(len(b["scores"]) == 3 and b["score"] == max(b["scores"]) for b in best)
    # a crash after the first chunk: restart regenerates only what is missing, with the same per-chunk seeds
    state = json.loads((tmp_path / "full" / "state.json").read_text())
    partial = tmp_path / "partial"
    run(partial)
    cut = {"rows_done": 2, "sizes": {}, "settings": state["settings"]}
    kept: dict[str, int] = {}
    for name in ("pairs.jsonl", "best_of_n.jsonl"):
        lines = (partial / name).read_text().splitlines(keepends=True)
        keep = [
            line
            for line in lines
            if json.loads(line)["prompt"] in [r["prompt"] for r in bundled_prompts()[:2]]
        ]
        (partial / name).write_text("".join(keep) + "garbage half line")
        cut["sizes"][name] = len("".join(keep).encode())
        kept[name] = len(keep)
    cut["counts"] = {"pairs": kept["pairs.jsonl"], "best": 2, "unscored": 0, "skipped_ties": 0}
    (partial / "state.json").write_text(json.dumps(cut))
    run(partial)
    assert (partial / "best_of_n.jsonl").read_text() == (tmp_path / "full" / "best_of_n.jsonl").read_text()
    assert (partial / "pairs.jsonl").read_text() == (tmp_path / "full" / "pairs.jsonl").read_text()


def test_resume_with_other_rows_names_what_changed(tmp_path):
    rows = dataset(n=3)
    annotate(rows[:2], tmp_path, [word_count], chunk_size=1, progress=False)
    edited = [dict(rows[0]), rows[1]]
    edited[0]["responses"] = [*edited[0]["responses"][:-1], "a different response"]
    with pytest.raises(ValueError, match="cannot be resumed: rows_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        annotate(edited, tmp_path, [word_count], chunk_size=1, progress=False)
    assert (
        annotate(rows[:2], tmp_path, [word_count], chunk_size=1, progress=False).rows == 2
    )  # same rows: fine


@pytest.mark.parametrize(
    ("flag", "value", "changed"),
    [
        ("--seed", "1", "seed: 0 -> 1"),
        ("--temperature", "0.7", "temperature: 1.0 -> 0.7"),
        ("--max-new-tokens", "5", "max_new_tokens: 6 -> 5"),
        ("--num-samples", "2", "num_samples: 3 -> 2"),
        (None, None, "input_sha256"),
    ],
)
def test_annotate_command_refuses_to_resume_with_changed_generation_or_input(tmp_path, flag, value, changed):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.dumps({"prompt": r["prompt"]}) for r in bundled_prompts()[:4]]
    prompts.write_text("\n".join(rows))
    parser = argparse.ArgumentParser()
    add_annotate_command(parser.add_subparsers(dest="command"))
    common = [
        "annotate", str(prompts), "--output-dir", str(tmp_path / "out"), "--no-progress",
        "--reward", '{"type": "orm", "model": "rh_trl:tiny-rm"}', "--policy", "rh_trl:tiny-policy",
        "--num-samples", "3", "--max-new-tokens", "6", "--chunk-size", "2",
    ]  # fmt: skip
    args = parser.parse_args(common)
    args.func(args)
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    state["rows_done"] = 2  # as if killed after the first chunk
    (tmp_path / "out" / "state.json").write_text(json.dumps(state))
    if flag is None:
        prompts.write_text("\n".join([rows[0], rows[1], rows[3], rows[2]]))  # same rows, other order
        args = parser.parse_args(common)
    else:
        args = parser.parse_args([*common, flag, value])
    with pytest.raises(ValueError, match="cannot be resumed") as err:
        args.func(args)
    assert changed in str(err.value)
    assert len(read(tmp_path / "out" / "best_of_n.jsonl")) == 4  # nothing was mixed in


def test_an_async_remote_reward_is_awaited(tmp_path):
    import httpx

    from rh_trl.rewards.remote import RemoteRM

    def handler(request):
        body = json.loads(request.content)
        return httpx.Response(
            200, json={"rewards": [float(len(c[0]["content"])) for c in body["completions"]]}
        )

    remote = RemoteRM("http://rm:1", transport=httpx.MockTransport(handler))
    rows = dataset(n=2)
    result = annotate(rows, tmp_path, [remote], chunk_size=1, progress=False)
    best = read(tmp_path / "best_of_n.jsonl")
    assert result.best == 2
    for row, picked in zip(rows, best, strict=True):
        assert picked["scores"] == [float(len(r)) for r in row["responses"]]
