"""Outcome reward models: one score per (prompt, completion) from a sequence-classification-style model."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from rh_trl.engines.batching import reason_counts
from rh_trl.engines.hf import HFEngine
from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.engines.vllm_pooling import build_pooling_engine, engine_argument
from rh_trl.engines.zero3 import check_zero3
from rh_trl.formatting import ChatFormatter, Encoded, encode_samples, encoding_counts
from rh_trl.models.loading import config_dict, load_model, load_tokenizer, padding_id
from rh_trl.rewards.adapters import DEFAULT_ADAPTER, ORMAdapter, adapter_for, get_orm_adapter
from rh_trl.rewards.base import Batch, Reward, RewardOutput, log_encoding

logger = logging.getLogger("rh_trl")

Transform = Literal["none", "sigmoid", "softmax"]
Engine = Literal["hf", "vllm", "openai"]


class ORM(Reward):
    """An outcome reward model as a TRL reward function.

    The sample is rendered with the reward model's own tokenizer and chat template (see
    :mod:`rh_trl.formatting`), scored by the engine, and turned into one number:

    1. the model's outputs for the sequence (``num_labels`` logits, or what the adapter reads);
    2. ``transform="softmax"`` turns them into probabilities first;
    3. one number: ``output_index`` picks an output, ``output_weights`` takes a weighted sum
       (a list, or a dict keyed by the labels in ``config.id2label``); a single-output head needs neither;
    4. ``(r - reward_mean) / reward_std`` when the model's config stores those (``normalize=None`` applies them
       when present, ``False`` never does);
    5. ``transform="sigmoid"`` squashes the result into (0, 1).

    Engines (the same numbers from each): ``"hf"`` runs the model in this process with transformers;
    ``"vllm"`` in an in-process ``vllm.LLM(runner="pooling")``; ``"openai"`` asks ``vllm serve --runner
    pooling`` servers (``/classify`` with our token ids, raw logits). Steps 2-5 run here on every engine.

    Args:
        model: a model directory, a hub id, or a loaded model (``"hf"``); a path or hub id (``"vllm"``); the
            server's base URL or a list of replicas' URLs (``"openai"``).
        tokenizer: the reward model's tokenizer (object or path); by default loaded from ``model``. Required
            for ``"openai"``, where the model's ``config.json`` (labels, ``reward_mean``/``reward_std``) is also
            read from the tokenizer's directory or hub id when it has one.
        engine: ``"hf"``, ``"vllm"`` or ``"openai"``; or an already-built
            :class:`~rh_trl.engines.vllm_pooling.VLLMPoolingEngine` of this model, shared by several rewards
            that read its outputs differently (e.g. one per objective of a multi-objective head).
        name: metric name (default ``orm_<model name>``, made unique).
        adapter: an :class:`ORMAdapter` or its registered name; by default chosen from the config's architecture
            (custom-code adapters run on ``"hf"`` only).
        max_length: longest input in tokens; longer samples lose prompt tokens from the left. Default: the longest
            the engine takes (position embeddings; vLLM's ``max_model_len``). A sample longer than the engine
            takes gets ``None`` (``num_too_long``).
        max_tokens_per_batch, max_batch_size: the ``"hf"`` engine's micro-batch budget.
        device, device_map: where the ``"hf"`` engine puts the model (default: this process's accelerator,
            else the CPU).
        dtype: ``"auto"`` (default) is the checkpoint's own dtype on every engine (``config.json``; float32
            when it names none) — so ``"hf"`` and ``"vllm"`` give the same numbers; or a dtype name.
        zero3: inside a DeepSpeed ZeRO-3 run, keep the model sharded over the processes as the run's own models
            are, instead of a whole copy on each (``"hf"``; :mod:`rh_trl.engines.zero3`); it then scores only in
            a trainer's calls, which every process makes together.
        served_model, api_key, batch_size, max_concurrency, retry, transport: the ``"openai"`` engine
            (see :class:`~rh_trl.engines.vllm_pooling.VLLMPoolingClient`; ``served_model`` is the name the
            server serves the model under, default: its only model).
        vllm_kwargs: passed to ``vllm.LLM`` with ``engine="vllm"`` (e.g. ``gpu_memory_utilization``,
            ``max_model_len``, ``enable_sleep_mode``, ``tensor_parallel_size``).
        chat_template, text_as_chat, chat_template_kwargs: see :class:`~rh_trl.formatting.ChatFormatter`.
        progress: show a progress bar while scoring (``"hf"``).
        strict: raise on a malformed sample instead of giving it ``None``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        engine: Engine | Any = "hf",
        name: str | None = None,
        adapter: str | ORMAdapter | None = None,
        output_index: int | str | None = None,
        output_weights: Sequence[float] | Mapping[str, float] | None = None,
        transform: Transform = "none",
        normalize: bool | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        device_map: Any = None,
        dtype: str | torch.dtype | None = "auto",
        zero3: bool = False,
        served_model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        transport: Any = None,
        vllm_kwargs: dict[str, Any] | None = None,
        chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        engine, shared = engine_argument(engine, "classify")
        check_zero3(zero3, engine)
        if transform not in ("none", "sigmoid", "softmax"):
            raise ValueError(f"transform must be 'none', 'sigmoid' or 'softmax', got {transform!r}")
        if output_index is not None and output_weights is not None:
            raise ValueError("pass output_index or output_weights, not both")
        self.engine_kind = engine
        if engine == "openai":
            if tokenizer is None:
                raise ValueError(
                    "engine='openai' needs tokenizer= (an object, or the model's directory or hub id): "
                    "tokenization is done here and the server is sent token ids"
                )
            tok_source = tokenizer if isinstance(tokenizer, str | os.PathLike) else tokenizer.name_or_path
            config = config_dict(tok_source) if tok_source else {}
        else:
            config = config_dict(model)
        self.adapter = (
            get_orm_adapter(adapter) if isinstance(adapter, str) else (adapter or adapter_for(config))
        )
        if engine != "hf" and self.adapter is not DEFAULT_ADAPTER:
            raise ValueError(
                f"the ORM adapter '{self.adapter.name}' runs the checkpoint's own model code (its reward head is not "
                "a sequence-classification layer), which vLLM's model registry does not have, so it runs on "
                f"engine='hf' only; engine={engine!r} serves sequence-classification heads (host this model with "
                "`rh-trl serve` to score it from another machine)"
            )
        self.model: Any = None
        if engine == "hf":
            from transformers import AutoModel, AutoModelForSequenceClassification

            model_class = {
                "AutoModel": AutoModel,
                "AutoModelForSequenceClassification": AutoModelForSequenceClassification,
            }
            self.model = load_model(
                model,
                model_class[self.adapter.model_class],
                dtype=dtype,
                device=device,
                device_map=device_map,
                trust_remote_code=trust_remote_code or self.adapter.trust_remote_code,
                zero3=zero3,
            )
            self.tokenizer = load_tokenizer(tokenizer, self.model, trust_remote_code=trust_remote_code)
            model_name = Path(str(getattr(self.model, "name_or_path", "") or "model")).name
            # HF's classification heads take the rightmost token that is not config.pad_token_id, so batches are
            # padded with exactly that id
            if getattr(self.model.config, "pad_token_id", None) is None:
                self.model.config.pad_token_id = padding_id(self.tokenizer)
            self.pad_token_id = int(self.model.config.pad_token_id)
            self.engine: Any = HFEngine(
                self.model,
                self.pad_token_id,
                max_tokens_per_batch,
                max_batch_size,
                progress=progress,
                sharded=zero3,
            )
            limit = self.engine.max_sequence_length
        else:
            self.engine = build_pooling_engine(
                engine,
                model,
                "classify",
                shared=shared,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                vllm_kwargs=vllm_kwargs,
                model=served_model,
                api_key=api_key,
                batch_size=batch_size,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model, None)
            source = model if engine == "vllm" else served_model or tok_source or "model"
            model_name = Path(os.fspath(source)).name
            # a server says its limit at the first call
            limit = self.engine.max_sequence_length if engine == "vllm" else None
        if engine != "hf":
            pad = config.get("pad_token_id")
            self.pad_token_id = int(pad) if isinstance(pad, int) else padding_id(self.tokenizer)
        super().__init__(
            name=name, default_name=f"orm_{model_name}", strict=strict, text_as_chat=text_as_chat
        )

        self.suffix = list(self.adapter.suffix(self.model, self.tokenizer)) if self.model is not None else []
        self.max_length_given = max_length is not None
        self.formatter = ChatFormatter(
            self.tokenizer,
            max_length=None if max_length is None else max_length - len(self.suffix),
            chat_template=chat_template,
            text_as_chat=text_as_chat,
            chat_template_kwargs=chat_template_kwargs,
        )
        self._engine_limit(limit)
        self.transform = transform
        self.config = config
        self.labels = self._labels(config)
        self.output_index = self._index(output_index)
        self.output_weights = self._weights(output_weights)
        if self.adapter is DEFAULT_ADAPTER:
            self._check_selection(int(config.get("num_labels", len(self.labels) or 1)))
        self.norm = self._normalization(normalize)

    # -- configuration helpers ---------------------------------------------------------------------------------

    def _labels(self, config: dict[str, Any]) -> list[str]:
        id2label = config.get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else []

    def _index(self, output_index: int | str | None) -> int | None:
        if isinstance(output_index, str):
            if output_index not in self.labels:
                raise ValueError(
                    f"output_index '{output_index}' is not a label of this model; labels: {self.labels}"
                )
            return self.labels.index(output_index)
        return output_index

    def _weights(self, weights: Sequence[float] | Mapping[str, float] | None) -> torch.Tensor | None:
        if weights is None:
            return None
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(self.labels))
            if unknown:
                raise ValueError(
                    f"output_weights names {unknown}, which are not labels of this model: {self.labels}"
                )
            return torch.tensor([float(weights.get(label, 0.0)) for label in self.labels])
        return torch.tensor([float(w) for w in weights])

    def _check_selection(self, num_outputs: int) -> None:
        if num_outputs > 1 and self.output_index is None and self.output_weights is None:
            labels = f" (labels: {self.labels})" if self.labels else ""
            raise ValueError(
                f"{self.__name__}: the model has {num_outputs} outputs{labels}; choose one with output_index=… "
                "or combine them with output_weights=[…] (one weight per output)"
            )
        if self.output_index is not None and not -num_outputs <= self.output_index < num_outputs:
            raise ValueError(
                f"output_index {self.output_index} is out of range for a head with {num_outputs} outputs"
            )
        if self.output_weights is not None and len(self.output_weights) != num_outputs:
            raise ValueError(
                f"output_weights has {len(self.output_weights)} weights but the head has {num_outputs} outputs"
            )

    def _normalization(self, normalize: bool | None) -> tuple[float, float] | None:
        mean = self.config.get("reward_mean")
        std = self.config.get("reward_std")
        if normalize is False:
            return None
        if mean is None or std is None:
            if normalize:
                raise ValueError("normalize=True, but the model's config has no reward_mean/reward_std")
            return None
        if float(std) <= 0:
            raise ValueError(f"the model's config has reward_std={std}; expected a positive number")
        return float(mean), float(std)

    # -- scoring ------------------------------------------------------------------------------------------------

    def reduce(self, outputs: torch.Tensor) -> float:
        """Turn one sequence's outputs (a 1-D tensor) into the reward (steps 2-5 of the class docstring)."""
        outputs = outputs.reshape(-1).float()
        self._check_selection(outputs.numel())
        if self.transform == "softmax":
            outputs = outputs.softmax(-1)
        if self.output_weights is not None:
            value = float(outputs @ self.output_weights)
        else:
            value = float(outputs[self.output_index or 0])
        if self.norm is not None:
            value = (value - self.norm[0]) / self.norm[1]
        if self.transform == "sigmoid":
            value = float(torch.sigmoid(torch.tensor(value)))
        return value

    def _engine_limit(self, limit: int | None) -> None:
        """Default ``max_length`` to the longest sequence the engine takes (when the caller set none)."""
        if limit is not None and not self.max_length_given:
            self.formatter.max_length = max(2, limit - len(self.suffix))

    def encode(self, batch: Batch) -> tuple[list[Encoded | None], list[str | None]]:
        """Tokenize every readable sample of a batch (each distinct sample once)."""
        return encode_samples(
            self.formatter.encode, batch.samples, strict=self.strict, where=f"{self.__name__}: "
        )

    def _prepare(self, batch: Batch) -> tuple[list[int], list[list[int]], dict[str, int]]:
        """Encode a batch: the samples to score, the token ids the engine scores for each, and the counts.

        transformers' classification heads read the rightmost token that is not the pad id, vLLM's the last
        token: trailing pad ids (e.g. an EOS that doubles as pad) are cut for vLLM so both read one position."""
        encoded, errors = self.encode(batch)
        counts = encoding_counts(encoded, errors)
        log_encoding(self.__name__, counts, errors, self.formatter.max_length)
        todo = [i for i, e in enumerate(encoded) if e is not None]
        sequences = [encoded[i].input_ids + self.suffix for i in todo]  # type: ignore[union-attr]
        if self.engine_kind != "hf":
            sequences = [strip_trailing(s, self.pad_token_id) for s in sequences]
        return todo, sequences, counts

    def _finish(
        self,
        batch: Batch,
        todo: list[int],
        rows: list[torch.Tensor | None],
        reasons: list[str | None],
        counts: dict[str, int],
    ) -> RewardOutput:
        rewards: list[float | None] = [None] * len(batch)
        for i, row in zip(todo, rows, strict=True):
            if row is not None:
                rewards[i] = self.reduce(row)
        always = ("server_failed", "server_rejected") if self.engine_kind == "openai" else ()
        counts.update(reason_counts(reasons, always))
        return RewardOutput(rewards, counts)

    def compute(self, batch: Batch) -> RewardOutput:
        if self.engine_kind == "openai":
            return run_sync(self._compute_remote(batch))
        todo, sequences, counts = self._prepare(batch)
        if self.engine_kind == "hf":
            rows, reasons = self.engine.run_checked(sequences, self.adapter.read)
        else:
            rows, reasons = self.engine.run(sequences)
        return self._finish(batch, todo, rows, reasons, counts)

    async def _compute_remote(self, batch: Batch) -> RewardOutput:
        if not self.max_length_given and self.formatter.max_length is None:
            self._engine_limit(await self.engine.read_max_sequence_length())
        todo, sequences, counts = self._prepare(batch)
        rows, reasons = await self.engine.run(sequences)
        return self._finish(batch, todo, rows, reasons, counts)


def strip_trailing(ids: list[int], token_id: int) -> list[int]:
    """``ids`` without its trailing ``token_id`` tokens (at least one token is kept)."""
    end = len(ids)
    while end > 1 and ids[end - 1] == token_id:
        end -= 1
    return ids[:end]
