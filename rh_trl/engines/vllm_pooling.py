"""Reward models on vLLM's pooling runner: raw head outputs or hidden states, in this process or from ``vllm serve``.

Four tasks, all asked with ``use_activation=False`` by default so that rh_trl applies the same softmax / sigmoid /
normalization on every engine:

* ``"classify"`` — one row per sequence (``[num_labels]``): sequence-classification reward models, pooled at
  the last token. In process: ``LLM.encode(pooling_task="classify")``; on a server: ``POST /classify``, whose
  ``probs`` are the raw logits with ``use_activation: false`` for a head of any size (its defaults are sigmoid
  for one label and softmax for several, which would be applied twice), with ``num_classes`` to check against
  the head. verl's reward loop posts the same request.
* ``"token_classify"`` — one row per token (``[seq, num_labels]``): token-classification PRMs. In process the
  engine is built with ALL token pooling, so any step separator works (vLLM's default for
  ``Qwen2ForProcessRewardModel`` keeps only the rows at Qwen's own ``<extra_0>``, id 151651); on a server,
  ``POST /pooling`` with ``"task": "token_classify"`` (start ``vllm serve`` with
  ``--pooler-config '{"tok_pooling_type": "ALL"}'`` for such models). :func:`rows_at_steps` reads the step rows
  from either an all-token or a step-pooled answer.
* ``"embed"`` — one vector per sequence, pooled as ``pooling`` says (``"last"``, ``"mean"``, ``"cls"``): sentence
  encoders, and a causal LM's final hidden state at the last token (``convert="embed"``; what a pairwise model's
  or CLoud's head reads). On a server: ``POST /pooling`` with ``"task": "embed"``.
* ``"token_embed"`` — a causal LM's final hidden state at every token (``[seq, hidden]``), from which
  :class:`~rh_trl.engines.chosen_logits.ChosenLogits` computes a few tokens' logits (next-token and step-tag
  PRMs). On a server: ``POST /pooling`` with ``"task": "token_embed"`` (``vllm serve DIR --runner pooling
  --convert embed --pooler-config '{"task": "token_embed", "tok_pooling_type": "ALL"}'``).

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

from rh_trl.engines.batching import Reason, deduplicate, run_fitting
from rh_trl.engines.http import MalformedResponse, run_sync
from rh_trl.engines.logprobs import TokenMismatchError
from rh_trl.engines.server_batches import SequenceBatchClient
from rh_trl.engines.vllm_llm import InProcessVLLM, engine_kind, import_vllm

PoolingTask = Literal["classify", "token_classify", "embed", "token_embed"]
POOLING_TASKS = ("classify", "token_classify", "embed", "token_embed")
#: tasks with one row per token (the others give one row per sequence)
TOKEN_TASKS = ("token_classify", "token_embed")

#: the pooler that makes a token-classification model return a row for every token
ALL_TOKENS = {"tok_pooling_type": "ALL"}


def _check_task(task: str) -> None:
    if task not in POOLING_TASKS:
        raise ValueError(f"task must be one of {list(POOLING_TASKS)}, got {task!r}")


def default_pooler(
    model: str | os.PathLike, task: str, pooling: str
) -> tuple[dict[str, Any] | None, str | None]:
    """vLLM's pooler settings and ``convert`` option for ``task`` (a causal LM gives hidden states through
    ``convert="embed"``)."""
    if task == "token_classify":
        return ALL_TOKENS, None
    if task == "classify":
        return None, None
    from rh_trl.models.loading import config_dict

    causal = any(a.endswith("ForCausalLM") for a in config_dict(os.fspath(model)).get("architectures") or [])
    if task == "token_embed":
        return {"task": "token_embed", "tok_pooling_type": "ALL"}, "embed" if causal else None
    return {"task": "embed", "pooling_type": pooling.upper()}, "embed" if causal else None


def rows_at_steps(
    rows: torch.Tensor, input_ids: Sequence[int], positions: Sequence[int], step_token_id: int, where: str
) -> torch.Tensor:
    """The rows (``[steps, num_labels]``) of a token-level pooling output at each step position.

    ``rows`` holds one row per token (ALL pooling) or one per step token (STEP pooling with this step token id).
    """
    for k, p in enumerate(positions):
        if not 0 <= p < len(input_ids) or input_ids[p] != step_token_id:
            raise ValueError(f"step {k + 1}: position {p} does not hold the step token id {step_token_id}")
    if rows.dim() != 2:
        raise MalformedResponse(
            f"{where}: expected pooled rows of shape [rows, labels], got {tuple(rows.shape)}"
        )
    if rows.shape[0] == len(input_ids):
        return rows[list(positions)]
    if rows.shape[0] == len(positions) == sum(1 for t in input_ids if t == step_token_id):
        return rows
    raise MalformedResponse(
        f"{where} returned {rows.shape[0]} rows for {len(input_ids)} tokens and {len(positions)} steps; expected "
        "one row per token. A model pooled by step tokens (vLLM's default for Qwen2ForProcessRewardModel keeps "
        f"only Qwen's <extra_0>, id 151651; this separator's id is {step_token_id}) must be served with "
        '--pooler-config \'{"tok_pooling_type": "ALL"}\''
    )


class VLLMPoolingEngine(InProcessVLLM):
    """A model in an in-process ``vllm.LLM(runner="pooling")``, asked for raw head outputs or hidden states.

    Args:
        model: a model directory or hub id.
        task: ``"classify"``, ``"token_classify"``, ``"embed"`` or ``"token_embed"`` (see the module doc).
        pooling: how ``"embed"`` pools a sequence: ``"last"`` (default), ``"mean"`` or ``"cls"``.
        use_activation: vLLM's activation on the pooled output (softmax/sigmoid for classification, L2
            normalization for embeddings); off by default, so that rh_trl's own transforms apply once.
        pooler_config: vLLM's pooler settings (default: what ``task`` and ``pooling`` need).
        dtype, enable_sleep_mode, **llm_kwargs: see :class:`~rh_trl.engines.vllm_llm.InProcessVLLM`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        task: PoolingTask,
        pooling: str = "last",
        use_activation: bool = False,
        pooler_config: dict[str, Any] | Any = None,
        **llm_kwargs: Any,
    ) -> None:
        _check_task(task)
        if not isinstance(model, str | os.PathLike):
            raise TypeError(f"the vLLM engine loads models by path or hub id; got a {type(model).__name__}")
        default, convert = default_pooler(model, task, pooling)
        pooler_config = default if pooler_config is None else pooler_config
        if isinstance(pooler_config, dict):
            import_vllm()
            from vllm.config import PoolerConfig

            pooler_config = PoolerConfig(**pooler_config)
        if convert is not None:
            llm_kwargs.setdefault("convert", convert)
        super().__init__(model, runner="pooling", pooler_config=pooler_config, **llm_kwargs)
        self.task = task
        self.pooling = pooling
        self.use_activation = use_activation

    def run(self, sequences: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor | None], list[Reason]]:
        """Each sequence's pooled rows (float32), or ``None`` and the reason (``"too_long"``)."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        def encode(prompts: list[list[int]]) -> list[torch.Tensor]:
            outputs = self.llm.encode(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                pooling_task=self.task,
                pooling_params=PoolingParams(use_activation=self.use_activation),
                use_tqdm=False,
            )
            rows = []
            for ids, out in zip(prompts, outputs, strict=False):  # run_fitting checks the count
                scored = getattr(out, "prompt_token_ids", None)
                if scored is not None and list(scored) != ids:
                    raise RuntimeError("the vLLM output belongs to other tokens than the ones sent")
                rows.append(torch.as_tensor(out.outputs.data, dtype=torch.float32).cpu())
            return rows

        self._check_awake()
        unique, inverse = deduplicate([tuple(int(t) for t in s) for s in sequences])
        distinct = [[int(t) for t in sequences[i]] for i in unique]
        rows, reasons = run_fitting(f"vLLM engine {self.name}", distinct, self.max_sequence_length, encode)
        return [rows[k] for k in inverse], [reasons[k] for k in inverse]


class VLLMPoolingClient(SequenceBatchClient[torch.Tensor]):
    """Pooled rows from ``vllm serve --runner pooling`` (``/classify``, or ``/pooling`` for the other tasks).

    Args:
        urls: base URL(s) of the server (replicas of one model), without ``/v1``.
        task: ``"classify"``, ``"token_classify"``, ``"embed"`` or ``"token_embed"`` (see the module doc).
        use_activation: as for :class:`VLLMPoolingEngine`.
        label, **options: ``model`` (the served name), ``api_key``, ``batch_size``, ``max_concurrency``,
            ``retry``, ``transport``: see :class:`~rh_trl.engines.server_batches.SequenceBatchClient`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        task: PoolingTask,
        use_activation: bool = False,
        label: str = "reward model",
        **options: Any,
    ) -> None:
        _check_task(task)
        super().__init__(urls, label=label, **options)
        self.task = task
        self.use_activation = use_activation
        self.PATH = "/classify" if task == "classify" else "/pooling"

    def payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input": prompts,
            "use_activation": self.use_activation,
            "add_special_tokens": False,
        }
        if self.task != "classify":
            body["task"] = self.task
        if self.model is not None:
            body["model"] = self.model
        return body

    def parse(self, answer: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
        where = f"{self.label} server {self.pool.urls[0]}{self.PATH}"
        data = self.entries(answer, "data", len(prompts), where)
        usage = answer.get("usage")
        sent = sum(len(p) for p in prompts)
        if (
            isinstance(usage, dict)
            and isinstance(usage.get("prompt_tokens"), int)
            and usage["prompt_tokens"] != sent
        ):
            raise TokenMismatchError(
                f"{where} scored {usage['prompt_tokens']} prompt tokens but {sent} were sent; it must score the "
                "token ids exactly as sent (no special tokens added)"
            )
        key = "probs" if self.task == "classify" else "data"
        rows = []
        for i, entry in enumerate(data):
            value = entry.get(key) if isinstance(entry, dict) else None
            try:
                row = torch.tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise MalformedResponse(
                    f"{where}: entry {i} has no numeric '{key}' list: {str(entry)[:200]}"
                ) from None
            if row.dim() != (2 if self.task in TOKEN_TASKS else 1):
                raise MalformedResponse(f"{where}: entry {i}: '{key}' has shape {tuple(row.shape)}")
            classes = entry.get("num_classes")
            if isinstance(classes, int) and classes != row.shape[-1]:
                raise MalformedResponse(
                    f"{where}: entry {i} says {classes} classes but holds {row.shape[-1]}"
                )
            rows.append(row)
        return rows


def engine_argument(
    engine: Any, task: PoolingTask, pooling: str | None = None
) -> tuple[str, VLLMPoolingEngine | None]:
    """A pooling reward's ``engine=``: its kind (``"hf"``, ``"vllm"``, ``"openai"``), and the engine itself when an
    already-built :class:`VLLMPoolingEngine` was given to share (its task, and pooling when given, must fit)."""
    if isinstance(engine, VLLMPoolingEngine):
        if engine.task != task or (pooling is not None and engine.pooling != pooling):
            raise ValueError(
                f"engine= is a vLLM engine for the task {engine.task!r} (pooling {engine.pooling!r}); this reward "
                f"needs the task {task!r}" + (f" with pooling {pooling!r}" if pooling else "")
            )
        return "vllm", engine
    return engine_kind(engine), None


def pooled_rows(
    engine: VLLMPoolingEngine | VLLMPoolingClient, sequences: Sequence[Sequence[int]]
) -> tuple[list[torch.Tensor | None], list[Reason]]:
    """Each sequence's pooled rows, or ``None`` and the reason, from an in-process engine or a server's client
    alike (the client's requests run to completion here)."""
    if isinstance(engine, VLLMPoolingClient):
        return run_sync(engine.run(sequences))
    return engine.run(sequences)


def build_pooling_engine(
    kind: str,
    source: Any,
    task: PoolingTask,
    *,
    shared: VLLMPoolingEngine | None = None,
    dtype: Any = "auto",
    trust_remote_code: bool = False,
    vllm_kwargs: dict[str, Any] | None = None,
    pooling: str = "last",
    use_activation: bool = False,
    **client_options: Any,
) -> VLLMPoolingEngine | VLLMPoolingClient:
    """A pooling reward's vLLM engine: in this process (``"vllm"``; ``source`` a path or hub id) or a client of
    ``vllm serve`` (``"openai"``; ``source`` the URL(s), ``client_options`` as for :class:`VLLMPoolingClient`)."""
    if kind == "openai":
        return VLLMPoolingClient(source, task=task, use_activation=use_activation, **client_options)
    if shared is not None:
        return shared
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"engine='vllm' loads the model by path or hub id, got a {type(source).__name__}")
    return VLLMPoolingEngine(
        source,
        task=task,
        pooling=pooling,
        use_activation=use_activation,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        **(vllm_kwargs or {}),
    )
