"""Token log-probabilities: reading them from a causal LM's logits, or from an engine's ``prompt_logprobs``.

Every engine that serves span log-probs (the local transformers engine, in-process vLLM, OpenAI-compatible
servers) gives, for a token sequence ``ids`` and a span ``[start, end)``, the log-probability of each
``ids[t]`` given ``ids[:t]`` for ``t`` in the span. The helpers here do that reading once, for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from rh_trl.engines.http import MalformedResponse

#: upper bound on the float32 elements one chunk of logits may occupy (64 MiB) while reading log-probs
CHUNK_ELEMENTS = 1 << 24


class TokenMismatchError(ValueError):
    """An engine scored other tokens than the ones sent (it tokenized, added or dropped tokens itself)."""


class SpanLogprobs(Protocol):
    """What an engine offers a log-prob reward: the log-probs of each token of a span, given its prefix."""

    def span_logprobs(self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> Any: ...


def check_span(ids: Sequence[int], start: int, end: int) -> None:
    """Raise ``ValueError`` unless ``[start, end)`` is a span of ``ids`` with a token before it to condition on."""
    if not 1 <= start <= end <= len(ids):
        raise ValueError(
            f"span [{start}, {end}) is not within a sequence of {len(ids)} tokens with at least one token "
            "before it (the first token has no log-prob)"
        )


def next_token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, lengths: Sequence[int] | None = None
) -> torch.Tensor:
    """``out[b, t] = log p(input_ids[b, t] | input_ids[b, :t])`` (``NaN`` at ``t = 0`` and at padding).

    Computed as ``logit[target] - logsumexp(logits)`` over chunks of positions, so no full-vocabulary
    ``log_softmax`` of the whole batch is ever materialized: at most :data:`CHUNK_ELEMENTS` float32 values
    exist at a time on top of the model's own logits.

    Args:
        logits: ``[batch, seq, vocab]`` (any float dtype).
        input_ids: ``[batch, seq]``.
        lengths: real (unpadded) length of each row; by default every row is ``seq`` long.
    """
    batch, seq, vocab = logits.shape
    out = torch.full((batch, seq), float("nan"), dtype=torch.float32, device=logits.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab))
    for b in range(batch):
        n = seq if lengths is None else int(lengths[b])
        for s in range(0, max(0, n - 1), rows):
            e = min(n - 1, s + rows)
            chunk = logits[b, s:e].float()  # predicts tokens s+1 … e
            targets = input_ids[b, s + 1 : e + 1].unsqueeze(-1)
            out[b, s + 1 : e + 1] = chunk.gather(-1, targets).squeeze(-1) - torch.logsumexp(chunk, dim=-1)
    return out


def read_token_logprobs(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An :class:`~rh_trl.engines.hf.HFEngine` reader: each real token's log-prob given its prefix, ``[batch, seq]``.

    Batches are right-padded, so row ``b`` is real up to ``attention_mask[b].sum()``.
    """
    lengths = attention_mask.sum(-1).tolist()
    return next_token_logprobs(outputs.logits, input_ids, lengths)


def _entry_logprob(value: Any) -> float | None:
    value = value.get("logprob") if isinstance(value, Mapping) else getattr(value, "logprob", value)
    return float(value) if isinstance(value, int | float) else None


def span_from_prompt_logprobs(
    prompt_logprobs: Any, input_ids: Sequence[int], start: int, end: int, *, source: str = "engine"
) -> list[float]:
    """The span's log-probs from vLLM-style ``prompt_logprobs`` of the sequence ``input_ids``.

    ``prompt_logprobs`` has one entry per prompt token: ``None`` for the first, then a mapping from token id
    (an ``int`` from in-process vLLM, a ``str`` in JSON) to a ``Logprob`` object or a
    ``{"logprob", "rank", "decoded_token"}`` dict. The entry at position ``t`` must contain ``input_ids[t]``
    (it always holds the actual token, plus the top-k when more were asked for); otherwise the engine scored
    other tokens than the ones sent and :class:`TokenMismatchError` names both.
    """
    check_span(input_ids, start, end)
    if not isinstance(prompt_logprobs, Sequence) or isinstance(prompt_logprobs, str | bytes):
        raise MalformedResponse(
            f"{source}: prompt_logprobs must be a list with one entry per prompt token, "
            f"got {type(prompt_logprobs).__name__}"
        )
    if len(prompt_logprobs) != len(input_ids):
        raise TokenMismatchError(
            f"{source} returned prompt log-probs for {len(prompt_logprobs)} tokens but {len(input_ids)} were "
            "sent; it must score the token ids exactly as sent (no BOS added or removed)"
        )
    values: list[float] = []
    for t in range(start, end):
        entry = prompt_logprobs[t]
        if not isinstance(entry, Mapping):
            raise MalformedResponse(
                f"{source}: prompt_logprobs[{t}] must be a mapping token id -> logprob, got {type(entry).__name__}"
            )
        token = int(input_ids[t])
        value = entry[token] if token in entry else entry.get(str(token))
        if value is None:
            raise TokenMismatchError(
                f"{source}: at position {t} the log-probs are for token id(s) {sorted(map(str, entry))[:5]} "
                f"but the token sent there is {token}"
            )
        logprob = _entry_logprob(value)
        if logprob is None:
            raise MalformedResponse(
                f"{source}: prompt_logprobs[{t}][{token}] has no numeric 'logprob': {value!r}"
            )
        values.append(logprob)
    return values


def describe_mismatch(ours: Sequence[int], theirs: Sequence[int]) -> str:
    """A short description of where two token sequences first differ."""
    n = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
    )
    lo = max(0, n - 3)
    return (
        f"ours has {len(ours)} tokens, the server's {len(theirs)}; first difference at position {n}: "
        f"ours[{lo}:{n + 4}]={list(ours[lo : n + 4])}, server's[{lo}:{n + 4}]={list(theirs[lo : n + 4])}"
    )


class HFSpanLogprobs:
    """Span log-probs from a causal LM in this process, through :class:`~rh_trl.engines.hf.HFEngine`.

    Each sequence is cut after its span (later tokens cannot change earlier log-probs in a causal LM), so
    sequences that share everything up to the span's end run once. A sequence longer than the model's
    position embeddings gets no value (reason ``"too_long"``).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def max_sequence_length(self) -> int | None:
        return self.engine.max_sequence_length

    def span_logprobs(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> tuple[list[list[float] | None], list[str | None]]:
        """Log-probs of each span, and per sequence ``None`` or why it got no value."""
        for ids, (start, end) in zip(sequences, spans, strict=True):
            check_span(ids, start, end)
        cut = [list(ids[:end]) for ids, (_, end) in zip(sequences, spans, strict=True)]
        rows, reasons = self.engine.run_checked(cut, read_token_logprobs)
        values = [
            None if row is None else row[start:end].tolist()
            for row, (start, end) in zip(rows, spans, strict=True)
        ]
        return values, reasons
