"""The logits of a few tokens, computed from a causal LM's final hidden states.

Rewards that read a language model's opinion of a few tokens (a pairwise model's ``A`` / ``B``, a PRM's ``+`` /
``-``) need only those tokens' rows of the output projection. On vLLM they get the final hidden states (the
pooling runner with ``convert="embed"``, no normalization: the decoder's output after its last norm, what the LM
head reads) and apply the rows here, so every engine computes ``hidden @ W[ids].T`` from the same numbers.

:meth:`ChosenLogits.from_checkpoint` reads the rows from the checkpoint's safetensors files without loading the
model: the output projection's parameter name comes from the model class built on the ``meta`` device (tied
embeddings included), and only the chosen rows are read. The model's own logit transforms are applied after the
projection: ``final_logit_softcapping`` (Gemma 2), ``logit_scale`` (Cohere), ``logits_scaling`` (Granite); a
config with another output scaling is refused, naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


class ChosenLogits:
    """``hidden @ rows.T (+ bias)``, then the model's logit transforms: the logits of ``token_ids`` only.

    Args:
        rows: the output projection's rows of the chosen tokens, ``[len(token_ids), hidden]``.
        bias: the projection's bias at those tokens, if it has one.
        config: the model's config (a dict or ``PretrainedConfig``), for its logit transforms.
    """

    def __init__(self, rows: torch.Tensor, bias: torch.Tensor | None = None, config: Any = None) -> None:
        self.rows = rows.detach().float().cpu()
        self.bias = None if bias is None else bias.detach().float().cpu()
        settings = config if isinstance(config, dict) else (config.to_dict() if config is not None else {})
        self.softcap = _positive(settings.get("final_logit_softcapping"))
        self.scale = float(settings.get("logit_scale") or 1.0)
        self.divide = float(settings.get("logits_scaling") or 1.0)
        multiplier = settings.get("output_multiplier_scale")
        if multiplier not in (None, 1, 1.0):
            raise ValueError(
                f"the model scales its logits with output_multiplier_scale={multiplier}, which rh_trl's vLLM path "
                "does not reproduce; use engine='hf'"
            )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The chosen logits, ``[..., len(token_ids)]``, of hidden states ``[..., hidden]`` (float32)."""
        logits = hidden.float() @ self.rows.T
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits * self.scale / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @classmethod
    def from_checkpoint(
        cls, source: str | os.PathLike, token_ids: Sequence[int], trust_remote_code: bool = False
    ) -> ChosenLogits:
        """The rows of ``token_ids`` read from a causal LM checkpoint (a directory or hub id)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(os.fspath(source), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        head = skeleton.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"{Path(os.fspath(source)).name}: the output projection is a {type(head).__name__}, not a linear "
                "layer; its logits cannot be computed from hidden states here (use engine='hf')"
            )
        names = [n for n, p in skeleton.named_parameters(remove_duplicate=False) if p is head.weight]
        bias_names = (
            [] if head.bias is None else [n for n, p in skeleton.named_parameters() if p is head.bias]
        )
        tensors = _SafetensorsIndex(source)
        rows = tensors.rows(names, token_ids)
        bias = tensors.rows(bias_names, token_ids) if bias_names else None
        return cls(rows, bias, config)


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


class _SafetensorsIndex:
    """Where each tensor of a checkpoint lives (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = os.fspath(source)
        index = self._file("model.safetensors.index.json", required=False)
        if index is not None:
            self.files = {
                name: file for name, file in json.loads(Path(index).read_text())["weight_map"].items()
            }
        else:
            self.files = None

    def _file(self, name: str, required: bool = True) -> str | None:
        local = Path(self.source) / name
        if local.is_file():
            return str(local)
        if Path(self.source).is_dir():
            if required:
                raise FileNotFoundError(f"{self.source} has no {name}; expected a safetensors checkpoint")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(self.source, name)
        except EntryNotFoundError:
            if required:
                raise
            return None

    def rows(self, names: Sequence[str], token_ids: Sequence[int]) -> torch.Tensor:
        """The rows ``token_ids`` of the first of ``names`` the checkpoint holds (a tied weight has several)."""
        from safetensors import safe_open

        for name in names:
            file = self._locate(name)
            if file is None:
                continue
            with safe_open(file, framework="pt") as handle:
                held = set(handle.keys())
                if name not in held:
                    continue
                tensor = handle.get_slice(name)
                return torch.stack([tensor[int(t) : int(t) + 1][0] for t in token_ids])
        raise KeyError(f"{self.source}: none of the tensors {names} is in the checkpoint")

    def _locate(self, name: str) -> str | None:
        if self.files is None:
            return self._file("model.safetensors")
        file = self.files.get(name)
        return None if file is None else self._file(file)
