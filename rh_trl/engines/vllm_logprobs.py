"""Span log-probs from an in-process vLLM engine (``vllm.LLM``).

Each sequence goes in as ``TokensPrompt(prompt_token_ids=…)`` (tokenization stays ours) with
``SamplingParams(max_tokens=1, prompt_logprobs=0)``; vLLM's ``RequestOutput.prompt_logprobs`` holds ``None`` for
the first token, then ``{token_id: Logprob}`` for each following one, read by
:func:`~rh_trl.engines.logprobs.span_from_prompt_logprobs`. The one generated token needs a free slot, so the
longest sequence is ``max_model_len - 1``; longer ones get no value (reason ``"too_long"``). With
``enable_sleep_mode=True`` the engine can free its GPU memory while the policy trains
(:meth:`~rh_trl.engines.vllm_llm.InProcessVLLM.sleep` / ``wake_up``).

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from rh_trl.engines.batching import Reason, run_fitting
from rh_trl.engines.logprobs import (
    TokenMismatchError,
    check_span,
    describe_mismatch,
    span_from_prompt_logprobs,
)
from rh_trl.engines.vllm_llm import InProcessVLLM, import_vllm


def span_logprobs_from_output(output: Any, input_ids: Sequence[int], start: int, end: int) -> list[float]:
    """The span's log-probs from one vLLM ``RequestOutput`` of the prompt ``input_ids``.

    ``output.prompt_token_ids`` (when set) must equal ``input_ids``; ``output.prompt_logprobs`` is read as in
    :func:`~rh_trl.engines.logprobs.span_from_prompt_logprobs`.
    """
    scored = getattr(output, "prompt_token_ids", None)
    if scored is not None and list(scored) != list(input_ids):
        raise TokenMismatchError(
            f"vLLM scored other tokens than the ones sent: {describe_mismatch(input_ids, scored)}"
        )
    prompt_logprobs = getattr(output, "prompt_logprobs", None)
    if prompt_logprobs is None:
        raise ValueError(
            "the vLLM output has no prompt_logprobs; the request must set SamplingParams(prompt_logprobs=0)"
        )
    return span_from_prompt_logprobs(prompt_logprobs, input_ids, start, end, source="vLLM")


class VLLMLogprobEngine(InProcessVLLM):
    """A causal LM in a ``vllm.LLM`` of this process, asked for prompt log-probs.

    Args:
        model: a model directory or hub id.
        tokenizer: the tokenizer path vLLM loads (default: the model's; tokenization is done by rh_trl anyway).
        dtype, enable_sleep_mode, gpu_memory_utilization, tensor_parallel_size, max_model_len, **llm_kwargs:
            see :class:`~rh_trl.engines.vllm_llm.InProcessVLLM` (``dtype="auto"``: the checkpoint's dtype).
    """

    reserved_tokens = 1  # max_tokens=1: one slot must stay free

    def __init__(self, model: str | os.PathLike, **llm_kwargs: Any) -> None:
        super().__init__(model, runner="generate", **llm_kwargs)
        vllm = import_vllm()
        self.sampling_params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

    def span_logprobs(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> tuple[list[list[float] | None], list[Reason]]:
        """Log-probs of each span, and per sequence ``None`` or why it got no value (``"too_long"``)."""
        from vllm.inputs import TokensPrompt

        self._check_awake()
        cut = []
        for ids, (start, end) in zip(sequences, spans, strict=True):
            check_span(ids, start, end)
            cut.append([int(t) for t in ids[:end]])
        outputs, reasons = run_fitting(
            f"vLLM engine {self.name}",
            cut,
            self.max_sequence_length,
            lambda fits: self.llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in fits], self.sampling_params, use_tqdm=False
            ),
        )
        values = [
            None if out is None else span_logprobs_from_output(out, ids, start, end)
            for out, ids, (start, end) in zip(outputs, cut, spans, strict=True)
        ]
        return values, reasons
