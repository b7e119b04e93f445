"""The per-reward token cap: a sample longer than the cap gets ``None`` before it can reach a forward pass.

The cap counts the tokens of a sample's text (prompt and completion contents, without the chat template) with
the reward's own tokenizer. Checking is cheap for ordinary samples: one that has no more UTF-8 bytes than the
cap cannot have more tokens (every token of a byte-level or byte-fallback tokenizer covers at least one byte),
so only longer ones are tokenized, and only as far as needed to see the cap exceeded: a prefix of growing
length, counting just the tokens that end well before the cut. A 1 MB prompt under a 4,096-token cap costs a
tokenization of about 16 kB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("rh_trl")

#: cap for rewards whose context length cannot be found (and that have no ``max_sample_tokens``)
FALLBACK_TOKENS = 32768
#: tokens ending this many characters before a prefix's cut are counted as final
_CUT_MARGIN = 64


def sample_text(prompt: Any, completion: Any) -> str:
    """The text of a sample in either TRL format (message contents joined by newlines)."""
    return _text(prompt) + "\n" + _text(completion)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text(m.get("content", "")) if isinstance(m, dict) else _text(m) for m in value)
    return str(value)


def reward_tokenizers(reward: Any) -> list[Any]:
    """The tokenizers a reward renders with (``tokenizer``, ``tokenizers`` or ``encoder.tokenizer``)."""
    found = []
    for candidate in (
        getattr(reward, "tokenizer", None),
        *dict(getattr(reward, "tokenizers", None) or {}).values(),
        getattr(getattr(reward, "encoder", None), "tokenizer", None),
    ):
        if candidate is not None and callable(candidate) and candidate not in found:
            found.append(candidate)
    return found


def context_length(reward: Any) -> int | None:
    """The longest input the reward's model takes: the model config's ``max_position_embeddings``; else the
    reward's ``max_length``; else the tokenizer's ``model_max_length`` when that is a real number. (A
    ``max_length`` that truncates, as ORM's does, stays in force below the cap: samples between the two are
    truncated and scored.)"""
    config = getattr(getattr(reward, "model", None), "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    for owner in (reward, getattr(reward, "formatter", None), getattr(reward, "encoder", None)):
        value = getattr(owner, "max_length", None) if owner is not None else None
        if isinstance(value, int) and value > 0:
            return value
    lengths = [getattr(t, "model_max_length", None) for t in reward_tokenizers(reward)]
    lengths = [n for n in lengths if isinstance(n, int) and 0 < n < 10**7]
    return min(lengths) if lengths else None


class TokenCap:
    """Decides which samples are longer than ``max_tokens`` tokens for a reward (module docstring)."""

    def __init__(self, reward: Any, max_tokens: int | None = None) -> None:
        self.tokenizers = reward_tokenizers(reward)
        found = context_length(reward)
        self.max_tokens = max_tokens or found or FALLBACK_TOKENS
        self.source = "config" if max_tokens else "model" if found else "fallback"
        if not self.tokenizers:
            logger.info(
                "%s: no tokenizer found; its %d-token cap counts UTF-8 bytes",
                getattr(reward, "__name__", "reward"),
                self.max_tokens,
            )

    def may_exceed(self, prompt: Any, completion: Any) -> bool:
        """Cheap: False when the sample certainly fits (no more UTF-8 bytes than the cap)."""
        text = sample_text(prompt, completion)
        return len(text) > self.max_tokens // 4 and len(text.encode("utf-8", "replace")) > self.max_tokens

    def too_long(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[int]:
        """Indices of the samples with more tokens than the cap (tokenizes only the ones that may exceed it)."""
        return [
            i
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
            if self.may_exceed(p, c) and self._exceeds(sample_text(p, c))
        ]

    def _exceeds(self, text: str) -> bool:
        if not self.tokenizers:
            return True  # more UTF-8 bytes than the cap, which counts bytes here
        return any(self._exceeds_with(tok, text) for tok in self.tokenizers)

    def _exceeds_with(self, tokenizer: Any, text: str) -> bool:
        cap = self.max_tokens
        if not getattr(tokenizer, "is_fast", False):
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]) > cap
        size = 4 * (cap + _CUT_MARGIN)
        while True:
            if size >= len(text):
                return len(tokenizer(text, add_special_tokens=False)["input_ids"]) > cap
            offsets = tokenizer(text[:size], add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            settled = sum(1 for _, end in offsets if end <= size - _CUT_MARGIN)
            if settled > cap:
                return True
            size *= 2
