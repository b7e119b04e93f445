"""OpenRLHF 0.11.2's own rollout and reward code against a real ``rh-trl serve`` (``pytest -m ppo``).

What runs is OpenRLHF's: ``PromptDataset`` renders the prompts, ``RolloutRayActor.generate_responses`` and
``generate`` drive ``SingleTurnAgentExecutor``, whose ``_fetch_rewards_via_http`` posts to ``/get_reward`` at the
documentation's ``--reward.remote_url``; ``SamplesGenerator._process_response_into_experience`` turns each answer into
an ``Experience`` (where a ``null`` reward crashed the rollout), and ``Experience.concat_experiences`` batches
them as the experience maker does.

Stubbed, because these paths never use it: the ``vllm`` module (imported at the top of OpenRLHF's rollout
modules; only ``SamplingParams``, ``TokensPrompt`` and ``random_uuid`` are touched, as plain containers), and the
vLLM engine itself: ``RolloutRayActor.__init__`` places GPUs and builds ``vllm.AsyncLLMEngine``, so the actor is
made without it and ``self.llm`` answers each prompt with a fixed response ending in the policy's EOS, as vLLM
returns a finished generation. The actor's methods are called in this process instead of through Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shlex
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("openrlhf")
pytest.importorskip("fastapi")

from rh_trl.serve.config import RewardSpec, build_reward, load_config  # noqa: E402
from rh_trl.testing import bpe_tokenizer  # noqa: E402

from .ppo_support import ROOT, ServeProcess, docs_block, save_tiny_prm  # noqa: E402
from .test_server import free_port  # noqa: E402

pytestmark = pytest.mark.ppo

TOL = 1e-5
ROWS = [
    {"context_messages": [{"role": "user", "content": "What is 12 times 4?"}], "label": "48"},
    {"context_messages": [{"role": "user", "content": "Name a river in Egypt."}], "label": "Nile"},
    {"context_messages": [{"role": "user", "content": "Say something kind."}], "label": ""},
]
RESPONSES = {
    "What is 12 times 4?": "12 times 4 is 48.",
    "Name a river in Egypt.": "The Nile.",
    "Say something kind.": "You are doing well today.",
}


# -- OpenRLHF's modules, imported with the vllm stub in place only while they load -----------------------------------


@dataclass
class SamplingParams:
    """The fields of ``vllm.SamplingParams`` OpenRLHF's executor reads."""

    max_tokens: int | None = None
    logprobs: int | None = None
    temperature: float = 1.0


@contextlib.contextmanager
def vllm_stub():
    if importlib.util.find_spec("vllm") is not None:  # the real one, where installed
        yield
        return
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "0.29.0"
    vllm.SamplingParams = SamplingParams
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = dict
    vllm.utils = types.ModuleType("vllm.utils")
    vllm.utils.random_uuid = lambda: uuid.uuid4().hex
    stubs = {"vllm": vllm, "vllm.inputs": vllm.inputs, "vllm.utils": vllm.utils}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


with vllm_stub():
    from openrlhf.datasets import PromptDataset
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor
    from openrlhf.utils.agent import SingleTurnAgentExecutor


class FixedResponses:
    """Stand-in for ``vllm.AsyncLLMEngine``: a finished generation of the fixed response to each prompt."""

    def __init__(self, tokenizer, responses: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.responses = responses

    async def generate(self, prompt, sampling_params, request_id):
        text = self.tokenizer.decode(prompt["prompt_token_ids"])
        response = next((r for q, r in self.responses.items() if q in text), "")
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        output = SimpleNamespace(
            token_ids=ids, text=self.tokenizer.decode(ids), finish_reason="stop", logprobs=None
        )
        yield SimpleNamespace(outputs=[output])


def rollout_actor(remote_rm_url: list[str], llm) -> RolloutRayActor:
    """OpenRLHF's rollout actor without its GPU/vLLM setup: what ``__init__`` sets for the single-turn executor."""
    cls = RolloutRayActor.__ray_actor_class__
    actor = cls.__new__(cls)
    actor.executor = SingleTurnAgentExecutor(remote_rm_url)
    actor.llm = llm
    actor._mm_pad_token_ids = None
    return actor


# -- the documentation's command line ----------------------------------------------------------------------------------------


def readme_openrlhf() -> tuple[str, dict[str, str | bool]]:
    """The server config and OpenRLHF's flags from the documentation's block, every flag checked against OpenRLHF's
    own ``train_ppo_ray`` parser source (the module imports DeepSpeed and vLLM, so it is read, not run)."""
    block = docs_block("openrlhf-command").replace("\\\n", " ")
    serve = next(line for line in block.splitlines() if line.startswith("rh-trl serve"))
    config = shlex.split(serve)[shlex.split(serve).index("--config") + 1]
    command = shlex.split(next(line for line in block.splitlines() if "openrlhf.cli.train_ppo_ray" in line))
    assert command[:3] == ["python", "-m", "openrlhf.cli.train_ppo_ray"]
    source = Path(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin).read_text()
    flags: dict[str, str | bool] = {}
    args = command[3:]
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            assert f'"{arg}"' in source, f"documented flag {arg} is not an option of OpenRLHF's train_ppo_ray"
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            flags[arg] = args[i + 1] if has_value else True
    return config, flags


def remote_urls(flags: dict, port: int) -> list[str]:
    """``--reward.remote_url`` split as ``train_ppo_ray`` splits it, pointed at the test server's port."""
    return [url.replace(":8000/", f":{port}/") for url in str(flags["--reward.remote_url"]).split(",")]


def prompt_dataset(tokenizer, flags: dict, rows: list[dict] = ROWS) -> PromptDataset:
    data = SimpleNamespace(
        input_key=flags["--data.input_key"],
        label_key=flags["--data.label_key"],
        apply_chat_template=bool(flags.get("--data.apply_chat_template")),
        image_key="images",
    )
    strategy = SimpleNamespace(args=SimpleNamespace(data=data), is_rank_0=lambda: True)
    return PromptDataset(rows, tokenizer, strategy)


async def rollout(actor, dataset, tokenizer, n: int, max_length: int = 512) -> list[dict]:
    """Every prompt of ``dataset``, ``n`` samples each, concurrently (as the rollout actors run them)."""
    results = await asyncio.gather(
        *(
            actor.generate_responses(
                prompt=prompt,
                label=label,
                sampling_params=SamplingParams(max_tokens=32),
                max_length=max_length,
                hf_tokenizer=tokenizer,
                num_samples=n,
            )
            for _, prompt, label, _ in dataset
        )
    )
    return [response for per_prompt in results for response in per_prompt]


def experiences(tokenizer, responses: list[dict]) -> Experience:
    generator = SamplesGenerator(SimpleNamespace(args=None), None, None, tokenizer, [])
    samples = [generator._process_response_into_experience(r, max_len=512) for r in responses]
    return Experience.concat_experiences(samples, tokenizer.pad_token_id)


def response_text(tokenizer, response: dict) -> str:
    start, end = response["action_ranges"][0]
    return tokenizer.decode(response["observation_tokens"][start:end], skip_special_tokens=True)


# -- tests ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_tokenizer():
    return bpe_tokenizer("llama")


def test_readme_command_rollout_rewards_equal_local_scoring(tmp_path, policy_tokenizer):
    config_path, flags = readme_openrlhf()
    config = load_config(ROOT / config_path)
    default = config.get_reward_default
    assert default and "?model=" not in str(flags["--reward.remote_url"])  # a default, not a 400
    port = free_port()
    server = ServeProcess(ROOT / config_path, port, tmp_path / "serve.log")
    try:
        actor = rollout_actor(remote_urls(flags, port), FixedResponses(policy_tokenizer, RESPONSES))
        dataset = prompt_dataset(policy_tokenizer, flags)
        n = int(flags["--rollout.n_samples_per_prompt"])
        responses = asyncio.run(rollout(actor, dataset, policy_tokenizer, n))
        batch = experiences(policy_tokenizer, responses)
        metrics = server.metrics(default)
    finally:
        server.stop()

    assert len(responses) == len(ROWS) * n
    # local scoring of the same samples with the reward the server hosts: the prompt OpenRLHF rendered, and the
    # response without the policy's EOS
    spec = next(s for s in config.rewards if s.name == default)
    local = build_reward(spec).score(
        [r["prompt"] for r in responses], [response_text(policy_tokenizer, r) for r in responses]
    )
    got = batch.rewards.flatten().tolist()
    assert max(abs(a - b) for a, b in zip(got, local, strict=True)) <= TOL
    assert batch.scores.flatten().tolist() == got
    assert batch.info["rh_trl/failed"].flatten().tolist() == [0] * len(responses)
    assert batch.info["rh_trl/query_without_prompt"].flatten().tolist() == [0] * len(responses)
    assert metrics["samples"] == len(responses) and metrics["counts"].get("get_reward_failed", 0) == 0


def test_unscorable_sample_gets_failure_score_counted_and_rollout_goes_on(tmp_path, policy_tokenizer):
    _, flags = readme_openrlhf()
    prm_dir = save_tiny_prm(tmp_path / "prm")
    config_path = tmp_path / "serve.yaml"
    spec = {
        "name": "prm",
        "type": "auto",
        "model": str(prm_dir),
        "options": {"family": "prm", "kind": "next_token"},
        "strip_suffixes": ["</s>"],
        "failure_score": -3.0,
    }
    config_path.write_text(yaml.safe_dump({"rewards": [spec]}))
    # the policy answers the last prompt with EOS at once: a PRM has no steps to score in an empty response
    answers = {**RESPONSES, "Say something kind.": "", "Tell me.": "A story.\n\nIt ends well."}
    long_rows = [{"context_messages": [{"role": "user", "content": "Tell me. " * 60}], "label": ""}]
    port = free_port()
    server = ServeProcess(config_path, port, tmp_path / "serve.log")
    try:
        actor = rollout_actor(remote_urls(flags, port), FixedResponses(policy_tokenizer, answers))
        dataset = prompt_dataset(policy_tokenizer, flags)
        responses = asyncio.run(rollout(actor, dataset, policy_tokenizer, 1))
        # a prompt longer than max_length - max_tokens: OpenRLHF cuts it, so the query no longer starts with it
        long_prompt = prompt_dataset(policy_tokenizer, flags, long_rows)
        responses += asyncio.run(rollout(actor, long_prompt, policy_tokenizer, 1, max_length=64))
        batch = experiences(policy_tokenizer, responses)  # crashed on a null reward before
        metrics = server.metrics("prm")
        log = server.log()
    finally:
        server.stop()

    rewards = batch.rewards.flatten().tolist()
    failed = batch.info["rh_trl/failed"].flatten().tolist()
    assert failed == [0, 0, 1, 0] and rewards[2] == -3.0
    assert batch.info["rh_trl/query_without_prompt"].flatten().tolist() == [0, 0, 0, 1]
    local = build_reward(RewardSpec.model_validate(spec)).score(
        [r["prompt"] for r in responses[:2]], [response_text(policy_tokenizer, r) for r in responses[:2]]
    )
    assert max(abs(a - b) for a, b in zip(rewards[:2], local, strict=True)) <= TOL
    assert metrics["counts"]["get_reward_failed"] == 1
    assert metrics["counts"]["get_reward_query_without_prompt"] == 1
    assert "answered failure_score=-3.0" in log and "do not start with their prompt" in log
