"""Span log-probs from an in-process vLLM engine (``vllm.LLM``).

Each sequence goes in as ``TokensPrompt(prompt_token_ids=…)`` (tokenization stays ours) with
``SamplingParams(max_tokens=1, prompt_logprobs=0)``; vLLM's ``RequestOutput.prompt_logprobs`` holds ``None`` for
the first token, then ``{token_id: Logprob}`` for each following one, read by
:func:`~rh_trl.engines.logprobs.span_from_prompt_logprobs`. With ``enable_sleep_mode=True`` the engine can
free its GPU memory while the policy trains (:meth:`VLLMLogprobEngine.sleep` / :meth:`~VLLMLogprobEngine.wake_up`).

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rh_trl.engines.logprobs import (
    TokenMismatchError,
    check_span,
    describe_mismatch,
    span_from_prompt_logprobs,
)


def import_vllm() -> Any:
    """Import vLLM, or raise an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the in-process vLLM engine needs vLLM, which is not installed: pip install 'rh_trl[vllm]'"
        ) from err
    return vllm


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


class VLLMLogprobEngine:
    """A causal LM in a ``vllm.LLM`` of this process, asked for prompt log-probs.

    Args:
        model: a model directory or hub id.
        tokenizer: the tokenizer path vLLM loads (default: the model's; tokenization is done by rh_trl anyway).
        gpu_memory_utilization: fraction of GPU memory this engine may take (leave room for training).
        enable_sleep_mode: allow :meth:`sleep` / :meth:`wake_up`, to share GPUs with training.
        tensor_parallel_size, max_model_len, dtype: passed to ``vllm.LLM``.
        llm_kwargs: any other ``vllm.LLM`` argument.
    """

    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        gpu_memory_utilization: float = 0.4,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        **llm_kwargs: Any,
    ) -> None:
        if not isinstance(model, str):
            raise TypeError(f"the vLLM engine loads models by path or hub id; got a {type(model).__name__}")
        vllm = import_vllm()
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = vllm.LLM(
            model=model,
            tokenizer=tokenizer,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            dtype=dtype,
            **llm_kwargs,
        )
        self.sampling_params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        self.asleep = False

    def span_logprobs(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[list[float]]:
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep; call wake_up() before scoring")
        cut = []
        for ids, (start, end) in zip(sequences, spans, strict=True):
            check_span(ids, start, end)
            cut.append([int(t) for t in ids[:end]])
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in cut], self.sampling_params, use_tqdm=False
        )
        if len(outputs) != len(cut):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(cut)} prompts")
        return [
            span_logprobs_from_output(out, ids, start, end)
            for out, ids, (start, end) in zip(outputs, cut, spans, strict=True)
        ]

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory (level 1 offloads weights to CPU; level 2 drops them)."""
        if not self.enable_sleep_mode:
            raise RuntimeError("sleep() needs the engine built with enable_sleep_mode=True")
        self.llm.sleep(level=level)
        self.asleep = True

    def wake_up(self) -> None:
        """Bring the engine back after :meth:`sleep`."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
