"""The ``rh-trl`` command line as a user meets it: a fast start, ``--version``, one-line errors with exit status 2
for bad input (the traceback only under ``--debug``), and help text without markup or dead paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rh_trl
from rh_trl.cli.parser import report_error

ROOT = Path(__file__).resolve().parents[1]
#: the issue's bound for `import rh_trl` and `rh-trl --help` is 1.5 s; the import-time sums must stay far below
IMPORT_BUDGET_S = 0.5
WALL_BUDGET_S = 1.5
HEAVY = ("torch", "transformers", "trl", "datasets", "numpy", "pandas", "ray")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **extra}


def rh_trl_cli(*args: str, cwd: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """``rh-trl ARGS`` in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "rh_trl.cli", *args],
        cwd=cwd,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_profile(code: list[str]) -> tuple[float, float, set[str]]:
    """Run ``python -X importtime CODE``: (wall seconds, seconds of all imports, modules imported)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *code], env=env(), capture_output=True, text=True, timeout=120
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    total_us, modules = 0, set()
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            modules.add(match.group(3))
            if not match.group(2):  # a top-level import: its cumulative time covers everything below it
                total_us += int(match.group(1))
    return wall, total_us / 1e6, modules


@pytest.mark.parametrize(
    "code", [["-c", "import rh_trl"], ["-m", "rh_trl.cli", "--help"]], ids=["import", "help"]
)
def test_import_and_help_are_fast_and_import_no_torch(code):
    wall, imports, modules = import_profile(code)
    assert not [m for m in HEAVY if m in modules], f"heavy modules imported: {sorted(modules & set(HEAVY))}"
    assert imports < IMPORT_BUDGET_S, f"imports took {imports:.2f} s"
    assert wall < WALL_BUDGET_S, f"{' '.join(code)} took {wall:.2f} s"


def test_lazy_names_resolve():
    assert rh_trl.ORM.__module__ == "rh_trl.rewards.orm"
    assert rh_trl.load.__module__ == "rh_trl.registry"
    assert "DrSow" in dir(rh_trl)
    assert (
        rh_trl.callbacks.RewardNormalizer.__name__ == "RewardNormalizer"
    )  # a submodule after `import rh_trl`
    for name in rh_trl.__all__:
        assert getattr(rh_trl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        rh_trl.NotAThing  # noqa: B018


def test_version():
    done = rh_trl_cli("--version")
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert (
        done.returncode == 0 and done.stdout.strip() == f"rh-trl {version}" == f"rh-trl {rh_trl.__version__}"
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ROWS = '{"prompt": "Hi", "completion": "Hello there"}\n{"prompt": "Name a fruit.", "completion": "A pear."}\n'


def bad_input_cases(tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(arguments, fragments the one error line must hold): the issue's bad-input cases and their kin."""
    good = write(tmp / "rows.jsonl", ROWS)
    pairs = write(tmp / "pairs.jsonl", '{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}\n')
    broken = write(tmp / "broken.jsonl", ROWS + '{"prompt": "Hi", "completion": }\n')
    write(tmp / "taken.jsonl", "")
    bad_yaml = write(tmp / "annotate.yaml", "output_dir: out\nrewards:\n  - {type: orm, model: [x\n")
    typo_yaml = write(tmp / "typo.yaml", "output_dir: out\nchunk_sise: 4\n")
    model = ["--model", "rh_trl:tiny-rm"]
    return [
        (["score", *model, "--data", "missing.jsonl"], ["missing.jsonl: no such file", "JSONL, JSON or Parquet"]),
        (["score", *model, "--data", str(broken)], [f"{broken}, line 3: not valid JSON", "one JSON object per line"]),
        (["score", *model, "--data", str(good), "--options", "{max_length: 3}"], ["argument --options: not valid JSON", "double quotes"]),
        (["score", *model, "--data", str(good), "--options", '{"max_lenght": 3}'], ["ORM has no option 'max_lenght' (did you mean 'max_length'?)", "the options it takes: model,"]),
        (["score", "--model", str(tmp / "no-model"), "--data", str(good)], ["no-model' does not exist", "expected a model directory or a hub id"]),
        (["score", *model, "--data", str(good), "--modle", "x"], ["unrecognized argument(s): --modle x (did you mean '--model'?)"]),
        (["score", *model, "--data", str(good), "--engine", "vlm"], ["--engine 'vlm' is not one of hf, vllm, openai (did you mean 'vllm'?)"]),
        (["score", *model, "--data", str(good), "--output", str(tmp / "taken.jsonl")], ["taken.jsonl exists; pass --overwrite"]),
        (["scor", *model], ["invalid choice: 'scor'", "(did you mean 'score'?)"]),
        (["score", "--data", str(good)], ["the following arguments are required: --model"]),
        (["eval", "--reward", str(tmp / "spec.yaml"), "--data", str(pairs)], ["spec.yaml: no such file"]),
        (["eval", "--baseline", "shorter", "--data", str(good)], [f"{good}, row 1: a preference row needs 'chosen' and 'rejected'"]),
        (["annotate", str(good), "--config", str(bad_yaml)], [f"{bad_yaml}, line 4: not valid YAML"]),
        (["annotate", str(good), "--config", str(typo_yaml)], ["unknown option 'chunk_sise' (did you mean 'chunk_size'?)"]),
    ]  # fmt: skip


def in_parallel(calls: list[dict]) -> list[subprocess.CompletedProcess]:
    """``rh_trl_cli(*call["args"], **call["kwargs"])`` for each call, several processes at a time."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda call: rh_trl_cli(*call["args"], **call.get("kwargs", {})), calls))


def test_bad_input_is_one_line_with_status_2(tmp_path):
    cases = bad_input_cases(tmp_path)
    runs = in_parallel([{"args": args, "kwargs": {"cwd": tmp_path}} for args, _ in cases])
    for (args, fragments), done in zip(cases, runs, strict=True):
        lines = done.stderr.strip().splitlines()
        command = args[0] if args[0] != "scor" else None
        prefix = f"rh-trl {command}: error: " if command else "rh-trl: error: "
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and lines[0].startswith(prefix), (args, done.stderr)
        assert "Traceback" not in done.stderr and not done.stdout, args
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])


def test_debug_shows_the_traceback(tmp_path):
    data = write(tmp_path / "rows.jsonl", "not json\n")
    score = ["score", "--model", "rh_trl:tiny-rm", "--data", str(data)]
    before, by_env, after = in_parallel(
        [
            {"args": ["--debug", *score]},
            {"args": score, "kwargs": {"RH_TRL_DEBUG": "1"}},
            {"args": [*score, "--debug"]},  # after the command too
        ]
    )
    for done in (before, by_env):
        assert done.returncode == 1 and "Traceback" in done.stderr and f"{data}, line 1" in done.stderr
    assert "Traceback" in after.stderr


def test_a_failure_is_status_1_and_one_line(capsys):
    assert report_error("rh-trl score", RuntimeError("CUDA out of memory\nwhile scoring")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("rh-trl score: error: RuntimeError: CUDA out of memory while scoring (--debug")
    assert report_error("rh-trl score", KeyboardInterrupt()) == 130


def test_help_is_plain_text_and_names_real_files():
    helps = {
        command: rh_trl_cli(command, "--help")
        for command in ("score", "eval", "annotate", "quickstart", "serve")
    }
    for command, done in helps.items():
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert "``" not in text and ":func:" not in text and ":class:" not in text, command
        assert not re.search(r"\S {4,}--", text.split("options:")[0]), f"an example of {command} was joined"
        for path in re.findall(r"\bconfigs/[\w/.-]+\.ya?ml", text):
            assert (ROOT / path).exists(), f"rh-trl {command} --help names {path}, which does not exist"
    from rh_trl.registry import ENGINES, FAMILIES

    score_help = " ".join(helps["score"].stdout.split())
    assert all(name in score_help for name in [*ENGINES, *FAMILIES]), (
        "the --engine/--family help is out of date"
    )


def test_score_refuses_to_overwrite_without_the_flag(tmp_path):
    data = write(tmp_path / "rows.jsonl", ROWS)
    output = write(tmp_path / "scored.jsonl", "keep me\n")
    args = [
        "score",
        "--model",
        "rh_trl:tiny-rm",
        "--data",
        str(data),
        "--output",
        str(output),
        "--no-progress",
    ]
    done = rh_trl_cli(*args)
    assert done.returncode == 2 and output.read_text() == "keep me\n"
    done = rh_trl_cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = rh_trl.ORM("rh_trl:tiny-rm").score(["Hi", "Name a fruit."], ["Hello there", "A pear."])
    assert [r["reward"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert done.stdout.startswith(f"scored 2 rows with orm_rh_trl_tiny-rm (ORM) -> {output}")
    assert "INFO" not in done.stderr and "\n\n" not in done.stdout  # nothing the user did not ask for


@pytest.mark.parametrize("command", ["serve", "score", "annotate"])
def test_ray_without_ray_is_one_line_naming_the_extra(command, tmp_path, monkeypatch, capsys):
    from rh_trl.cli import main

    for name in ("ray", "ray.data", "ray.serve"):
        monkeypatch.setitem(sys.modules, name, None)  # as if Ray were not installed
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "completion": "b", "responses": ["b"]}\n')
    args = {
        "serve": ["serve", "--ray", "--config", "configs/serve/ray.yaml"],
        "score": ["score", "--ray", "--model", "rh_trl:tiny-rm", "--data", str(rows)],
        "annotate": ["annotate", str(rows), "--ray", "--output-dir", str(tmp_path / "out"), "--reward",
                     '{"type": "orm", "model": "rh_trl:tiny-rm"}'],
    }[command]  # fmt: skip
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'rh_trl[ray]'" in err, err
