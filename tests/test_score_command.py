"""``rh-trl score``: the written column equals the Python API and a forward pass computed here; Parquet; nulls."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch

from rh_trl.cli.score import add_score_command, main
from rh_trl.registry import load
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm, tiny_reward_model

TOL = 1e-6
ROWS = [
    {"id": 0, "prompt": [{"role": "user", "content": "Write one sentence about the moon."}],
     "completion": [{"role": "assistant", "content": "The moon is bright tonight."}]},
    {"id": 1, "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Trains?"}],
     "completion": [{"role": "assistant", "content": "Fast, loud, and long."}]},
    {"id": 2, "prompt": "The night sky is", "completion": " full of stars."},
    {"id": 3, "prompt": [{"role": "user", "content": "Name a fruit."}], "completion": None},  # unreadable
    {"id": 4, "prompt": [{"role": "user", "content": "Name a fruit."}],
     "completion": [{"role": "assistant", "content": "A pear."}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer("chatml", vocab_size=400)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("models") / "rm"
    model = tiny_reward_model(tok, seed=3, hidden=32, heads=2, layers=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def by_hand(model, tok, row) -> float | None:
    """The score computed here: the RM's chat template (conversations) or prompt + completion + EOS (strings)."""
    if row["completion"] is None:
        return None
    if isinstance(row["prompt"], str):
        ids = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
    else:
        text = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return model(torch.tensor([ids])).logits[0, 0].item()


def assert_close(got, expected):
    assert [g is None for g in got] == [e is None for e in expected]
    assert max(abs(g - e) for g, e in zip(got, expected, strict=True) if g is not None) <= TOL


def test_jsonl_matches_python_api_and_forward_pass(tmp_path, rm_dir, tok, capsys):
    path, model = rm_dir
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    summary = main(["--model", str(path), "--data", str(data), "--output", str(out), "--batch-size", "2",
                    "--no-progress"])  # fmt: skip
    written = read_jsonl(out)
    assert [{k: v for k, v in r.items() if k != "reward"} for r in written] == ROWS  # every input column kept
    got = [r["reward"] for r in written]
    api = load(str(path)).score([r["prompt"] for r in ROWS], [r["completion"] for r in ROWS])
    assert_close(got, api)
    assert_close(got, [by_hand(model, tok, r) for r in ROWS])
    assert got[3] is None and '"reward": null' in out.read_text().splitlines()[3]
    assert summary.rows == 5 and summary.num_none == 1 and summary.counts["num_invalid"] == 1
    assert abs(summary.mean - sum(g for g in got if g is not None) / 4) <= TOL
    printed = capsys.readouterr().out
    assert "scored 5 rows" in printed and "no reward (null): 1" in printed and "num_invalid 1" in printed


def test_parquet_in_and_out(tmp_path, rm_dir, tok):
    path, model = rm_dir
    rows = [ROWS[0], ROWS[1], ROWS[4]]  # one format per Parquet column
    data = tmp_path / "rows.parquet"
    pd.DataFrame(rows).to_parquet(data, index=False)
    main(["--model", str(path), "--data", str(data), "--column", "score", "--no-progress"])
    out = tmp_path / "rows.scored.parquet"  # the default output sits next to the input
    written = pd.read_parquet(out)
    assert list(written.columns) == ["id", "prompt", "completion", "score"]
    assert_close(written["score"].tolist(), [by_hand(model, tok, r) for r in rows])
    jsonl_out = tmp_path / "from_parquet.jsonl"
    main(["--model", str(path), "--data", str(data), "--output", str(jsonl_out), "--no-progress"])
    assert [r["prompt"] for r in read_jsonl(jsonl_out)] == [r["prompt"] for r in rows]  # plain JSON again


def test_tiny_name_other_family_and_wired_subcommand(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], ROWS[4]])
    parser = argparse.ArgumentParser(prog="rh-trl")
    add_score_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", "--model", "rh_trl:tiny-rm", "--data", str(data), "--no-progress"])
    summary = args.func(args)
    api = load("rh_trl:tiny-rm").score([ROWS[0]["prompt"], ROWS[4]["prompt"]],
                                       [ROWS[0]["completion"], ROWS[4]["completion"]])  # fmt: skip
    assert_close([r["reward"] for r in read_jsonl(tmp_path / "rows.scored.jsonl")], api)
    assert summary.rows == 2 and summary.num_none == 0

    tok = bpe_tokenizer("llama")  # a causal LM read as a next-token PRM, chosen with --family/--options
    lm = tmp_path / "lm"
    tiny_causal_lm(tok, seed=4, hidden=32, heads=2, layers=1).save_pretrained(lm)
    tok.save_pretrained(lm)
    out = tmp_path / "prm.jsonl"
    main(["--model", str(lm), "--family", "prm", "--options", '{"kind": "next_token"}', "--data", str(data),
          "--output", str(out), "--no-progress"])  # fmt: skip
    prm = load(str(lm), family="prm", kind="next_token")
    expected = prm.score(
        [ROWS[0]["prompt"], ROWS[4]["prompt"]], [ROWS[0]["completion"], ROWS[4]["completion"]]
    )
    assert_close([r["reward"] for r in read_jsonl(out)], expected)


def test_bad_input_is_explained(tmp_path, rm_dir, capsys):
    path, _ = rm_dir
    data = write_jsonl(tmp_path / "rows.jsonl", [{**ROWS[0], "reward": 1.0}])
    with pytest.raises(ValueError, match="already has a 'reward' column.*--column"):
        main(["--model", str(path), "--data", str(data), "--no-progress"])
    data = write_jsonl(tmp_path / "rows2.jsonl", [{"question": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"rows2.jsonl, row 1 has no \['prompt'\] column.*question"):
        main(["--model", str(path), "--data", str(data), "--no-progress"])
    data = write_jsonl(tmp_path / "rows3.jsonl", [ROWS[0]])
    with pytest.raises(SystemExit):  # argparse refuses it
        main(["--model", str(path), "--data", str(data), "--options", "[1]", "--no-progress"])
    assert "argument --options: expected a JSON object of keyword arguments" in capsys.readouterr().err
    missing_model = str(tmp_path / "no-model")  # the checks below fail before any model is loaded
    data = write_jsonl(tmp_path / "rows4.jsonl", [{**ROWS[4], "completion_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"column\(s\) \['completion_ids'\].*rename them"):
        main(["--model", missing_model, "--data", str(data), "--no-progress"])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", ROWS)  # prompts: strings in one row, messages in others
    output = tmp_path / "mixed.parquet"
    with pytest.raises(ValueError, match="cannot be written as Parquet.*jsonl --output"):
        main(["--model", missing_model, "--data", str(mixed), "--output", str(output), "--no-progress"])
    assert not output.exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match=r"--output must end in \.jsonl or \.parquet"):
        main(
            ["--model", str(path), "--data", str(data), "--output", str(tmp_path / "x.csv"), "--no-progress"]
        )
