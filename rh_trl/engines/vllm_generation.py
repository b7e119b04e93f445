"""Generation with an in-process ``vllm.LLM``, for LLM judges and CLoud critiques.

:class:`VLLMGenerator` takes the same token ids as :class:`~rh_trl.engines.generation.HFGenerator` (prompts are
rendered here, with the judge's own tokenizer and chat template), stops at the same tokens (vLLM's own EOS rule is
turned off and the stop tokens are passed explicitly) and decodes the new tokens here, so greedy generation gives
the same text on both engines. Sampling uses vLLM's per-request seeds: with ``seed`` set, a prompt's continuation
depends only on the seed and the prompt, not on what else is in the batch.

A prompt gets at most ``max_model_len - len(prompt)`` new tokens (such a continuation ends unfinished); a prompt
with no room left gets none (an empty :class:`~rh_trl.engines.generation.Generation` whose ``reason`` is
``"too_long"``; the rewards count it).

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from rh_trl.engines.generation import Generation, TokenGenerator
from rh_trl.engines.vllm_llm import InProcessVLLM, import_vllm


class VLLMGenerator(TokenGenerator):
    """Generation with a causal LM in a ``vllm.LLM`` of this process.

    Args:
        model: a model directory or hub id, or the engine of another ``VLLMGenerator`` (an
            :class:`~rh_trl.engines.vllm_llm.InProcessVLLM` with ``runner="generate"``) to share with other settings.
        tokenizer: the model's tokenizer (chat template, stop tokens, decoding).
        seed: with ``do_sample``, makes each prompt's sample reproducible (``None``: random).
        max_new_tokens, do_sample, temperature, top_p, stop_token_ids: see
            :class:`~rh_trl.engines.generation.TokenGenerator`.
        dtype, enable_sleep_mode, gpu_memory_utilization, max_model_len, **llm_kwargs: the engine (see
            :class:`~rh_trl.engines.vllm_llm.InProcessVLLM`; ``dtype="auto"``: the checkpoint's dtype).
    """

    def __init__(
        self,
        model: str | os.PathLike | InProcessVLLM,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__(
            tokenizer,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stop_token_ids,
        )
        self.seed = seed
        if isinstance(model, InProcessVLLM):
            if llm_kwargs:
                raise TypeError(
                    f"engine settings {sorted(llm_kwargs)} were given with an already-built engine"
                )
            self.engine = model
        else:
            self.engine = InProcessVLLM(model, runner="generate", **llm_kwargs)

    @property
    def max_sequence_length(self) -> int:
        """The longest prompt that still gets one new token."""
        return self.engine.max_model_len - 1

    def sleep(self, level: int = 1) -> None:
        """Free the engine's accelerator memory (see :meth:`InProcessVLLM.sleep`)."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def close(self) -> None:
        self.engine.close()

    def _params(self, prompt: tuple[int, ...]) -> Any:
        vllm = import_vllm()
        room = max(0, self.engine.max_model_len - len(prompt))
        settings: dict[str, Any] = {
            "max_tokens": min(self.max_new_tokens, room),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": True,  # the stop tokens above are the only ones, as in HFGenerator
            "detokenize": False,  # decoded here, as in HFGenerator
            "skip_special_tokens": True,
        }
        if self.do_sample:
            settings.update(temperature=self.temperature, top_p=self.top_p)
            if self.seed is not None:
                digest = hashlib.blake2b(repr((self.seed, prompt)).encode(), digest_size=4).digest()
                settings["seed"] = int.from_bytes(digest, "little")
        else:
            settings["temperature"] = 0.0
        return vllm.SamplingParams(**settings)

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Continue every prompt (token ids); results in the order of ``prompts``."""
        from vllm.inputs import TokensPrompt

        keys, unique = self.distinct(prompts)
        self.engine._check_awake()
        results: dict[tuple[int, ...], Generation] = {}
        todo = []
        for prompt in unique:
            if len(prompt) >= self.engine.max_model_len:  # no room for a single new token
                results[prompt] = Generation("", [], finished=False, reason="too_long")
            else:
                todo.append(prompt)
        if todo:
            outputs = self.engine.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in todo],
                [self._params(p) for p in todo],
                use_tqdm=False,
            )
            for prompt, output in zip(todo, outputs, strict=True):
                completion = output.outputs[0]
                results[prompt] = self.finish(completion.token_ids, completion.finish_reason == "stop")
        return [results[k] for k in keys]
