"""Iterative (online) DPO, RLHFlow style: sample, score with rh_trl rewards, pair best vs worst, train DPO, repeat.

    python recipes/iterative_dpo.py --config configs/iterative_dpo/tiny.yaml
    accelerate launch recipes/iterative_dpo.py --config configs/iterative_dpo/llama3_8b_skywork.yaml

For each of ``iterations`` rounds, starting from ``model_name_or_path`` and then from the previous round's
model: sample ``num_samples`` responses per prompt (vLLM when installed and ``generation_backend`` allows,
transformers ``generate`` otherwise), score them with the configured rewards (weighted sum), keep the best and
the worst as a preference pair (ties and prompts with fewer than two scored responses are skipped), and train
``trl.DPOTrainer`` on the pairs for ``num_train_epochs``. Round ``k`` writes ``output_dir/iter_k/``:
``samples.jsonl`` (every response and score), ``pairs.jsonl``, ``model/`` and, last, the marker ``DONE``.
A restarted run skips rounds with a marker and reuses a round's samples if they were written completely.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset
from trl import DPOConfig, DPOTrainer, ModelConfig, TrlParser

from rh_trl.cli.annotate import combined_scores, generate_responses, generate_responses_vllm, select
from rh_trl.rewards.factory import build_rewards
from rh_trl.training.online import RewardArguments, load_policy, load_prompts, setup_logging

logger = logging.getLogger("rh_trl.iterative_dpo")

MARKER = "DONE"


@dataclass
class IterativeArguments:
    """The loop: rounds, sampling and the generation backend."""

    iterations: int = field(default=2, metadata={"help": "rounds of sample → score → DPO"})
    num_samples: int = field(default=4, metadata={"help": "responses sampled per prompt"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest sampled response"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    generation_batch_size: int = field(default=8, metadata={"help": "prompts per generate() call"})
    generation_backend: str = field(default="auto", metadata={"help": "auto | vllm | transformers"})


def use_vllm(backend: str) -> bool:
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"generation_backend must be auto, vllm or transformers, got {backend!r}")
    if backend == "transformers":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if backend == "vllm":
            raise ImportError("generation_backend 'vllm' needs vLLM: pip install 'rh_trl[vllm]'") from None
        return False
    return True


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows to ``path`` atomically (a reader never sees a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_and_score(
    model_path: str,
    loop: IterativeArguments,
    prompts: list[Any],
    rewards: list[Any],
    weights: list[float],
    seed: int,
) -> list[dict[str, Any]]:
    """Every prompt's sampled responses with their combined scores."""
    if use_vllm(loop.generation_backend) and not model_path.startswith("rh_trl:"):
        responses = generate_responses_vllm(
            model_path,
            prompts,
            loop.num_samples,
            loop.max_new_tokens,
            loop.temperature,
            loop.top_p,
            seed=seed,
        )
    else:
        model, tokenizer = load_policy(model_path)
        if __import__("torch").cuda.is_available():
            model = model.cuda()
        responses = generate_responses(
            model, tokenizer, prompts, loop.num_samples, loop.max_new_tokens, loop.temperature, loop.top_p,
            loop.generation_batch_size, seed=seed,
        )  # fmt: skip
        del model
    flat_prompts = [p for p, rs in zip(prompts, responses, strict=True) for _ in rs]
    flat = [
        r if isinstance(p, str) else [{"role": "assistant", "content": r}]
        for p, r in zip(flat_prompts, sum(responses, []), strict=False)
    ]
    scores = combined_scores(rewards, weights, flat_prompts, flat)
    n = loop.num_samples
    return [
        {"prompt": p, "responses": responses[i], "scores": scores[i * n : (i + 1) * n]}
        for i, p in enumerate(prompts)
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    parser = TrlParser((IterativeArguments, RewardArguments, DPOConfig, ModelConfig))
    loop, reward_args, dpo_args, model_args = parser.parse_args_and_config(argv)
    if loop.iterations < 1 or loop.num_samples < 2:
        raise ValueError(
            f"need iterations >= 1 and num_samples >= 2, got {loop.iterations} and {loop.num_samples}"
        )
    root = Path(dpo_args.output_dir)
    prompts = list(load_prompts(reward_args.dataset_path, reward_args.max_prompts)["prompt"])
    rewards, weights = build_rewards(reward_args.rewards)
    model_path = model_args.model_name_or_path or "rh_trl:tiny-policy"
    summary: list[dict[str, Any]] = []
    for k in range(loop.iterations):
        folder = root / f"iter_{k}"
        if (folder / MARKER).is_file():
            logger.info("iteration %d already done; skipping", k)
            summary.append(json.loads((folder / MARKER).read_text()))
            model_path = str(folder / "model")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        samples_path = folder / "samples.jsonl"
        if samples_path.is_file():
            samples = read_jsonl(samples_path)
        else:
            samples = sample_and_score(model_path, loop, prompts, rewards, weights, seed=dpo_args.seed + k)
            write_jsonl(samples_path, samples)
        pairs = [
            p for s in samples for p in select(s["prompt"], s["responses"], s["scores"], "best_worst", 0.0)[0]
        ]
        write_jsonl(folder / "pairs.jsonl", pairs)
        if not pairs:
            raise RuntimeError(
                f"iteration {k}: every prompt's responses tied or went unscored; no pairs to train on"
            )
        model, tokenizer = load_policy(model_path)
        args = copy.deepcopy(dpo_args)
        args.output_dir = str(folder / "train")
        trainer = DPOTrainer(
            model=model,
            ref_model=load_policy(model_path)[0],  # the round's starting policy, frozen
            args=args,
            train_dataset=Dataset.from_list(
                [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
            ),
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "model"))
        done = {
            "iteration": k,
            "pairs": len(pairs),
            "prompts": len(samples),
            "mean_best": sum(p["score_chosen"] for p in pairs) / len(pairs),
            "mean_score": _mean([x for s in samples for x in s["scores"] if x is not None]),
            "train_loss": trainer.state.log_history[-1].get("train_loss"),
        }
        (folder / MARKER).write_text(json.dumps(done))  # written last: the iteration is complete
        logger.info("iteration %d: %s", k, done)
        summary.append(done)
        model_path = str(folder / "model")
    return {"iterations": summary, "final_model": model_path}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    main()
