"""Process reward models: a score for every step of a response, aggregated into one reward.

Three families (``kind=``), each laid out as its public checkpoints were trained (see
:mod:`rh_trl.rewards.prm_layout`):

* ``"separator"`` — a token-classification head read at a separator token placed after every step
  (Qwen/Qwen2.5-Math-PRM-7B: ``<extra_0>``, the Qwen math system prompt); step score = softmax(2 logits)[1].
* ``"next_token"`` — a causal LM judging each step in a chat: the steps are user turns, each answered by an
  assistant ``"+"`` (RLHFlow/Llama3.1-8B-PRM-Deepseek-Data); step score = P("+") / (P("+") + P("-")) at the
  position predicting that ``"+"``. All steps of a sample come from ONE forward pass.
* ``"step_tag"`` — a causal LM with a tag token after every step (Math-Shepherd: ``ки``); step score =
  P("+") / (P("+") + P("-")) from the logits AT the tag token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rh_trl.engines.batching import reason_counts
from rh_trl.engines.chosen_logits import ChosenLogits
from rh_trl.engines.hf import HFEngine
from rh_trl.engines.http import MalformedResponse, RetryPolicy, run_sync
from rh_trl.engines.vllm_pooling import build_pooling_engine, engine_argument, rows_at_steps
from rh_trl.engines.zero3 import check_zero3
from rh_trl.formatting import RewardInputError
from rh_trl.models.loading import config_dict, load_model, load_tokenizer, padding_id
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.prm_layout import (
    KINDS,
    Kind,
    Layout,
    StepLocateError,
    StepSequence,
    TooLongError,
    encode,
)
from rh_trl.rewards.prm_steps import get_aggregation, split_steps

logger = logging.getLogger("rh_trl")

QWEN_MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

#: per-kind defaults: (marker of each step, system prompt)
DEFAULTS: dict[str, dict[str, Any]] = {
    "separator": {"step_token": "<extra_0>", "system_prompt": QWEN_MATH_SYSTEM_PROMPT},
    "next_token": {"step_token": None, "system_prompt": None},
    "step_tag": {"step_token": "ки", "system_prompt": None},
}


def single_token_id(tokenizer: Any, text: str, role: str) -> int:
    """The id of ``text`` as one token of ``tokenizer``, or a ValueError naming the token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    vocab_id = tokenizer.convert_tokens_to_ids(text)
    if isinstance(vocab_id, int) and vocab_id != getattr(tokenizer, "unk_token_id", None) and vocab_id >= 0:
        return vocab_id
    raise ValueError(
        f"the reward model's tokenizer has no single token for the {role} {text!r} (it encodes to {ids}); "
        f"expected a tokenizer that has {text!r} in its vocabulary"
    )


def read_classes(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token-classification logits ``[batch, seq, num_labels]`` (``outputs.logits`` or ``outputs[0]``)."""
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs[0]


class PairLogitsModel(torch.nn.Module):
    """A causal LM that computes only the logits of two tokens (``[batch, seq, 2]``) from its last hidden state.

    Equal to ``model(...).logits[..., token_ids]`` for heads that are a plain linear layer, without building
    (and moving) a full vocabulary row for every position.
    """

    def __init__(self, model: Any, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.token_ids = list(token_ids)

    @property
    def config(self) -> Any:
        return self.model.config

    @staticmethod
    def supports(model: Any) -> bool:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config = getattr(model, "config", None)
        scaled = any(
            getattr(config, attr, None) not in (None, 1.0)
            for attr in (
                "final_logit_softcapping",
                "logit_scale",
                "logits_scaling",
                "output_multiplier_scale",
            )
        )
        base = getattr(model, "base_model", None)
        return isinstance(head, torch.nn.Linear) and base is not None and base is not model and not scaled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False) -> Any:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache
        ).last_hidden_state
        head = self.model.get_output_embeddings()
        bias = None if head.bias is None else head.bias[self.token_ids]
        return SimpleNamespace(logits=torch.nn.functional.linear(hidden, head.weight[self.token_ids], bias))


class PRM(Reward):
    """A process reward model as a TRL reward function.

    The response is split into steps (``step_separator``, default ``"\\n\\n"``; steps are stripped, empty ones
    dropped), each step is scored by the model, and the step scores are aggregated into the reward
    (``aggregation``: ``"min"`` (default), ``"last"``, ``"mean"``, ``"prod"``, ``"geometric_mean"``). A response
    with no steps gets ``None`` (counted as ``num_no_steps``). Per-step scores go to TRL's completions table
    (column ``<name>/steps``) and are returned by :meth:`score_steps`.

    Args:
        model: model directory, hub id, or a loaded model (``separator``: a token-classification model with 2
            labels, e.g. ``AutoModel`` with the checkpoint's code for Qwen2.5-Math-PRM; other kinds: a causal LM).
        tokenizer: the PRM's tokenizer (object or path); by default loaded from ``model``. Must be a fast
            tokenizer (steps are located from character offsets).
        kind: ``"separator"``, ``"next_token"`` or ``"step_tag"`` (see the module docstring).
        step_separator: how the response is cut into steps.
        step_token: the token placed after each step (``separator``: ``"<extra_0>"``; ``step_tag``: ``"ки"``).
        good_token, bad_token: the judgement tokens (``next_token``/``step_tag``; default ``"+"``/``"-"``).
        system_prompt: system message of the chat layouts (``separator`` default: Qwen's math prompt, replacing the
            prompt's own system messages; ``None``/``False`` keeps the prompt as it is).
        aggregation: how step scores become the reward.
        max_length: longest input; longer samples lose prompt tokens from the left (counted as ``num_truncated``);
            a sample whose steps alone do not fit gets ``None`` (``num_too_long``) — steps are never cut. Default:
            the longest the engine takes (position embeddings; vLLM's ``max_model_len``).
        engine: ``"hf"`` (local transformers), ``"vllm"`` (an in-process vLLM pooling runner, or an already-built
            ``VLLMPoolingEngine`` to share) or ``"openai"`` (``vllm serve --runner pooling`` servers, ``model``
            being their URL(s)); see :mod:`rh_trl.engines.vllm_pooling`. A ``separator`` PRM reads its
            token-classification head at every token (``token_classify``, any separator token); the
            ``next_token`` and ``step_tag`` kinds read the final hidden state at every token (``token_embed``;
            serve with ``--convert embed --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL"}'``)
            and apply the judgement tokens' rows of the output projection, read from the checkpoint (``model``
            on ``"vllm"``, ``tokenizer`` as a directory or hub id on ``"openai"``). The same numbers from each.
        vllm_kwargs: passed to ``vllm.LLM`` with ``engine="vllm"``.
        served_model, api_key, batch_size, max_concurrency, retry, transport: the ``"openai"`` engine (see
            :class:`~rh_trl.engines.vllm_pooling.VLLMPoolingClient`).
        dtype: ``"auto"`` (default) is the checkpoint's own dtype on every engine; or a dtype name.
        chat_template, chat_template_kwargs: replace the tokenizer's template / pass arguments to it.
        name, strict, progress, device, device_map: as for :class:`~rh_trl.rewards.orm.ORM`.
        max_tokens_per_batch, max_batch_size, trust_remote_code, zero3: as for :class:`~rh_trl.rewards.orm.ORM`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        kind: Kind = "separator",
        step_separator: str = "\n\n",
        step_token: str | None = None,
        good_token: str = "+",
        bad_token: str = "-",
        system_prompt: str | bool | None = True,
        aggregation: str = "min",
        max_length: int | None = None,
        engine: str | Any = "hf",
        vllm_kwargs: dict[str, Any] | None = None,
        served_model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        transport: Any = None,
        name: str | None = None,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        device_map: Any = None,
        dtype: str | torch.dtype | None = "auto",
        zero3: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown PRM kind {kind!r}; expected one of {list(KINDS)}")
        self.kind = kind
        self.aggregate = get_aggregation(aggregation)
        self.aggregation = aggregation
        split_steps("", step_separator)  # validates the separator
        self.step_separator = step_separator
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        self.max_length = max_length
        task = "token_classify" if kind == "separator" else "token_embed"
        engine, shared = engine_argument(engine, task)
        check_zero3(zero3, engine)
        self.zero3 = zero3
        self.engine_kind = engine

        self.model = None
        limit: int | None = None
        config = config_dict(model) if engine != "openai" else {}
        # Qwen2.5-Math-PRM's config names its own code (auto_map): trusted as its model card asks
        remote = trust_remote_code or "Qwen2ForProcessRewardModel" in (config.get("architectures") or [])
        if engine == "openai" and tokenizer is None:
            raise ValueError(
                "engine='openai' needs tokenizer= (an object or a path): tokenization is done here and the "
                "server is sent token ids"
            )
        if engine == "openai" and kind != "separator" and not isinstance(tokenizer, str | os.PathLike):
            raise ValueError(
                f"engine='openai' with kind={kind!r} needs tokenizer= as the checkpoint's directory or hub id: the "
                "server sends hidden states, and the judgement tokens' rows of the output projection are read from "
                "the checkpoint"
            )
        if engine != "hf":
            self.engine: Any = build_pooling_engine(
                engine,
                model,
                task,
                shared=shared,
                dtype=dtype,
                trust_remote_code=remote,
                vllm_kwargs=vllm_kwargs,
                model=served_model,
                api_key=api_key,
                batch_size=batch_size,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model, None)
            source = (
                model if engine == "vllm" else served_model or getattr(self.tokenizer, "name_or_path", "")
            )
            model_name = Path(os.fspath(source or "model")).name
            # a server says its limit at the first call
            limit = self.engine.max_sequence_length if engine == "vllm" else None
        else:
            self.model = load_model(
                model,
                self._model_class(config),
                dtype=dtype,
                device=device,
                device_map=device_map,
                trust_remote_code=remote,
                zero3=zero3,
            )
            self.tokenizer = load_tokenizer(tokenizer, self.model, trust_remote_code=remote)
            model_name = Path(str(getattr(self.model, "name_or_path", "") or "model")).name
        super().__init__(name=name, default_name=f"prm_{model_name}", strict=strict)

        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("PRM needs a fast tokenizer (steps are located from character offsets)")
        self.layout = self._layout(step_token, good_token, bad_token, system_prompt, chat_template,
                                   chat_template_kwargs)  # fmt: skip
        if kind != "separator":
            self.judgement_ids = [
                single_token_id(self.tokenizer, good_token, "good-step token"),
                single_token_id(self.tokenizer, bad_token, "bad-step token"),
            ]
            if engine != "hf":  # the engine gives hidden states; these rows turn them into the two logits
                rows_from = model if engine == "vllm" else tokenizer
                self.chosen = ChosenLogits.from_checkpoint(rows_from, self.judgement_ids, remote)
        if self.model is not None:
            self._build_engine(max_tokens_per_batch, max_batch_size, progress)
            limit = self.engine.max_sequence_length
        self.max_length_given = max_length is not None
        self._engine_limit(limit)

    # -- construction helpers ------------------------------------------------------------------------------

    def _model_class(self, config: dict[str, Any]) -> Any:
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

        if self.kind != "separator":
            return AutoModelForCausalLM
        archs = config.get("architectures") or []
        if any(a.endswith("ForTokenClassification") for a in archs):
            return AutoModelForTokenClassification
        return AutoModel  # custom-code PRMs (Qwen2ForProcessRewardModel) register under AutoModel

    def _layout(
        self,
        step_token: str | None,
        good_token: str,
        bad_token: str,
        system_prompt: str | bool | None,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any] | None,
    ) -> Layout:
        defaults = DEFAULTS[self.kind]
        if system_prompt is True:
            system = defaults["system_prompt"]
        elif system_prompt is False:
            system = None
        else:
            system = system_prompt
        if self.kind == "next_token":
            marker = good_token
            role = "good-step token"
        else:
            marker = step_token if step_token is not None else defaults["step_token"]
            role = "step separator token" if self.kind == "separator" else "step tag token"
        marker_id = single_token_id(self.tokenizer, marker, role)
        template = chat_template or getattr(self.tokenizer, "chat_template", None) or None
        if self.kind != "step_tag" and template is None:
            raise ValueError(
                f"kind={self.kind!r} renders a chat with the PRM's chat template, but its tokenizer has none; "
                "pass chat_template='…'"
            )
        return Layout(
            self.kind,
            marker,
            marker_id,
            system,
            template,
            tuple(sorted((chat_template_kwargs or {}).items())),
        )

    def _build_engine(self, max_tokens_per_batch: int, max_batch_size: int | None, progress: bool) -> None:
        model = self.model
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = padding_id(self.tokenizer)
        pad = model.config.pad_token_id
        if self.kind == "separator":
            self.read = read_classes
            runner = model
        elif PairLogitsModel.supports(model) and not self.zero3:  # sharded: the head's own pass gathers it
            self.read = read_classes
            runner = PairLogitsModel(model, self.judgement_ids)
        else:
            ids = self.judgement_ids
            self.read = lambda outputs, input_ids, mask: outputs.logits[..., ids]
            runner = model
        self.engine = HFEngine(
            runner, pad, max_tokens_per_batch, max_batch_size, progress=progress, sharded=self.zero3
        )

    def _engine_limit(self, limit: int | None) -> None:
        """Default ``max_length`` to the longest sequence the engine takes (when the caller set none)."""
        if limit is not None and not self.max_length_given:
            self.max_length = limit

    # -- scoring ----------------------------------------------------------------------------------------------

    def steps_of(self, response: str) -> list[str]:
        """The steps of a response (the step marker is removed from step text so it cannot add steps)."""
        steps = split_steps(response, self.step_separator)
        if self.kind != "next_token":
            steps = [s for s in (step.replace(self.layout.marker, "").strip() for step in steps) if s]
        return steps

    def encode(self, batch: Batch) -> tuple[list[StepSequence | None], dict[str, int], list[str]]:
        """Tokenize every readable sample; failures are ``None`` with a count and a message."""
        cache: dict[str, StepSequence | str] = {}
        out: list[StepSequence | None] = []
        counts = {"no_steps": 0, "render_failed": 0, "steps_not_located": 0, "too_long": 0, "truncated": 0}
        messages: list[str] = []
        for i, sample in enumerate(batch.samples):
            if sample is None:
                out.append(None)
                continue
            steps = self.steps_of(sample.response_text)
            if not steps:
                counts["no_steps"] += 1
                out.append(None)
                continue
            key = sample.key()
            if key not in cache:
                try:
                    cache[key] = encode(self.tokenizer, self.layout, sample, steps, self.max_length)
                except (StepLocateError, TooLongError) as err:
                    cache[key] = "too_long" if isinstance(err, TooLongError) else "steps_not_located"
                    messages.append(f"sample {i}: {err}")
                except Exception as err:  # a template error on one sample must not stop training
                    cache[key] = "render_failed"
                    messages.append(f"sample {i}: {type(err).__name__}: {err}")
            value = cache[key]
            if isinstance(value, str):
                if self.strict:
                    raise RewardInputError(f"{self.__name__}: {messages[-1]}")
                counts[value] += 1
                out.append(None)
            else:
                counts["truncated"] += int(value.truncated)
                out.append(value)
        return out, counts, messages

    def _step_rows(
        self, sequences: list[StepSequence], rows: Sequence[torch.Tensor | None]
    ) -> list[list[float] | None]:
        """Each sequence's step scores from its engine rows (one row per token, or per step token)."""
        where = f"{self.__name__}: {self.engine_kind} engine"
        positive = 1 if self.kind == "separator" else 0
        scores: list[list[float] | None] = []
        for seq, row in zip(sequences, rows, strict=True):
            if row is None:
                scores.append(None)
                continue
            if self.engine_kind == "hf":
                at_steps = row[seq.positions]
            elif self.kind == "separator":
                at_steps = rows_at_steps(row, seq.input_ids, seq.positions, self.layout.marker_id, where)
            else:  # a hidden state per token: the judgement tokens' logits at the step positions
                if row.dim() != 2 or row.shape[0] != len(seq.input_ids):
                    raise MalformedResponse(
                        f"{where} returned hidden states of shape {tuple(row.shape)} for {len(seq.input_ids)} "
                        "tokens; expected one per token (token_embed with ALL pooling)"
                    )
                at_steps = self.chosen(row[seq.positions])
            scores.append([float(p) for p in at_steps.float().softmax(-1)[:, positive]])
        return scores

    def _prepare(self, batch: Batch) -> tuple[list[int], list[StepSequence], dict[str, int]]:
        encoded, counts, messages = self.encode(batch)
        if messages:
            logger.warning(
                "%s: %d sample(s) get no reward (first, %s)", self.__name__, len(messages), messages[0]
            )
        if counts["truncated"]:
            logger.info(
                "%s: %d sample(s) lost prompt tokens from the left (max_length=%s)",
                self.__name__,
                counts["truncated"],
                self.max_length,
            )
        todo = [i for i, e in enumerate(encoded) if e is not None]
        return todo, [encoded[i] for i in todo], counts  # type: ignore[misc]

    def _finish(
        self,
        batch: Batch,
        todo: list[int],
        sequences: list[StepSequence],
        rows: Sequence[torch.Tensor | None],
        reasons: Sequence[str | None],
        counts: dict[str, int],
    ) -> tuple[list[list[float] | None], dict[str, int]]:
        steps: list[list[float] | None] = [None] * len(batch)
        for i, s in zip(todo, self._step_rows(sequences, rows), strict=True):
            steps[i] = s
        always = ("server_failed", "server_rejected") if self.engine_kind == "openai" else ()
        for key, n in reason_counts(reasons, always).items():
            counts[key] = counts.get(key, 0) + n
        return steps, counts

    def _score(self, batch: Batch) -> tuple[list[list[float] | None], dict[str, int]]:
        if self.engine_kind == "openai":
            return run_sync(self._score_remote(batch))
        todo, sequences, counts = self._prepare(batch)
        ids = [s.input_ids for s in sequences]
        if self.engine_kind == "hf":
            rows, reasons = self.engine.run_checked(ids, self.read)
        else:
            rows, reasons = self.engine.run(ids) if ids else ([], [])
        return self._finish(batch, todo, sequences, rows, reasons, counts)

    async def _score_remote(self, batch: Batch) -> tuple[list[list[float] | None], dict[str, int]]:
        if not self.max_length_given and self.max_length is None:
            self._engine_limit(await self.engine.read_max_sequence_length())
        todo, sequences, counts = self._prepare(batch)
        rows, reasons = await self.engine.run([s.input_ids for s in sequences])
        return self._finish(batch, todo, sequences, rows, reasons, counts)

    def compute(self, batch: Batch) -> RewardOutput:
        steps, counts = self._score(batch)
        rewards = [None if s is None else float(self.aggregate(s)) for s in steps]
        return RewardOutput(rewards, counts, {"steps": steps})

    def score_steps(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[list[float] | None]:
        """The score of every step of every completion (``None`` where a completion gets no reward)."""
        batch = self._make_batch(prompts, completions, None, columns)
        return self._score(batch)[0]
