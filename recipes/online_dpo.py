"""Online DPO (``trl.experimental.online_dpo``) with rh_trl rewards choosing the preferred completion.

    accelerate launch recipes/online_dpo.py --config configs/online_dpo/tiny.yaml
    python recipes/online_dpo.py --config configs/online_dpo/tiny.yaml

Each step samples two completions per prompt, scores both with the configured rewards (weighted by their
``weight``), and trains DPO on the better/worse pair. Same config keys as ``recipes/grpo.py``; the reward
statistics land in each wrapper's ``last_stats`` (this trainer passes no ``log_metric``).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import ModelConfig, TrlParser

from rh_trl.engines.zero3 import zero3_enabled
from rh_trl.training.online import (
    RewardArguments,
    build_reward_functions,
    load_policy,
    load_prompts,
    setup_logging,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    setup_logging()
    parser = TrlParser((RewardArguments, OnlineDPOConfig, ModelConfig))
    reward_args, training_args, model_args = parser.parse_args_and_config(argv)
    policy = (
        model_args.model_name_or_path or "rh_trl:tiny-policy",
        model_args.dtype,
        getattr(training_args, "trust_remote_code", False),
    )
    model, tokenizer = load_policy(*policy)
    # under ZeRO-3 the trainer cannot copy the partitioned policy into its reference model: load it a second time
    ref_model = load_policy(*policy)[0] if zero3_enabled() else None
    reward_funcs, weights, callbacks = build_reward_functions(reward_args)
    training_args.reward_weights = weights
    trainer = OnlineDPOTrainer(
        model=model,
        ref_model=ref_model,
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
