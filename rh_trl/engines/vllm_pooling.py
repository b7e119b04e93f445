"""In-process vLLM pooling engine for token-classification process reward models (Qwen2.5-Math-PRM style).

vLLM runs the model with ``runner="pooling"``; ``LLM.encode(prompts, pooling_task="token_classify")`` returns
one ``PoolingRequestOutput`` per prompt whose ``outputs.data`` is either one row per prompt token (``ALL``
pooling) or one row per step-tag token (``STEP`` pooling, vLLM's default for ``Qwen2ForProcessRewardModel``).
Rows are class probabilities (vLLM applies the head's softmax by default). :func:`step_probabilities` reads
the positive-class probability of each step from either shape, after checking that the output belongs to the
tokens that were sent.

vLLM is an optional dependency: ``pip install 'rh_trl[vllm]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)


def import_vllm() -> Any:
    """Import vLLM, or raise an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the vLLM engine needs vLLM, which is not installed: pip install 'rh_trl[vllm]'"
        ) from err
    return vllm


def step_probabilities(
    output: Any,
    input_ids: Sequence[int],
    positions: Sequence[int],
    step_token_id: int,
    positive_index: int = 1,
    outputs_are_probabilities: bool = True,
) -> list[float]:
    """The positive-class probability at each step position of one vLLM pooling output.

    Args:
        output: a ``PoolingRequestOutput`` (``output.outputs.data``: ``[num_rows, num_labels]``;
            ``output.prompt_token_ids``: the tokens vLLM scored).
        input_ids: the tokens that were sent.
        positions: the index in ``input_ids`` of each step's separator token.
        step_token_id: the separator's token id (each position is checked against it).
        positive_index: the class whose probability is the step score.
        outputs_are_probabilities: rows are already probabilities (vLLM's default activation); ``False``
            applies a softmax to raw logits.
    """
    sent = list(input_ids)
    scored = getattr(output, "prompt_token_ids", None)
    if scored is not None and list(scored) != sent:
        raise ValueError(
            "the vLLM output belongs to other tokens than the ones sent (request order mixed up?)"
        )
    for k, p in enumerate(positions):
        if not 0 <= p < len(sent) or sent[p] != step_token_id:
            raise ValueError(f"step {k + 1}: position {p} does not hold the step token id {step_token_id}")
    data = torch.as_tensor(output.outputs.data, dtype=torch.float32)
    if data.dim() != 2:
        raise ValueError(f"expected pooled data of shape [rows, labels], got {tuple(data.shape)}")
    if data.shape[0] == len(sent):  # ALL pooling: one row per token
        rows = data[list(positions)]
    elif data.shape[0] == sum(1 for t in sent if t == step_token_id) == len(positions):
        rows = data  # STEP pooling: one row per step token, in order
    else:
        raise ValueError(
            f"vLLM returned {data.shape[0]} rows for {len(sent)} tokens and {len(positions)} steps; expected one "
            "row per token (ALL pooling) or one per step token (STEP pooling with this step token id)"
        )
    if outputs_are_probabilities:
        if not torch.allclose(rows.sum(-1), torch.ones(len(rows)), atol=1e-3):
            raise ValueError(
                "the pooled rows are not probabilities (they do not sum to 1); "
                "pass outputs_are_probabilities=False to apply the softmax here"
            )
        probs = rows
    else:
        probs = rows.softmax(-1)
    return [float(x) for x in probs[:, positive_index]]


class VLLMTokenClassifier:
    """A token-classification PRM served by an in-process ``vllm.LLM(model, runner="pooling")``.

    Args:
        model: model path or hub id (ignored when ``llm`` is given).
        llm: an already-built ``vllm.LLM`` (or an object with the same ``encode`` method).
        positive_index: the class whose probability is the step score.
        outputs_are_probabilities: see :func:`step_probabilities`.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``max_model_len``,
            ``trust_remote_code``).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        llm: Any = None,
        positive_index: int = 1,
        outputs_are_probabilities: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        if llm is None:
            if model is None:
                raise ValueError("pass a model path or hub id, or an already-built llm=")
            vllm = import_vllm()
            llm = vllm.LLM(model=model, runner="pooling", **llm_kwargs)
        self.llm = llm
        self.positive_index = positive_index
        self.outputs_are_probabilities = outputs_are_probabilities

    def score_steps(
        self, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], step_token_id: int
    ) -> list[list[float]]:
        """The step probabilities of every sequence (one ``encode`` call for the whole list)."""
        prompts = [{"prompt_token_ids": list(s)} for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        if len(outputs) != len(prompts):
            raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [
            step_probabilities(
                out, seq, pos, step_token_id, self.positive_index, self.outputs_are_probabilities
            )
            for out, seq, pos in zip(outputs, sequences, positions, strict=True)
        ]
