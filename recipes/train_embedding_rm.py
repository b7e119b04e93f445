"""Train an embedding-based reward model: frozen encoder vectors + small MLP heads, on CPU.

    python recipes/train_embedding_rm.py --config configs/embedding/tiny.yaml
    python recipes/train_embedding_rm.py --config configs/embedding/minilm_hh.yaml

1. Preference pairs are read and split into training and held-out pairs exactly as ``recipes/train_bt.py``
   does (``eval_fraction``, ``seed``); ``validation_fraction`` holds back part of the training pairs for
   choosing settings without looking at the held-out pairs.
2. Every chosen and rejected response is embedded by the frozen encoder (``rh_trl.rewards.text_encoder.TextEncoder``),
   through an on-disk cache: a second run with the same encoder and layout embeds nothing.
3. ``num_heads`` heads are trained with the Bradley-Terry or the classification loss
   (``rh_trl.rewards.embedding_heads.train_heads``).
4. The result is saved as an ``rh_trl.EmbeddingRM`` directory (normalized by the mean and std of its rewards on
   the training responses); its held-out accuracy is computed by scoring the held-out pairs through the reward
   itself, as ``recipes/eval_rm.py`` does. The time of each phase goes to ``embedding_rm_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from trl import TrlParser

from rh_trl.data.evaluation import reward_accuracy, shorter_reply
from rh_trl.data.preferences import FORMATS, PreferenceDataError, load_pairs, split_pairs
from rh_trl.rewards.embedding import EmbeddingRM
from rh_trl.rewards.embedding_heads import HeadTraining, ensemble_scores, pair_accuracy, train_heads
from rh_trl.rewards.text_encoder import TextEncoder, default_cache_dir

logger = logging.getLogger("rh_trl.train_embedding_rm")

BUILTIN_DATA = "rh_trl:synthetic"
TINY_PREFIX = "rh_trl:tiny-"
SUMMARY_NAME = "embedding_rm_summary.json"


@dataclass
class EmbeddingRMArguments:
    """The encoder, the data, the heads and where the result goes."""

    encoder_model: str = field(
        default="rh_trl:minilm",
        metadata={
            "help": "path / hub id, 'rh_trl:minilm' (PyPI MiniLM) or a tiny offline model 'rh_trl:tiny-…'"
        },
    )
    encoder_kind: str | None = field(
        default=None, metadata={"help": "'sentence' or 'causal' (default: guessed)"}
    )
    pooling: str | None = field(default=None, metadata={"help": "'mean', 'last' or 'cls' (default: by kind)"})
    normalize_embeddings: bool | None = field(
        default=None, metadata={"help": "L2-normalize (default: by kind)"}
    )
    max_length: int = field(default=256, metadata={"help": "longest input, cut from the prompt's left"})
    prompt_turns: int = field(
        default=0, metadata={"help": "keep only the last N prompt messages (1: the final user turn; 0: all)"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "'plain' forces plain text; a Jinja template; default: by kind"}
    )
    dataset_path: str = field(
        default=BUILTIN_DATA, metadata={"help": f"a preference file, or '{BUILTIN_DATA}'"}
    )
    dataset_format: str = field(default="auto", metadata={"help": f"one of {FORMATS}"})
    skip_invalid_pairs: bool = field(default=False, metadata={"help": "leave out unreadable rows (counted)"})
    eval_fraction: float = field(
        default=0.2, metadata={"help": "share of the pairs held out (as train_bt.py)"}
    )
    validation_fraction: float = field(
        default=0.0, metadata={"help": "share of the training pairs held back for choosing settings"}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    loss: str = field(default="bt", metadata={"help": "'bt' (Bradley-Terry) or 'classification'"})
    num_heads: int = field(default=1, metadata={"help": "ensemble size (seeds seed, seed+1, …)"})
    hidden_dims: list[int] = field(default_factory=lambda: [256], metadata={"help": "MLP hidden widths"})
    activation: str = "gelu"
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = field(default=0, metadata={"help": "data split and head seeds"})
    cache_dir: str | None = field(
        default=None, metadata={"help": "embedding cache (default: ~/.cache/rh_trl)"}
    )
    output_dir: str = "outputs/embedding-rm"
    device: str | None = field(
        default=None, metadata={"help": "where the encoder runs (default: GPU if any)"}
    )
    dtype: str = "auto"
    max_tokens_per_batch: int = 16384
    progress: bool = True

    def head_training(self) -> HeadTraining:
        return HeadTraining(
            loss=self.loss,  # type: ignore[arg-type]
            num_heads=self.num_heads,
            hidden_dims=list(self.hidden_dims),
            activation=self.activation,
            dropout=self.dropout,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )


def build_encoder(args: EmbeddingRMArguments) -> TextEncoder:
    """The frozen encoder, with the embedding cache."""
    model: Any = args.encoder_model
    tokenizer = None
    if model.startswith(TINY_PREFIX):
        from rh_trl.models.loading import offline_model

        model, tokenizer = offline_model(model, seed=args.seed)
    chat_template: str | bool | None = False if args.chat_template == "plain" else args.chat_template
    return TextEncoder(
        model,
        tokenizer,
        kind=args.encoder_kind,  # type: ignore[arg-type]
        pooling=args.pooling,  # type: ignore[arg-type]
        normalize=args.normalize_embeddings,
        max_length=args.max_length,
        prompt_turns=args.prompt_turns or None,
        chat_template=chat_template,
        cache=args.cache_dir or default_cache_dir(),
        max_tokens_per_batch=args.max_tokens_per_batch,
        device=args.device,
        dtype=args.dtype,
        progress=args.progress,
    )


def load_data(args: EmbeddingRMArguments) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, validation, held-out) pairs; the held-out pairs are those ``train_bt.py`` holds out."""
    if args.dataset_path == BUILTIN_DATA:
        from rh_trl.models.offline import synthetic_preferences

        pairs = load_pairs(synthetic_preferences(96, args.seed))
    else:
        pairs = load_pairs(args.dataset_path, args.dataset_format, skip_invalid=args.skip_invalid_pairs)
    train, held_out = split_pairs(pairs, args.eval_fraction, args.seed)
    validation: list[dict] = []
    if args.validation_fraction > 0:
        train, validation = split_pairs(train, args.validation_fraction, args.seed)
    if args.max_pairs is not None:
        train = train[: args.max_pairs]
    if not train:
        raise PreferenceDataError(
            f"no training pairs: {len(pairs)} pairs read, eval_fraction={args.eval_fraction}, "
            f"validation_fraction={args.validation_fraction}, max_pairs={args.max_pairs}"
        )
    return train, validation, held_out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((EmbeddingRMArguments,)).parse_args_and_config(argv)
    settings = args.head_training()
    train, validation, held_out = load_data(args)
    encoder = build_encoder(args)
    print(f"encoder {encoder.name}: {encoder.settings()}; cache {encoder.cache.path}")  # type: ignore[union-attr]

    start = time.perf_counter()
    vectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for split, pairs in (("train", train), ("validation", validation), ("held_out", held_out)):
        if pairs:
            chosen, rejected, split_counts = encoder.embed_pairs(pairs)
            vectors[split] = (chosen, rejected)
            for key, n in split_counts.items():
                counts[key] = counts.get(key, 0) + n
    embedding_seconds = time.perf_counter() - start
    texts = 2 * (len(train) + len(validation) + len(held_out))
    print(
        f"embedding: {texts} responses in {embedding_seconds:.1f} s (cache: {counts.get('cache_hits', 0)} hits, "
        f"{counts.get('cache_misses', 0)} embedded); cut from the left to {args.max_length} tokens: "
        f"{counts.get('truncated', 0)}"
    )

    trained = train_heads(*vectors["train"], settings)
    print(f"training: {settings.num_heads} head(s), {settings.loss} loss, {trained.seconds:.1f} s")

    # every head's scores of each split's chosen then rejected vectors: [num_heads, 2 × pairs]
    per_head = {split: ensemble_scores(trained.heads, torch.cat(pair)) for split, pair in vectors.items()}
    train_scores = per_head["train"].mean(0)
    mean, std = float(train_scores.mean()), float(train_scores.std(unbiased=False)) or 1.0
    reward = EmbeddingRM(encoder, trained.heads, normalization=(mean, std), name="embedding_rm")

    summary: dict[str, Any] = {
        "encoder": encoder.name,
        "encoder_settings": encoder.settings(),
        "training": settings.to_dict(),
        "train_pairs": len(train),
        "validation_pairs": len(validation),
        "eval_pairs": len(held_out),
        "embedding_seconds": embedding_seconds,
        "training_seconds": trained.seconds,
        "embedded_responses": counts.get("cache_misses", 0),
        "cached_responses": counts.get("cache_hits", 0),
        "truncated": counts.get("truncated", 0),
        "final_losses": trained.final_losses,
        "reward_mean": mean,
        "reward_std": std,
    }
    for split, scores in per_head.items():
        n = vectors[split][0].shape[0]
        mean_scores = scores.mean(0)
        summary[f"{split}_accuracy_per_head"] = [pair_accuracy(s[:n], s[n:]) for s in scores]
        summary[f"{split}_accuracy_from_vectors"] = pair_accuracy(mean_scores[:n], mean_scores[n:])
    if held_out:
        start = time.perf_counter()
        summary["eval_accuracy"] = reward_accuracy(reward, held_out)
        summary["eval_scoring_seconds"] = time.perf_counter() - start
        summary["eval_accuracy_shorter_reply"] = reward_accuracy(shorter_reply, held_out)
        print(
            f"held-out accuracy on {len(held_out)} pairs: {summary['eval_accuracy']:.4f} "
            f"(heads: {', '.join(f'{a:.4f}' for a in summary['held_out_accuracy_per_head'])}); "
            f"shorter final reply wins {summary['eval_accuracy_shorter_reply']:.4f}"
        )
    if validation:
        print(
            f"validation accuracy on {len(validation)} pairs: {summary['validation_accuracy_from_vectors']:.4f}"
        )

    output = Path(args.output_dir)
    reward.save(output, training=settings.to_dict(), data=args.dataset_path)
    (output / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
    print(f"saved {output} (load with rh_trl.EmbeddingRM.from_pretrained)")
    return summary


if __name__ == "__main__":
    main()
