"""GRPO with TRL's colocated vLLM generating for the policy and an rh_trl reward on its own in-process vLLM engine, in
one training process, as ``recipes/grpo.py`` runs ``configs/grpo/colocate_vllm.yaml`` (its reward replaced by a tiny
checkpoint's, its GPU settings by CPU ones).

    python colocate_worker.py POLICY_DIR ORM_DIR OUT_DIR

Writes ``OUT_DIR/result.json``: every reward call (completions and rewards), the logged metrics, and how far the
colocated engine's log-probs are from the trained policy's after training (TRL's weight sync) and from the
untrained policy's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT))


class Recorded:
    """The reward as TRL sees it (name, arguments, values), each call recorded."""

    def __init__(self, reward, calls: list) -> None:
        self.reward, self.calls, self.__name__ = reward, calls, reward.__name__

    def __call__(self, prompts, completions, **kwargs):
        values = self.reward(prompts=prompts, completions=completions, **kwargs)
        self.calls.append({"prompts": prompts, "completions": completions, "rewards": values})
        return values


def logprobs_hf(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()


def logprobs_vllm(llm, ids: list[int]) -> list[float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = llm.generate(
        [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]


def main() -> None:
    policy_dir, orm_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

    from rh_trl.integrations.trl_vllm import prepare_colocate
    from rh_trl.training.online import RewardArguments, build_reward_functions, load_prompts

    engine = {"gpu_memory_utilization": 0.3, "max_model_len": 256, "enforce_eager": True}
    cpu = {
        "model_name_or_path": policy_dir, "dtype": "float32", "output_dir": str(out / "run"), "max_steps": "3",
        "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1", "num_generations": "4",
        "max_completion_length": "8", "learning_rate": "0.05", "bf16": "false", "use_cpu": "true",
        "activation_checkpointing": "false", "vllm_enable_sleep_mode": "false", "vllm_max_model_length": "256",
        "offload_rewards": "false", "max_prompts": "16", "logging_steps": "1",
    }  # fmt: skip
    argv = ["--config", str(ROOT / "configs/grpo/colocate_vllm.yaml")]
    for key, value in cpu.items():
        argv += [f"--{key}", value]
    reward_args, args, model_args = TrlParser(
        (RewardArguments, GRPOConfig, ModelConfig)
    ).parse_args_and_config(argv)
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization) == (True, "colocate", 0.3)
    (spec,) = reward_args.rewards
    reward_args.rewards = [{**spec, "model": orm_dir, "name": "orm", "vllm_kwargs": engine}]
    rewards, weights, callbacks = build_reward_functions(reward_args)
    calls: list[dict] = []
    args.reward_weights = weights
    prepare_colocate(args)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    trainer = GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=[Recorded(r, calls) for r in rewards],
        args=args,
        train_dataset=load_prompts(reward_args.dataset_path, reward_args.max_prompts),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    ids = tokenizer("The moon is bright tonight and the trains run fast.")["input_ids"]
    untrained = logprobs_hf(AutoModelForCausalLM.from_pretrained(policy_dir).eval(), ids)
    engine_before = logprobs_vllm(trainer.vllm_generation.llm, ids)
    trainer.train()
    trainer.vllm_generation.sync_weights()  # the last optimizer step came after the last generation
    engine_now = logprobs_vllm(trainer.vllm_generation.llm, ids)
    trained = logprobs_hf(trainer.model, ids)
    result = {
        "engine_vs_hf_before": max(abs(a - b) for a, b in zip(engine_before, untrained, strict=True)),
        "calls": calls,
        "log_history": trainer.state.log_history,
        "sync_diff": max(abs(a - b) for a, b in zip(engine_now, trained, strict=True)),
        "training_moved": max(abs(a - b) for a, b in zip(untrained, trained, strict=True)),
        "reward_engine": type(rewards[0].engine).__name__,
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
