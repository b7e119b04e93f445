"""GRPO against rh_trl rewards listed in a YAML config.

    accelerate launch recipes/grpo.py --config configs/grpo/tiny.yaml
    python recipes/grpo.py --config configs/grpo/tiny.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml recipes/grpo.py --config configs/grpo/qwen2.5_1.5b_skywork.yaml
    python recipes/grpo.py --config configs/grpo/colocate_vllm.yaml   # TRL's colocated vLLM + a vLLM reward

The config holds GRPOConfig fields, ``model_name_or_path`` (a path, a hub id or ``rh_trl:tiny-policy``), and
``rewards``: specs for ``rh_trl.rewards.factory.build_rewards`` whose ``weight`` s become ``reward_weights``.
Prompts come from ``dataset_path`` (JSONL/Parquet with a ``prompt`` column) or the bundled prompts.
``normalize_rewards``, ``reward_statistics`` and ``offload_rewards`` switch on the rh_trl callbacks.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser

from rh_trl.integrations.trl_vllm import prepare_colocate
from rh_trl.training.online import (
    RewardArguments,
    build_reward_functions,
    load_policy,
    load_prompts,
    setup_logging,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    parser = TrlParser((RewardArguments, GRPOConfig, ModelConfig))
    reward_args, training_args, model_args = parser.parse_args_and_config(argv)
    model, tokenizer = load_policy(
        model_args.model_name_or_path or "rh_trl:tiny-policy",
        model_args.dtype,
        getattr(training_args, "trust_remote_code", False),
    )
    reward_funcs, weights, callbacks = build_reward_functions(reward_args)
    training_args.reward_weights = weights
    prepare_colocate(training_args)  # TRL's colocated vLLM beside vLLM rewards: memory split, CPU weight sync
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=load_prompts(reward_args.dataset_path, reward_args.max_prompts),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():  # the logged metrics, for comparing runs
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
    return {"log_history": trainer.state.log_history, "reward_names": [f.__name__ for f in reward_funcs]}


if __name__ == "__main__":
    main()
