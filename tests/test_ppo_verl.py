"""verl 0.9.1's own rollout and reward loop against rh_trl (``pytest -m ppo``).

What runs is verl's: Hydra composes the documentation's config file on top of verl's ``ppo_trainer.yaml``,
``migrate_legacy_reward_impl`` moves the reward settings as ``main_ppo`` does, ``RLHFDataset`` reads gsm8k-style
rows (the layout of verl's ``examples/data_preprocess/gsm8k.py``) and builds ``raw_prompt``,
``AgentLoopWorker.generate_sequences`` runs the single-turn agent loop for every sample concurrently and sends
each finished sample to a ``RewardLoopWorker``, which loads the reward manager named in the config (ours, or
verl's ``NaiveRewardManager`` with a custom reward function) and returns ``rm_scores``.

Stubbed, because the reward path never uses them: the LLM server (the rollout engine; it answers each prompt with
a fixed response ending in the policy's EOS), and Ray: ``RewardLoopWorker`` is built in this process instead of
as an actor (``RewardLoopManager`` wraps the same class in ``ray.remote``), its handle's
``compute_score.remote(data)`` awaiting the same method.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("verl")
pytest.importorskip("hydra")
pytest.importorskip("fastapi")

from hydra import compose, initialize_config_dir  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker  # noqa: E402
from verl.experimental.reward_loop import RewardLoopWorker, migrate_legacy_reward_impl  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from rh_trl.rewards import factory  # noqa: E402
from rh_trl.serve.config import build_reward, load_config  # noqa: E402
from rh_trl.testing import bpe_tokenizer, tiny_causal_lm  # noqa: E402

from .ppo_support import ROOT, ServeProcess, docs_block, save_tiny_prm  # noqa: E402
from .test_server import free_port  # noqa: E402

pytestmark = pytest.mark.ppo

TOL = 1e-5
INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
GSM8K = [  # question, answer, the policy's response
    (
        "Natalia sold clips to 48 friends in April and half as many in May. How many in all?",
        "72",
        "48 + 24 = 72\n\n#### 72",
    ),
    (
        "Weng earns $12 an hour. She worked 50 minutes. How much did she earn?",
        "10",
        "12 / 60 * 50 = 10\n\n#### 10",
    ),
    (
        "Betty needs $100 and has half of it. Her parents give $15. How much more?",
        "5",
        "50 - 15 = 35\n\n#### 35",
    ),
    ("James writes 3 pages to 2 friends twice a week. How many pages a year?", "624", ""),  # EOS at once
]
ROLLOUT_N = 3


# -- verl's inputs: a policy directory, gsm8k-style rows, the documentation's config ------------------------------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy")
    tokenizer = bpe_tokenizer("llama")
    tiny_causal_lm(tokenizer, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    """Rows as verl's gsm8k preprocessing writes them: the prompt the policy sees is the question plus an
    instruction, and extra_info keeps the bare question."""
    rows = [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question + INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": "train", "index": i, "answer": answer, "question": question},
        }
        for i, (question, answer, _) in enumerate(GSM8K)
    ]
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def verl_config(tmp_path, policy_dir, gsm8k_file, overrides: list[str]):
    """verl's config as ``main_ppo`` gets it from the documentation's file, plus the settings a run gives on the command
    line (model, data, rollout engine) and ``overrides``."""
    (tmp_path / "rh_trl_ppo.yaml").write_text(docs_block("verl-config") + "\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        config = compose(
            "rh_trl_ppo",
            overrides=[
                f"actor_rollout_ref.model.path={policy_dir}",
                "actor_rollout_ref.rollout.name=vllm",
                f"data.train_files={gsm8k_file}",
                *overrides,
            ],
        )
    return migrate_legacy_reward_impl(config)


class FixedResponses:
    """Stand-in for verl's LLM server: the fixed response to each gsm8k question, then the policy's EOS."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    async def generate(self, request_id, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        text = self.tokenizer.decode(prompt_ids)
        response = next(r for q, _, r in GSM8K if q in text)
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return TokenOutput(token_ids=ids, stop_reason="completed")


class InProcessHandle:
    """A Ray actor handle's ``compute_score.remote(data)`` for a worker in this process."""

    def __init__(self, worker: RewardLoopWorker) -> None:
        self.compute_score = type("Method", (), {"remote": staticmethod(worker.compute_score)})()


def run_rollout(config) -> tuple[DataProto, RewardLoopWorker]:
    """verl's dataset → agent loop (ROLLOUT_N samples per prompt, all at once) → reward loop worker."""

    async def rollout() -> tuple[DataProto, RewardLoopWorker]:
        # built on the running loop, as Ray builds an async actor (verl's managers keep the loop they see)
        reward_worker = RewardLoopWorker(config)
        tokenizer = reward_worker.input_tokenizer
        dataset = RLHFDataset(str(config.data.train_files), tokenizer, config.data)
        batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(dataset))]))
        agent = AgentLoopWorker(
            config,
            llm_client=FixedResponses(tokenizer),
            reward_loop_worker_handles=[InProcessHandle(reward_worker)],
        )
        return await agent.generate_sequences(batch.repeat(ROLLOUT_N, interleave=True)), reward_worker

    return asyncio.run(rollout())


def scores_and_texts(output: DataProto, tokenizer) -> tuple[list[float], list[list[dict]], list[list[dict]]]:
    """The reward at each sample's last response token, its raw_prompt and its response as an assistant turn."""
    scores = output.batch["rm_scores"].sum(-1).tolist()
    lengths = output.batch["response_mask"].sum(-1).tolist()
    prompts = [list(p) for p in output.non_tensor_batch["raw_prompt"]]
    completions = [
        [{"role": "assistant", "content": tokenizer.decode(ids[:n], skip_special_tokens=True)}]
        for ids, n in zip(output.batch["responses"], lengths, strict=True)
    ]
    return scores, prompts, completions


# -- tests ------------------------------------------------------------------------------------------------------------


def test_readme_config_rewards_equal_local_scoring_of_raw_prompt(tmp_path, policy_dir, gsm8k_file):
    config_path = ROOT / "configs/serve/tiny.yaml"
    port = free_port()
    server = ServeProcess(config_path, port, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        config = verl_config(tmp_path, policy_dir, gsm8k_file, [f"reward.reward_kwargs.reward.urls={url}"])
        output, worker = run_rollout(config)
        metrics = server.metrics(config.reward.reward_kwargs.reward.model)
        # the other way verl scores (RewardLoopManager.compute_rm_score): a worker's whole chunk at once
        chunk = asyncio.run(worker.compute_score_batch(output))
    finally:
        server.stop()

    assert type(worker.reward_manager).__name__ == "RhTrlRewardManager"
    scores, prompts, completions = scores_and_texts(output, worker.input_tokenizer)
    assert len(scores) == len(GSM8K) * ROLLOUT_N
    # the prompt scored is the one the policy saw, instruction included, not extra_info's bare question
    assert all(p[-1]["content"].endswith(INSTRUCTION) for p in prompts)
    spec = next(
        s for s in load_config(config_path).rewards if s.name == config.reward.reward_kwargs.reward.model
    )
    local = build_reward(spec).score(prompts, completions)
    assert max(abs(a - b) for a, b in zip(scores, local, strict=True)) <= TOL
    assert output.non_tensor_batch["rh_trl/failed"].tolist() == [0.0] * len(scores)
    # verl's 12 concurrent per-sample calls reached the server as merged requests
    assert metrics["samples"] == len(scores) and metrics["requests"] < len(scores) / 2
    rm_scores = type(worker.reward_manager).assemble_rm_scores(output, [c["reward_score"] for c in chunk])
    assert (rm_scores - output.batch["rm_scores"]).abs().max().item() <= TOL


def test_reward_built_in_process_batches_calls_and_failure_score_marks_unscorable(
    tmp_path, policy_dir, gsm8k_file
):
    prm_dir = save_tiny_prm(tmp_path / "prm")
    spec = {"type": "prm", "model": str(prm_dir), "kind": "next_token"}
    overrides = [
        "~reward.reward_kwargs.reward",  # replaced, not merged into the documentation's remote spec
        f"+reward.reward_kwargs.reward={{type: prm, model: '{prm_dir}', kind: next_token}}",
        "reward.reward_kwargs.failure_score=-2.5",
        "+reward.reward_kwargs.max_wait_ms=50",
    ]
    config = verl_config(tmp_path, policy_dir, gsm8k_file, overrides)
    output, worker = run_rollout(config)

    scores, prompts, completions = scores_and_texts(output, worker.input_tokenizer)
    failed = output.non_tensor_batch["rh_trl/failed"].tolist()
    empty = [c[0]["content"] == "" for c in completions]
    assert sum(empty) == ROLLOUT_N and failed == [
        float(e) for e in empty
    ]  # a PRM has no steps to score there
    assert all(s == -2.5 for s, e in zip(scores, empty, strict=True) if e)
    local = factory.build_reward(spec).score(prompts, completions)
    assert all(v is None for v, e in zip(local, empty, strict=True) if e)
    diffs = [abs(s - v) for s, v, e in zip(scores, local, empty, strict=True) if not e]
    assert max(diffs) <= TOL and not any(math.isnan(d) for d in diffs)
    manager = worker.reward_manager
    assert manager.num_failed == ROLLOUT_N
    assert manager.batcher.metrics.batches < len(scores) / 2  # concurrent calls merged into batches


def test_compute_score_function_raises_instead_of_scoring_the_bare_question(tmp_path, policy_dir, gsm8k_file):
    overrides = [
        "reward.reward_manager.source=register",
        "reward.reward_manager.name=naive",
        "custom_reward_function.path=pkg://rh_trl.integrations.verl",
        "custom_reward_function.name=compute_score",
        "+custom_reward_function.reward_kwargs={url: 'http://127.0.0.1:9', model: tiny}",
    ]
    config = verl_config(tmp_path, policy_dir, gsm8k_file, overrides)
    with pytest.raises(
        ValueError, match=r"extra_info has no 'prompt' \(it has \[.*'question'.*\]\).*prompt_key"
    ):
        run_rollout(config)


def test_manager_settings_and_batches_without_raw_prompt_are_refused(tmp_path, policy_dir, gsm8k_file):
    from rh_trl.integrations.verl import RhTrlRewardManager

    config = verl_config(tmp_path, policy_dir, gsm8k_file, ["~reward.reward_kwargs.failure_score"])
    with pytest.raises(ValueError, match="failure_score"):
        RhTrlRewardManager(config, tokenizer=None)
    config = verl_config(tmp_path, policy_dir, gsm8k_file, [])
    tokenizer = bpe_tokenizer("llama")
    manager = RhTrlRewardManager(config, tokenizer)
    ids = torch.tensor([[5, 6, 7]])
    data = DataProto.from_dict(
        tensors={"prompts": ids, "responses": ids, "attention_mask": torch.ones(1, 6, dtype=torch.long)},
        non_tensors={"data_source": np.array(["openai/gsm8k"], dtype=object)},
    )
    with pytest.raises(ValueError, match=r"raw_prompt.*it has \['data_source'\]"):
        asyncio.run(manager.run_single(data))
