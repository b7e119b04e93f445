"""Outcome reward models: one score per (prompt, completion) from a sequence-classification-style model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from rh_trl.engines.hf import HFEngine
from rh_trl.formatting import ChatFormatter, Encoded, encode_samples, encoding_counts
from rh_trl.loading import config_dict, load_model, load_tokenizer, padding_id
from rh_trl.rewards.adapters import DEFAULT_ADAPTER, ORMAdapter, adapter_for, get_orm_adapter
from rh_trl.rewards.base import Batch, Reward, RewardOutput, log_encoding

logger = logging.getLogger("rh_trl")

Transform = Literal["none", "sigmoid", "softmax"]


class ORM(Reward):
    """An outcome reward model as a TRL reward function.

    The sample is rendered with the reward model's own tokenizer and chat template (see
    :mod:`rh_trl.formatting`), scored on the local transformers engine, and turned into one number:

    1. the model's outputs for the sequence (``num_labels`` logits, or what the adapter reads);
    2. ``transform="softmax"`` turns them into probabilities first;
    3. one number: ``output_index`` picks an output, ``output_weights`` takes a weighted sum
       (a list, or a dict keyed by the labels in ``config.id2label``); a single-output head needs neither;
    4. ``(r - reward_mean) / reward_std`` when the model's config stores those (``normalize=None`` applies them
       when present, ``False`` never does);
    5. ``transform="sigmoid"`` squashes the result into (0, 1).

    Args:
        model: a model directory, a hub id, or a loaded model.
        tokenizer: the reward model's tokenizer (object or path); by default loaded from ``model``.
        name: metric name (default ``orm_<model name>``, made unique).
        adapter: an :class:`ORMAdapter` or its registered name; by default chosen from the config's architecture.
        max_length: longest input in tokens; longer samples lose prompt tokens from the left.
        max_tokens_per_batch, max_batch_size: the engine's micro-batch budget.
        device, device_map, dtype: where and how the model is loaded (``device`` defaults to this process's
            accelerator, else the CPU).
        chat_template, text_as_chat, chat_template_kwargs: see :class:`~rh_trl.formatting.ChatFormatter`.
        progress: show a progress bar while scoring.
        strict: raise on a malformed sample instead of giving it ``None``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
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
        chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        if transform not in ("none", "sigmoid", "softmax"):
            raise ValueError(f"transform must be 'none', 'sigmoid' or 'softmax', got {transform!r}")
        if output_index is not None and output_weights is not None:
            raise ValueError("pass output_index or output_weights, not both")
        config = config_dict(model)
        self.adapter = (
            get_orm_adapter(adapter) if isinstance(adapter, str) else (adapter or adapter_for(config))
        )
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
        )
        self.tokenizer = load_tokenizer(tokenizer, self.model, trust_remote_code=trust_remote_code)
        model_name = Path(str(getattr(self.model, "name_or_path", "") or "model")).name
        super().__init__(
            name=name, default_name=f"orm_{model_name}", strict=strict, text_as_chat=text_as_chat
        )

        # HF's classification heads take the rightmost token that is not config.pad_token_id, so batches are
        # padded with exactly that id
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = padding_id(self.tokenizer)
        self.engine = HFEngine(
            self.model,
            self.model.config.pad_token_id,
            max_tokens_per_batch,
            max_batch_size,
            progress=progress,
        )
        self.suffix = list(self.adapter.suffix(self.model, self.tokenizer))
        self.formatter = ChatFormatter(
            self.tokenizer,
            max_length=None if max_length is None else max_length - len(self.suffix),
            chat_template=chat_template,
            text_as_chat=text_as_chat,
            chat_template_kwargs=chat_template_kwargs,
        )
        self.transform = transform
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
        mean = getattr(self.model.config, "reward_mean", None)
        std = getattr(self.model.config, "reward_std", None)
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

    def encode(self, batch: Batch) -> tuple[list[Encoded | None], list[str | None]]:
        """Tokenize every readable sample of a batch (each distinct sample once)."""
        return encode_samples(
            self.formatter.encode, batch.samples, strict=self.strict, where=f"{self.__name__}: "
        )

    def compute(self, batch: Batch) -> RewardOutput:
        encoded, errors = self.encode(batch)
        counts = encoding_counts(encoded, errors)
        log_encoding(self.__name__, counts, errors, self.formatter.max_length)
        todo = [i for i, e in enumerate(encoded) if e is not None]
        rows = self.engine.run([encoded[i].input_ids + self.suffix for i in todo], self.adapter.read)  # type: ignore[union-attr]
        rewards: list[float | None] = [None] * len(batch)
        for i, row in zip(todo, rows, strict=True):
            rewards[i] = self.reduce(row)
        return RewardOutput(rewards, counts)
