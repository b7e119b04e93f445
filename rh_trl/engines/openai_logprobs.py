"""Span log-probs from an OpenAI-compatible completions server (``vllm serve``, or rh_trl's own test server).

Tokenization stays ours: each request sends token ids as the prompt (``"prompt": [[ids…], [ids…]]``, several
sequences per request) with ``max_tokens: 1`` and vLLM's ``prompt_logprobs: 0`` extension, which returns, per
prompt, ``None`` for the first token and then ``{token_id: {"logprob", "rank", "decoded_token"}}`` for each
following one. Servers without ``prompt_logprobs`` are read through the legacy ``echo: true`` +
``logprobs: 0`` route instead (``use_prompt_logprobs=False``), whose ``logprobs.token_logprobs`` starts with the
prompt's tokens.

The token ids the server scored are checked against ours (``return_token_ids: true`` makes vLLM return
``prompt_token_ids``; otherwise the keys of ``prompt_logprobs``, or ``token_id:N`` tokens with
``return_tokens_as_token_ids``): a server that adds or changes tokens raises
:class:`~rh_trl.engines.logprobs.TokenMismatchError` naming both sequences. A request that still fails after
the retries gives ``None`` for its sequences (reason ``"server_failed"``); one the server refuses (4xx other
than 401/403) is retried one sequence per request, and the sequences it still refuses get ``None`` (reason
``"server_rejected"``). A 200 answer that does not follow the schema raises
:class:`~rh_trl.engines.http.MalformedResponse`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from rh_trl.engines.batching import Reason
from rh_trl.engines.http import MalformedResponse
from rh_trl.engines.logprobs import (
    TokenMismatchError,
    check_span,
    describe_mismatch,
    span_from_prompt_logprobs,
)
from rh_trl.engines.server_batches import SequenceBatchClient

logger = logging.getLogger("rh_trl")

_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


def _json_prompt_logprobs(entries: Any, ids: list[int]) -> list[float] | None:
    """The fast reading of a well-formed JSON ``prompt_logprobs`` (``NaN`` first, then each token's log-prob), or
    ``None`` when anything deviates from the schema; the general reader then names what is wrong."""
    if not isinstance(entries, list) or len(entries) != len(ids):
        return None
    try:
        values = [entries[t][str(ids[t])]["logprob"] for t in range(1, len(ids))]
    except (KeyError, TypeError, IndexError):
        return None
    if not all(type(v) is float or type(v) is int for v in values):
        return None
    return [float("nan"), *map(float, values)]


class OpenAILogprobClient(SequenceBatchClient[list[float]]):
    """Reads span log-probs from one OpenAI-compatible server (or several replicas of one model).

    Args:
        urls, **options: the server(s) and ``model``, ``api_key``, ``batch_size``, ``max_concurrency``, ``retry``,
            ``transport``, ``label``: see :class:`~rh_trl.engines.server_batches.SequenceBatchClient`.
        use_prompt_logprobs: ask for vLLM's ``prompt_logprobs``; ``False`` uses ``echo`` + ``logprobs``.
        check_token_ids: compare the token ids the server reports with the ones sent.
    """

    PATH = "/v1/completions"
    reserved_tokens = 1  # max_tokens=1: one slot must stay free

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        use_prompt_logprobs: bool = True,
        check_token_ids: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(urls, **options)
        self.use_prompt_logprobs = use_prompt_logprobs
        self.check_token_ids = check_token_ids

    # -- requests --------------------------------------------------------------------------------------------

    def payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        """The JSON body asking for the log-probs of every token of ``prompts``."""
        body: dict[str, Any] = {"prompt": prompts, "max_tokens": 1, "temperature": 0.0}
        if self.model is not None:
            body["model"] = self.model
        if self.use_prompt_logprobs:
            body.update(prompt_logprobs=0, return_token_ids=True)
        else:
            body.update(echo=True, logprobs=0, return_tokens_as_token_ids=True)
        return body

    async def span_logprobs(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> tuple[list[list[float] | None], list[Reason]]:
        """Log-probs of each span, and per sequence ``None`` or why it got no value.

        Sequences are cut after their span (later tokens cannot change a causal LM's log-probs before them).
        """
        if len(sequences) != len(spans):
            raise ValueError(f"got {len(sequences)} sequences and {len(spans)} spans; expected one span each")
        for ids, (start, end) in zip(sequences, spans, strict=True):
            check_span(ids, start, end)
        cut = [ids[:end] for ids, (_, end) in zip(sequences, spans, strict=True)]
        logprobs, reasons = await self.run(cut)
        values = [
            None if lp is None else lp[start:end] for lp, (start, end) in zip(logprobs, spans, strict=True)
        ]
        return values, reasons

    # -- responses -------------------------------------------------------------------------------------------

    def parse(self, answer: Any, prompts: list[list[int]]) -> list[list[float]]:
        """Read one answer: per prompt, the log-prob of every token, position 0 included as ``NaN``."""
        where = f"{self.label} server {self.pool.urls[0]}"
        choices = self.entries(answer, "choices", len(prompts), where)
        return [
            self._parse_choice(c, ids, f"{where}, prompt {i}")
            for i, (c, ids) in enumerate(zip(choices, prompts, strict=True))
        ]

    def _parse_choice(self, choice: Any, ids: list[int], where: str) -> list[float]:
        if not isinstance(choice, dict):
            raise MalformedResponse(f"{where}: a choice must be a JSON object, got {str(choice)[:200]}")
        scored = choice.get("prompt_token_ids")
        if self.check_token_ids and scored is not None and [int(t) for t in scored] != ids:
            raise TokenMismatchError(
                f"{where} scored other tokens than the ones sent: {describe_mismatch(ids, scored)}"
            )
        if self.use_prompt_logprobs:
            if "prompt_logprobs" not in choice or choice["prompt_logprobs"] is None:
                raise MalformedResponse(
                    f"{where}: the answer has no 'prompt_logprobs' (keys: {sorted(choice)}); the server may not "
                    "support vLLM's prompt_logprobs: use_prompt_logprobs=False reads echo + logprobs instead"
                )
            entries = choice["prompt_logprobs"]
            fast = _json_prompt_logprobs(entries, ids)
            if fast is not None:
                return fast
            return [float("nan"), *span_from_prompt_logprobs(entries, ids, 1, len(ids), source=where)]
        return self._parse_echo(choice, ids, where)

    def _parse_echo(self, choice: dict[str, Any], ids: list[int], where: str) -> list[float]:
        logprobs = choice.get("logprobs")
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        if not isinstance(values, list) or len(values) < len(ids):
            raise MalformedResponse(
                f"{where}: with echo=true, logprobs.token_logprobs must start with one entry per prompt token "
                f"({len(ids)}); got {str(logprobs)[:200]}"
            )
        tokens = logprobs.get("tokens")
        if self.check_token_ids and isinstance(tokens, list) and len(tokens) >= len(ids):
            matches = [_TOKEN_ID.match(str(t)) for t in tokens[: len(ids)]]
            if all(matches):
                scored = [int(m.group(1)) for m in matches]  # type: ignore[union-attr]
                if scored != ids:
                    raise TokenMismatchError(
                        f"{where} scored other tokens than the ones sent: {describe_mismatch(ids, scored)}"
                    )
        out = [float("nan")]
        for t in range(1, len(ids)):
            if not isinstance(values[t], int | float):
                raise MalformedResponse(
                    f"{where}: logprobs.token_logprobs[{t}] is {values[t]!r}, not a number"
                )
            out.append(float(values[t]))
        return out
