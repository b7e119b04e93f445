"""Embedding-based reward models: a frozen encoder's vector of (prompt, response), scored by small MLP heads.

The encoder (:class:`~rh_trl.rewards.text_encoder.TextEncoder`: a sentence encoder with mean pooling, or a causal LM's
last-token hidden state) is never trained; the heads (:class:`~rh_trl.rewards.embedding_heads.EmbeddingHead`) are
trained on CPU by ``recipes/train_embedding_rm.py``. With several heads (an ensemble that differs only in
seeds) the reward is their mean, and their spread goes to TRL's completions table.

A saved directory holds ``embedding_rm.json`` (the encoder's source and settings, the heads' shapes, the reward
normalization), ``heads.safetensors``, the encoder's tokenizer in ``tokenizer/`` and, for an encoder that
cannot be loaded from a path or hub id, its weights in ``encoder/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rh_trl.formatting import RewardInputError
from rh_trl.rewards.base import Batch, Reward, RewardOutput, log_encoding
from rh_trl.rewards.embedding_heads import EmbeddingHead, ensemble_scores
from rh_trl.rewards.text_encoder import MINILM, EmbeddingCache, TextEncoder

logger = logging.getLogger("rh_trl")

CONFIG_NAME = "embedding_rm.json"
HEADS_NAME = "heads.safetensors"
FORMAT_VERSION = 1


class EmbeddingRM(Reward):
    """An embedding-based reward model as a TRL reward function.

    reward = mean over heads of ``head(encoder(prompt, response))``, then ``(r − reward_mean) / reward_std``
    when ``normalization`` is set (``recipes/train_embedding_rm.py`` stores the training responses' mean and
    std; ``normalize=False`` turns it off).

    Args:
        encoder: a :class:`~rh_trl.rewards.text_encoder.TextEncoder`, or what its ``model`` argument takes (a path, a hub
            id, ``"rh_trl:minilm"``, a loaded model), in which case ``encoder_options`` go to its constructor.
        heads: one :class:`~rh_trl.rewards.embedding_heads.EmbeddingHead` or several (an ensemble, averaged).
        name: metric name (default ``embedding_<encoder name>``, made unique).
        normalization: ``(reward_mean, reward_std)`` applied to the heads' mean.
        normalize: ``None`` applies ``normalization`` when given, ``False`` never does.
        strict: raise on a malformed or unrenderable sample instead of giving it ``None``.

    Load a trained one with :meth:`from_pretrained`; save with :meth:`save`.
    """

    def __init__(
        self,
        encoder: Any,
        heads: EmbeddingHead | Sequence[EmbeddingHead],
        *,
        name: str | None = None,
        normalization: tuple[float, float] | None = None,
        normalize: bool | None = None,
        strict: bool = False,
        **encoder_options: Any,
    ) -> None:
        if isinstance(encoder, TextEncoder):
            if encoder_options:
                raise TypeError(
                    f"encoder options {sorted(encoder_options)} were given with an already-built TextEncoder; "
                    "pass them to TextEncoder instead"
                )
        else:
            encoder = TextEncoder(encoder, **encoder_options)
        self.encoder: TextEncoder = encoder
        head_list = [heads] if isinstance(heads, EmbeddingHead) else list(heads)
        if not head_list or not all(isinstance(h, EmbeddingHead) for h in head_list):
            raise TypeError(
                "heads must be an EmbeddingHead or a non-empty list of them; load a trained reward with "
                "EmbeddingRM.from_pretrained(directory)"
            )
        for k, head in enumerate(head_list):
            if head.input_dim != encoder.dim:
                raise ValueError(
                    f"head {k} takes vectors of length {head.input_dim} but the encoder gives {encoder.dim}"
                )
        self.heads = [h.eval() for h in head_list]
        if normalization is not None:
            mean, std = (float(v) for v in normalization)
            if not std > 0:
                raise ValueError(f"normalization std must be positive, got {std}")
            normalization = (mean, std)
        self.normalization = normalization
        self.norm = None if normalize is False else normalization
        if normalize and normalization is None:
            raise ValueError("normalize=True, but no normalization=(reward_mean, reward_std) was given")
        super().__init__(
            name=name,
            default_name=f"embedding_{encoder.name}",
            strict=strict,
            text_as_chat=encoder.text_as_chat,
        )

    # -- scoring -------------------------------------------------------------------------------------------------

    def head_scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """Every head's raw score of ``vectors`` (``[n, dim]`` → ``[num_heads, n]``)."""
        return ensemble_scores(self.heads, vectors)

    def compute(self, batch: Batch) -> RewardOutput:
        try:
            embedded = self.encoder.embed(batch.samples, strict=self.strict)
        except RewardInputError as err:
            raise RewardInputError(f"{self.__name__}: {err}") from err.__cause__
        log_encoding(self.__name__, embedded.counts, embedded.errors, self.encoder.max_length)
        todo = [i for i, v in enumerate(embedded.vectors) if v is not None]
        rewards: list[float | None] = [None] * len(batch)
        extra: dict[str, list[Any]] = {}
        if todo:
            scores = self.head_scores(torch.stack([embedded.vectors[i] for i in todo]))  # type: ignore[misc]
            values = scores.mean(0)
            scale = 1.0
            if self.norm is not None:
                values = (values - self.norm[0]) / self.norm[1]
                scale = self.norm[1]
            for i, value in zip(todo, values.tolist(), strict=True):
                rewards[i] = float(value)
            if len(self.heads) > 1:
                spread: list[float | None] = [None] * len(batch)
                for i, value in zip(todo, (scores.std(0, unbiased=False) / scale).tolist(), strict=True):
                    spread[i] = float(value)
                extra["spread"] = spread
        return RewardOutput(rewards, dict(embedded.counts), extra)

    # -- saving and loading --------------------------------------------------------------------------------------

    def config(self, encoder_model: str) -> dict[str, Any]:
        """The JSON config saved with the heads."""
        return {
            "format_version": FORMAT_VERSION,
            "encoder": {"model": encoder_model, **self.encoder.settings()},
            "heads": [h.config() for h in self.heads],
            "reward_mean": None if self.normalization is None else self.normalization[0],
            "reward_std": None if self.normalization is None else self.normalization[1],
        }

    def save(self, directory: str | os.PathLike, save_encoder: bool | None = None, **extra: Any) -> Path:
        """Write the reward to ``directory`` (see the module docstring); returns its path.

        ``save_encoder=None`` copies the encoder's weights only when it was given as a loaded model (it has
        no path to load from); ``True`` always copies them. ``extra`` keys are added to the JSON config (e.g.
        how the heads were trained).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.encoder.source
        if save_encoder or source is None:
            self.encoder.model.save_pretrained(directory / "encoder")
            encoder_model = "encoder"
        elif str(source) == MINILM:
            encoder_model = MINILM
        else:
            path = Path(source).expanduser()
            encoder_model = str(path.resolve()) if path.exists() else str(source)
        self.encoder.tokenizer.save_pretrained(directory / "tokenizer")
        tensors = {
            f"{k}.{key}": value.detach().cpu().contiguous()
            for k, head in enumerate(self.heads)
            for key, value in head.state_dict().items()
        }
        save_file(tensors, str(directory / HEADS_NAME))
        config = {**self.config(encoder_model), **extra}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        name: str | None = None,
        normalize: bool | None = None,
        strict: bool = False,
        cache: EmbeddingCache | str | os.PathLike | None = None,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        progress: bool = False,
        engine: str = "hf",
        encoder_url: str | Sequence[str] | None = None,
        served_model: str | None = None,
        api_key: str | None = None,
        vllm_kwargs: dict[str, Any] | None = None,
    ) -> EmbeddingRM:
        """Load a reward saved by :meth:`save` (the encoder settings are the saved ones: vectors must match
        what the heads were trained on).

        ``engine`` runs the encoder on ``"hf"``, ``"vllm"`` or ``"openai"`` (see :class:`TextEncoder`); with
        ``"openai"``, ``encoder_url`` is the server that serves the saved encoder (``served_model``, ``api_key``).
        """
        directory = Path(directory).expanduser()
        config_path = directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(
                f"'{directory}' is not an embedding reward model: it has no {CONFIG_NAME} "
                "(expected the output of EmbeddingRM.save or recipes/train_embedding_rm.py)"
            )
        config = json.loads(config_path.read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format_version {config.get('format_version')!r} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        settings = dict(config["encoder"])
        model = settings.pop("model")
        if model == "encoder":
            model = str(directory / "encoder")
        tokenizer_dir = directory / "tokenizer"
        tokenizer = str(tokenizer_dir) if tokenizer_dir.exists() else None
        remote: dict[str, Any] = {}
        if engine == "openai":
            if encoder_url is None:
                raise ValueError(
                    "engine='openai' needs encoder_url=… (the server that serves the saved encoder)"
                )
            model, tokenizer = encoder_url, tokenizer or model
            remote = {"served_model": served_model, "api_key": api_key}
        encoder = TextEncoder(
            model,
            tokenizer,
            engine=engine,
            vllm_kwargs=vllm_kwargs,
            **remote,
            cache=cache,
            max_tokens_per_batch=max_tokens_per_batch,
            max_batch_size=max_batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            **settings,
        )
        heads = load_heads(directory / HEADS_NAME, config["heads"])
        mean, std = config.get("reward_mean"), config.get("reward_std")
        return cls(
            encoder,
            heads,
            name=name,
            normalization=None if mean is None or std is None else (mean, std),
            normalize=normalize,
            strict=strict,
        )


def load_heads(path: Path, configs: Sequence[dict[str, Any]]) -> list[EmbeddingHead]:
    """Heads built from their configs, with the weights saved in ``path``."""
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"head weights '{path}' are missing")
    tensors = load_file(str(path))
    heads = []
    for k, head_config in enumerate(configs):
        head = EmbeddingHead(**head_config)
        prefix = f"{k}."
        head.load_state_dict({key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)})
        heads.append(head.eval())
    return heads


def load_embedding_rm(model: str | os.PathLike, engine: str = "hf", **options: Any) -> EmbeddingRM:
    """:meth:`EmbeddingRM.from_pretrained` under the argument name reward specs use
    (``{"type": "embedding", "model": "outputs/embedding-minilm-hh"}``)."""
    return EmbeddingRM.from_pretrained(model, engine=engine, **options)
