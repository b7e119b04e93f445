"""Reward models on vLLM's pooling runner: raw head outputs, in this process or from ``vllm serve``.

Two tasks, both asked with ``use_activation=False`` so that rh_trl applies the same softmax / sigmoid /
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

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

from rh_trl.engines.batching import Reason, deduplicate, run_fitting
from rh_trl.engines.http import MalformedResponse
from rh_trl.engines.logprobs import TokenMismatchError
from rh_trl.engines.server_batches import SequenceBatchClient
from rh_trl.engines.vllm_llm import InProcessVLLM, import_vllm

PoolingTask = Literal["classify", "token_classify"]

#: the pooler that makes a token-classification model return a row for every token
ALL_TOKENS = {"tok_pooling_type": "ALL"}


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
    """A reward model in an in-process ``vllm.LLM(runner="pooling")``, asked for raw head outputs.

    Args:
        model: a model directory or hub id.
        task: ``"classify"`` (a row per sequence) or ``"token_classify"`` (a row per token).
        pooler_config: vLLM's pooler settings (default for ``token_classify``: ALL token pooling).
        dtype, enable_sleep_mode, **llm_kwargs: see :class:`~rh_trl.engines.vllm_llm.InProcessVLLM`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        task: PoolingTask,
        pooler_config: dict[str, Any] | Any = None,
        **llm_kwargs: Any,
    ) -> None:
        if task not in ("classify", "token_classify"):
            raise ValueError(f"task must be 'classify' or 'token_classify', got {task!r}")
        if pooler_config is None and task == "token_classify":
            pooler_config = ALL_TOKENS
        if isinstance(pooler_config, dict):
            import_vllm()
            from vllm.config import PoolerConfig

            pooler_config = PoolerConfig(**pooler_config)
        super().__init__(model, runner="pooling", pooler_config=pooler_config, **llm_kwargs)
        self.task = task

    def run(self, sequences: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor | None], list[Reason]]:
        """Each sequence's raw head outputs (float32), or ``None`` and the reason (``"too_long"``)."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        def encode(prompts: list[list[int]]) -> list[torch.Tensor]:
            outputs = self.llm.encode(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                pooling_task=self.task,
                pooling_params=PoolingParams(use_activation=False),
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
    """Raw head outputs from ``vllm serve --runner pooling`` (``/classify``, or ``/pooling`` for token rows).

    Args:
        urls: base URL(s) of the server (replicas of one model), without ``/v1``.
        task: ``"classify"`` or ``"token_classify"`` (see the module doc).
        label, **options: ``model`` (the served name), ``api_key``, ``batch_size``, ``max_concurrency``,
            ``retry``, ``transport``: see :class:`~rh_trl.engines.server_batches.SequenceBatchClient`.
    """

    def __init__(
        self, urls: str | Sequence[str], *, task: PoolingTask, label: str = "reward model", **options: Any
    ) -> None:
        if task not in ("classify", "token_classify"):
            raise ValueError(f"task must be 'classify' or 'token_classify', got {task!r}")
        super().__init__(urls, label=label, **options)
        self.task = task
        self.PATH = "/classify" if task == "classify" else "/pooling"

    def payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        body: dict[str, Any] = {"input": prompts, "use_activation": False, "add_special_tokens": False}
        if self.task == "token_classify":
            body["task"] = "token_classify"
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
            if row.dim() != (1 if self.task == "classify" else 2):
                raise MalformedResponse(f"{where}: entry {i}: '{key}' has shape {tuple(row.shape)}")
            classes = entry.get("num_classes")
            if isinstance(classes, int) and classes != row.shape[-1]:
                raise MalformedResponse(
                    f"{where}: entry {i} says {classes} classes but holds {row.shape[-1]}"
                )
            rows.append(row)
        return rows


def engine_argument(engine: Any, task: PoolingTask) -> tuple[str, VLLMPoolingEngine | None]:
    """A pooling reward's ``engine=``: its kind (``"hf"``, ``"vllm"``, ``"openai"``), and the engine itself when an
    already-built :class:`VLLMPoolingEngine` was given to share."""
    if isinstance(engine, VLLMPoolingEngine):
        if engine.task != task:
            raise ValueError(
                f"engine= is a vLLM engine for the task {engine.task!r}; this reward needs {task!r}"
            )
        return "vllm", engine
    if engine not in ("hf", "vllm", "openai"):
        raise ValueError(f"engine must be 'hf', 'vllm', 'openai' or a VLLMPoolingEngine, got {engine!r}")
    return engine, None


def build_pooling_engine(
    kind: str,
    source: Any,
    task: PoolingTask,
    *,
    shared: VLLMPoolingEngine | None = None,
    dtype: Any = "auto",
    trust_remote_code: bool = False,
    vllm_kwargs: dict[str, Any] | None = None,
    **client_options: Any,
) -> VLLMPoolingEngine | VLLMPoolingClient:
    """A pooling reward's vLLM engine: in this process (``"vllm"``; ``source`` a path or hub id) or a client of
    ``vllm serve`` (``"openai"``; ``source`` the URL(s), ``client_options`` as for :class:`VLLMPoolingClient`)."""
    if kind == "openai":
        return VLLMPoolingClient(source, task=task, **client_options)
    if shared is not None:
        return shared
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"engine='vllm' loads the model by path or hub id, got a {type(source).__name__}")
    return VLLMPoolingEngine(
        source, task=task, dtype=dtype, trust_remote_code=trust_remote_code, **(vllm_kwargs or {})
    )
