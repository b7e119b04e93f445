"""DrSow: the density ratio of a strong and a weak language model as a reward.

    reward(x, y) = log p_strong(y | x) - log p_weak(y | x)

summed over the response tokens (``reduction="sum"``, as in the DrSow paper and its code) or with each model's
log-prob averaged over its own response tokens (``reduction="mean"``). Typical pairs: an aligned model and its
base, or a model fine-tuned on preferred answers and the model it started from.

Each model sees the conversation through its *own* tokenizer and chat template
(:class:`~rh_trl.formatting.ChatFormatter`), so the two may use different vocabularies and templates. The
response span starts at ``Encoded.response_start`` (from the tokenizer's character offsets) and ends after the
last token that overlaps the response text; the span is checked against the token ids (the tokens after the
span must equal those of the rendered text's tail, and the span's tokens must decode to the response text).

What the span covers:

* conversational input with a chat template: the response's tokens; ``include_end_of_turn=True`` adds the
  template's tokens after it (e.g. ``<|im_end|>\\n``), which also rewards ending the turn.
* standard-format strings (``prompt + completion``, with the tokenizer's own special tokens, no EOS) and
  conversations rendered in the plain layout: the completion's tokens; ``include_eos=True`` appends the EOS
  token and scores it too.

Engines (same numbers from each): ``"hf"`` runs both models in this process; ``"openai"`` asks two
OpenAI-compatible servers (``vllm serve``; see ``recipes/launch_drsow.sh``) for ``prompt_logprobs`` of our
token ids; ``"vllm"`` runs two in-process ``vllm.LLM`` engines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rh_trl.engines.batching import reason_counts
from rh_trl.engines.hf import HFEngine
from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.formatting import ChatFormatter, RewardInputError, Sample, encode_samples
from rh_trl.models.loading import load_model, load_tokenizer, padding_id
from rh_trl.rewards.base import Batch, Reward, RewardOutput

logger = logging.getLogger("rh_trl")

Engine = Literal["hf", "openai", "vllm"]
Reduction = Literal["sum", "mean"]


class SpanError(ValueError):
    """The response span of a sample could not be located or verified."""


@dataclass(frozen=True)
class Span:
    """A tokenized sample and its response span ``input_ids[start:end]``."""

    input_ids: list[int]
    start: int
    end: int
    truncated: str | None = None


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


class SpanEncoder:
    """Renders samples with one model's tokenizer and template and finds the response span (see module doc)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        include_end_of_turn: bool = False,
        include_eos: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(
            tokenizer,
            max_length=max_length,
            chat_template=chat_template,
            text_as_chat=text_as_chat,
            add_eos=include_eos,
            chat_template_kwargs=chat_template_kwargs,
        )
        self.include_end_of_turn = include_end_of_turn
        self.include_eos = include_eos

    def encode(self, sample: Sample) -> Span:
        templated = sample.conversational and self.formatter.uses_chat_template
        text, response_char, add_special = self.formatter.render(sample)
        if response_char is None:
            raise SpanError("the response could not be located in the rendered text")
        scores_tail = self.include_end_of_turn if templated else self.include_eos
        end_char = None if scores_tail else self._response_end_char(text, response_char, sample)
        encoded = self.formatter.encode_rendered(text, response_char, add_special, end_char)
        if encoded.response_start is None:
            raise SpanError("the response could not be located in the rendered text")
        ids, start = encoded.input_ids, encoded.response_start
        if end_char is None:
            tail = 0
        elif encoded.tail_tokens is not None:  # from the same offsets (fast tokenizers)
            tail = encoded.tail_tokens
        else:
            tail = self._tail_tokens(text, end_char, add_special)
        end = len(ids) - tail
        if end < start:
            raise SpanError(f"the response span ends (token {end}) before it starts (token {start})")
        if start < 1:
            raise SpanError(
                "the response starts at the first token, so nothing conditions it; give a non-empty prompt "
                "or a tokenizer that adds a BOS token"
            )
        if encoded.truncated != "response":
            self._check(ids[start:end], sample)
        return Span(ids, start, end, encoded.truncated)

    @staticmethod
    def _response_end_char(text: str, response_char: int, sample: Sample) -> int:
        """Where the response text ends in ``text`` (templates may trim it)."""
        for needle in (sample.response_text, sample.response_text.strip()):
            at = text.find(needle, response_char)
            if at >= 0:
                return at + len(needle)
        raise SpanError(
            "the chat template changed the response text beyond trimming; its end cannot be located"
        )

    def _tail_tokens(self, text: str, end_char: int, add_special: bool) -> int:
        """How many tokens of the tokenized ``text`` follow ``end_char``, for slow tokenizers (no offsets): the
        tokens of the whole text after those it shares with the tokenized ``text[:end_char]``."""
        full = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
        prefix = self.tokenizer(text[:end_char], add_special_tokens=add_special)["input_ids"]
        n = 0
        while n < min(len(full), len(prefix)) and full[n] == prefix[n]:
            n += 1
        return len(full) - n

    def _check(self, span_ids: list[int], sample: Sample) -> None:
        expected = _squash(sample.response_text)
        decoded = _squash(self.tokenizer.decode(span_ids, skip_special_tokens=False))
        if expected not in decoded:
            raise SpanError(
                f"the response span's tokens decode to {decoded[:80]!r}, which does not contain the response "
                f"{expected[:80]!r}"
            )


class DrSow(Reward):
    """DrSow reward: ``log p_strong(y|x) - log p_weak(y|x)`` over the response tokens (see the module doc).

    Args:
        strong, weak: for ``engine="hf"``, model directories, hub ids or loaded causal LMs; for ``"openai"``,
            server base URLs (``http://host:port``, one or a list of replicas); for ``"vllm"``, model paths (or
            :class:`~rh_trl.engines.vllm_logprobs.VLLMLogprobEngine` s built before, to share them).
        strong_tokenizer, weak_tokenizer: each model's tokenizer (object or path); by default loaded from the
            model path. Required for ``"openai"``.
        engine: ``"hf"``, ``"openai"`` or ``"vllm"``.
        reduction: ``"sum"`` (the DrSow paper) or ``"mean"`` (each model's mean token log-prob).
        name: metric name (default ``drsow_<strong>_vs_<weak>``, made unique).
        include_end_of_turn: with a chat template, also score the template's tokens after the response.
        include_eos: for plain layouts (standard strings, or no template), append EOS and score it.
        system_prompt: a system message inserted into conversational prompts that have none.
        system_prompt_column: a dataset column holding a system prompt per sample (overrides ``system_prompt``
            where the value is a non-empty string).
        max_length: longest input per model in tokens; longer samples lose prompt tokens from the left. Default:
            the longest each engine takes (position embeddings; ``max_model_len - 1`` on vLLM, whose one generated
            token needs a slot). A sample longer than an engine takes gets ``None`` (``num_too_long``).
        chat_template, strong_chat_template, weak_chat_template, text_as_chat, chat_template_kwargs: see
            :class:`~rh_trl.formatting.ChatFormatter` (the per-model templates override ``chat_template``).
        dtype: ``"auto"`` (default) is each checkpoint's own dtype on ``"hf"`` and ``"vllm"`` alike (``config.json``;
            float32 when it names none), so both give the same numbers; or a dtype name.
        device, device_map, max_tokens_per_batch, max_batch_size, trust_remote_code, progress: the ``"hf"``
            engine (as in :class:`~rh_trl.rewards.orm.ORM`).
        strong_model, weak_model, api_key, strong_api_key, weak_api_key: the ``"openai"`` engine's served models
            and keys (see :class:`~rh_trl.engines.openai_logprobs.OpenAILogprobClient`).
        batch_size, max_concurrency, retry, use_prompt_logprobs, transport: the ``"openai"`` engine's requests.
        gpu_memory_utilization, enable_sleep_mode, tensor_parallel_size, max_model_len, vllm_kwargs: the
            ``"vllm"`` engine (see :class:`~rh_trl.engines.vllm_logprobs.VLLMLogprobEngine`).
        strict: raise on a sample that cannot be read, rendered or scored instead of giving it ``None``.
    """

    def __init__(
        self,
        strong: Any,
        weak: Any,
        *,
        strong_tokenizer: Any = None,
        weak_tokenizer: Any = None,
        engine: Engine = "hf",
        reduction: Reduction = "sum",
        name: str | None = None,
        include_end_of_turn: bool = False,
        include_eos: bool = False,
        system_prompt: str | None = None,
        system_prompt_column: str | None = None,
        max_length: int | None = None,
        chat_template: str | bool | None = None,
        strong_chat_template: str | bool | None = None,
        weak_chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        # hf
        device: str | torch.device | None = None,
        device_map: Any = None,
        dtype: str | torch.dtype | None = "auto",
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        # openai
        strong_model: str | None = None,
        weak_model: str | None = None,
        api_key: str | None = None,
        strong_api_key: str | None = None,
        weak_api_key: str | None = None,
        batch_size: int = 16,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        use_prompt_logprobs: bool = True,
        transport: Any = None,
        # vllm
        gpu_memory_utilization: float = 0.4,
        enable_sleep_mode: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        vllm_kwargs: dict[str, Any] | None = None,
        strict: bool = False,
    ) -> None:
        if engine not in ("hf", "openai", "vllm"):
            raise ValueError(f"engine must be 'hf', 'openai' or 'vllm', got {engine!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
        self.engine_kind = engine
        self.reduction = reduction
        self.system_prompt = system_prompt
        self.system_prompt_column = system_prompt_column
        self.engines: dict[str, Any] = {}
        self.tokenizers: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for side, source, tokenizer, model_name, key in (
            ("strong", strong, strong_tokenizer, strong_model, strong_api_key),
            ("weak", weak, weak_tokenizer, weak_model, weak_api_key),
        ):
            if engine == "hf":
                model = load_model(
                    source,
                    _causal_lm_class(),
                    dtype=dtype,
                    device=device,
                    device_map=device_map,
                    trust_remote_code=trust_remote_code,
                )
                tok = load_tokenizer(tokenizer, model, trust_remote_code=trust_remote_code)
                pad = getattr(model.config, "pad_token_id", None)
                hf = HFEngine(
                    model,
                    pad if isinstance(pad, int) else padding_id(tok),
                    max_tokens_per_batch,
                    max_batch_size,
                    progress=progress,
                )
                from rh_trl.engines.logprobs import HFSpanLogprobs

                self.engines[side] = HFSpanLogprobs(hf)
                labels[side] = str(getattr(model, "name_or_path", "") or side)
            elif engine == "openai":
                if tokenizer is None:
                    raise ValueError(
                        f"engine='openai' needs {side}_tokenizer= (an object or a path): tokenization is done "
                        "here and the server is sent token ids"
                    )
                tok = load_tokenizer(tokenizer, None, trust_remote_code=trust_remote_code)
                from rh_trl.engines.openai_logprobs import OpenAILogprobClient

                self.engines[side] = OpenAILogprobClient(
                    source,
                    model=model_name,
                    api_key=key if key is not None else api_key,
                    batch_size=batch_size,
                    max_concurrency=max_concurrency,
                    retry=retry,
                    use_prompt_logprobs=use_prompt_logprobs,
                    transport=transport,
                    label=side,
                )
                labels[side] = model_name or side
            else:
                from rh_trl.engines.vllm_logprobs import VLLMLogprobEngine

                if isinstance(source, VLLMLogprobEngine):  # an engine built before, shared
                    self.engines[side], source = source, source.model
                else:
                    tok_path = tokenizer if isinstance(tokenizer, str | os.PathLike) else None
                    llm_options = {
                        "gpu_memory_utilization": gpu_memory_utilization,
                        "enable_sleep_mode": enable_sleep_mode,
                        "tensor_parallel_size": tensor_parallel_size,
                        "max_model_len": max_model_len,
                        **(vllm_kwargs or {}),
                    }
                    self.engines[side] = VLLMLogprobEngine(
                        source,
                        tokenizer=os.fspath(tok_path) if tok_path is not None else None,
                        dtype=dtype,
                        trust_remote_code=trust_remote_code,
                        **llm_options,
                    )
                tok = load_tokenizer(
                    tokenizer if tokenizer is not None else source, None, trust_remote_code=trust_remote_code
                )
                labels[side] = str(source)
            self.tokenizers[side] = tok
        default = f"drsow_{Path(labels['strong']).name}_vs_{Path(labels['weak']).name}"
        super().__init__(name=name, default_name=default, strict=strict, text_as_chat=text_as_chat)
        templates = {"strong": strong_chat_template, "weak": weak_chat_template}
        self.encoders = {
            side: SpanEncoder(
                self.tokenizers[side],
                max_length=max_length,
                chat_template=templates[side] if templates[side] is not None else chat_template,
                text_as_chat=text_as_chat,
                chat_template_kwargs=chat_template_kwargs,
                include_end_of_turn=include_end_of_turn,
                include_eos=include_eos,
            )
            for side in ("strong", "weak")
        }
        self.max_length_given = max_length is not None
        if engine != "openai":  # servers say their limit at the first call
            for side in ("strong", "weak"):
                self._engine_limit(side, self.engines[side].max_sequence_length)

    def _engine_limit(self, side: str, limit: int | None) -> None:
        """Default a model's ``max_length`` to the longest sequence its engine takes (when the caller set none)."""
        if limit is not None and not self.max_length_given:
            self.encoders[side].formatter.max_length = max(2, limit)

    # -- sleep mode (vllm) -------------------------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Free both in-process vLLM engines' GPU memory (``engine="vllm"`` with ``enable_sleep_mode=True``)."""
        self._vllm_engines("sleep")
        for engine in self.engines.values():
            engine.sleep(level)

    def wake_up(self) -> None:
        """Bring both in-process vLLM engines back after :meth:`sleep`."""
        self._vllm_engines("wake_up")
        for engine in self.engines.values():
            engine.wake_up()

    def _vllm_engines(self, what: str) -> None:
        if self.engine_kind != "vllm":
            raise RuntimeError(f"{what}() is for engine='vllm'; this DrSow uses engine={self.engine_kind!r}")

    # -- scoring ------------------------------------------------------------------------------------------------

    def _with_system_prompt(self, batch: Batch) -> tuple[list[Sample | None], int]:
        column = None
        if self.system_prompt_column is not None:
            column = batch.columns.get(self.system_prompt_column)
            if column is None or len(column) != len(batch):
                raise RewardInputError(
                    f"{self.__name__}: system_prompt_column={self.system_prompt_column!r} needs a dataset column "
                    f"of that name with one value per sample; got columns {sorted(batch.columns)}"
                )
        samples: list[Sample | None] = []
        unused = 0
        for i, sample in enumerate(batch.samples):
            system = self.system_prompt
            if column is not None and isinstance(column[i], str) and column[i]:
                system = column[i]
            if sample is None or system is None:
                samples.append(sample)
            elif not sample.conversational:
                unused += 1
                samples.append(sample)
            elif sample.prompt and sample.prompt[0].get("role") == "system":  # type: ignore[union-attr]
                samples.append(sample)
            else:
                prompt = [{"role": "system", "content": system}, *sample.prompt]  # type: ignore[misc]
                samples.append(Sample(prompt, sample.response))
        if unused:
            logger.warning(
                "%s: the system prompt was not used for %d standard-format sample(s) (strings have no system "
                "turn; text_as_chat=True renders them as conversations)",
                self.__name__,
                unused,
            )
        return samples, unused

    def encode(
        self, samples: Sequence[Sample | None]
    ) -> tuple[dict[str, list[Span | None]], list[str | None]]:
        """Each sample's span for each model (each distinct sample rendered once), and per-sample errors."""
        pairs, errors = encode_samples(
            lambda sample: (self.encoders["strong"].encode(sample), self.encoders["weak"].encode(sample)),
            samples,
            strict=self.strict,
            where=f"{self.__name__}: ",
        )
        spans: dict[str, list[Span | None]] = {
            side: [None if pair is None else pair[k] for pair in pairs]
            for k, side in enumerate(("strong", "weak"))
        }
        return spans, errors

    def _reduce(self, logprobs: list[float]) -> float:
        total = math.fsum(logprobs)
        return total / len(logprobs) if self.reduction == "mean" else total

    def _plan(self, batch: Batch) -> tuple[dict[str, list[Span | None]], list[int], dict[str, int]]:
        samples, unused = self._with_system_prompt(batch)
        spans, errors = self.encode(samples)
        failed = [i for i, e in enumerate(errors) if e is not None]
        if failed:
            logger.warning(
                "%s: %d sample(s) could not be rendered (first, sample %d: %s)",
                self.__name__,
                len(failed),
                failed[0],
                errors[failed[0]],
            )
        empty = [
            i
            for i, s in enumerate(spans["strong"])
            if s is not None and (s.end == s.start or spans["weak"][i].end == spans["weak"][i].start)  # type: ignore[union-attr]
        ]
        if empty:
            if self.strict:
                raise RewardInputError(f"{self.__name__}: sample {empty[0]} has an empty response span")
            logger.warning(
                "%s: %d sample(s) have an empty response span and get no reward (first: sample %d)",
                self.__name__,
                len(empty),
                empty[0],
            )
        skip = set(empty)
        todo = [i for i, s in enumerate(spans["strong"]) if s is not None and i not in skip]
        truncated = {
            kind: sum(
                1
                for i in range(len(batch))
                if any(spans[side][i] is not None and spans[side][i].truncated == kind for side in spans)  # type: ignore[union-attr]
            )
            for kind in ("prompt", "response")
        }
        counts = {
            "truncated": truncated["prompt"],
            "response_truncated": truncated["response"],
            "render_failed": len(failed),
            "empty_span": len(empty),
        }
        if unused:
            counts["system_prompt_unused"] = unused
        return spans, todo, counts

    def _finish(
        self,
        batch: Batch,
        spans: dict[str, list[Span | None]],
        todo: list[int],
        values: dict[str, Sequence[list[float] | None]],
        reasons: dict[str, Sequence[str | None]],
        counts: dict[str, int],
    ) -> RewardOutput:
        rewards: list[float | None] = [None] * len(batch)
        logp: dict[str, list[float | None]] = {"strong": [None] * len(batch), "weak": [None] * len(batch)}
        lost = [
            reasons["strong"][k] or reasons["weak"][k] for k in range(len(todo))
        ]  # the first side's reason
        for k, i in enumerate(todo):
            if lost[k] is None:
                for side in ("strong", "weak"):
                    logp[side][i] = self._reduce(values[side][k])  # type: ignore[arg-type]
                rewards[i] = logp["strong"][i] - logp["weak"][i]  # type: ignore[operator]
        failures = reason_counts(lost)
        always = ("too_long", "server_failed", "server_rejected") if self.engine_kind == "openai" else ()
        counts.update(reason_counts(lost, always))
        if failures:
            logger.warning(
                "%s: %d sample(s) get no reward (too long for the engine, or a server failed or refused them): %s",
                self.__name__,
                sum(failures.values()),
                failures,
            )
        return RewardOutput(rewards, counts, extra={"logp_strong": logp["strong"], "logp_weak": logp["weak"]})

    @staticmethod
    def _requests(spans: list[Span | None], todo: list[int]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        chosen = [spans[i] for i in todo]
        return [s.input_ids for s in chosen], [(s.start, s.end) for s in chosen]  # type: ignore[union-attr]

    def compute(self, batch: Batch) -> RewardOutput:
        if self.engine_kind == "openai":
            return run_sync(self._compute_remote(batch))
        spans, todo, counts = self._plan(batch)
        values: dict[str, Sequence[list[float] | None]] = {}
        reasons: dict[str, Sequence[str | None]] = {}
        for side in ("strong", "weak"):
            sequences, ranges = self._requests(spans[side], todo)
            values[side], reasons[side] = (
                self.engines[side].span_logprobs(sequences, ranges) if todo else ([], [])
            )
        return self._finish(batch, spans, todo, values, reasons, counts)

    async def _compute_remote(self, batch: Batch) -> RewardOutput:
        for side in ("strong", "weak"):
            if not self.max_length_given and self.encoders[side].formatter.max_length is None:
                self._engine_limit(side, await self.engines[side].read_max_sequence_length())
        spans, todo, counts = self._plan(batch)
        answers = await asyncio.gather(
            *(
                self.engines[side].span_logprobs(*self._requests(spans[side], todo))
                for side in ("strong", "weak")
            )
        )
        values = {side: answer[0] for side, answer in zip(("strong", "weak"), answers, strict=True)}
        reasons = {side: answer[1] for side, answer in zip(("strong", "weak"), answers, strict=True)}
        return self._finish(batch, spans, todo, values, reasons, counts)


def _causal_lm_class() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM
