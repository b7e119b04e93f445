"""Small reward heads on frozen embeddings, and their training on preference pairs (CPU is enough).

A head standardizes its input with the training data's per-dimension mean and std (stored in the head), then
runs an MLP down to one number. Heads are trained on the vectors of chosen and rejected responses with

* ``loss="bt"``: Bradley-Terry, ``-log σ(r(chosen) − r(rejected))``;
* ``loss="classification"``: binary cross-entropy with chosen = 1 and rejected = 0 (each response scored alone).

:func:`train_heads` trains an ensemble of K heads that differ only in their seed (initialization, dropout and
batch order); an embedding reward averages them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger("rh_trl")

Loss = Literal["bt", "classification"]
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class EmbeddingHead(nn.Module):
    """``(x − input_mean) / input_std`` → [Linear → activation → Dropout] × len(hidden_dims) → Linear → 1.

    Args:
        input_dim: length of the embeddings.
        hidden_dims: widths of the hidden layers (``[]``: a linear head).
        activation: ``"gelu"``, ``"relu"`` or ``"tanh"``.
        dropout: dropout after each hidden layer (training only).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int] = (256,),
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if input_dim < 1:
            raise ValueError(f"input_dim must be positive, got {input_dim}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if any(int(h) < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive widths, got {list(hidden_dims)}")
        self.input_dim = int(input_dim)
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.activation = activation
        self.dropout = float(dropout)
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_std", torch.ones(input_dim))
        layers: list[nn.Module] = []
        width = input_dim
        for hidden in self.hidden_dims:
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (saved next to the weights)."""
        return {
            "input_dim": self.input_dim,
            "hidden_dims": self.hidden_dims,
            "activation": self.activation,
            "dropout": self.dropout,
        }

    def set_standardization(self, vectors: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardize inputs with the mean and std of ``vectors`` (``[n, input_dim]``)."""
        with torch.no_grad():
            self.input_mean.copy_(vectors.mean(0))
            self.input_std.copy_(vectors.std(0, unbiased=False).clamp(min=eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rewards of ``x`` (``[..., input_dim]`` → ``[...]``)."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"the head expects vectors of length {self.input_dim}, got {x.shape[-1]}")
        return self.mlp((x - self.input_mean) / self.input_std).squeeze(-1)


def ensemble_scores(heads: Sequence[EmbeddingHead], vectors: torch.Tensor) -> torch.Tensor:
    """Every head's rewards for ``vectors``: ``[num_heads, n]`` (eval mode, no gradients)."""
    with torch.inference_mode():
        return torch.stack([head.eval()(vectors.float()) for head in heads])


@dataclass
class HeadTraining:
    """How heads are trained on preference pairs.

    ``num_heads`` heads use seeds ``seed, seed + 1, …``. ``epochs`` passes over the training pairs in
    shuffled mini-batches of ``batch_size`` pairs, AdamW with ``learning_rate`` and ``weight_decay``.
    """

    loss: Loss = "bt"
    num_heads: int = 1
    hidden_dims: list[int] = field(default_factory=lambda: [256])
    activation: str = "gelu"
    dropout: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("bt", "classification"):
            raise ValueError(f"loss must be 'bt' or 'classification', got {self.loss!r}")
        for name in ("num_heads", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss of a batch of chosen and rejected rewards (see the module docstring)."""
    if loss == "bt":
        return -nn.functional.logsigmoid(chosen - rejected).mean()
    logits = torch.cat([chosen, rejected])
    labels = torch.cat([torch.ones_like(chosen), torch.zeros_like(rejected)])
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


@dataclass
class TrainedHeads:
    """The trained heads, each head's final epoch loss, and the training time in seconds."""

    heads: list[EmbeddingHead]
    final_losses: list[float]
    seconds: float


def train_heads(chosen: torch.Tensor, rejected: torch.Tensor, settings: HeadTraining) -> TrainedHeads:
    """Train ``settings.num_heads`` heads on the vectors of chosen and rejected responses (``[n, dim]`` each).

    Training runs on the CPU in one thread (the thread count is restored afterwards)."""
    if chosen.ndim != 2 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected must be [pairs, dim] matrices of the same shape, got {tuple(chosen.shape)} "
            f"and {tuple(rejected.shape)}"
        )
    if chosen.shape[0] == 0:
        raise ValueError("no training pairs: chosen and rejected are empty")
    chosen, rejected = chosen.float().cpu(), rejected.float().cpu()
    start = time.perf_counter()
    heads: list[EmbeddingHead] = []
    losses: list[float] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is several times faster than many
    try:
        for k in range(settings.num_heads):
            head, loss = _train_one(chosen, rejected, settings, settings.seed + k)
            heads.append(head)
            losses.append(loss)
    finally:
        torch.set_num_threads(threads)
    return TrainedHeads(heads, losses, time.perf_counter() - start)


def _train_one(
    chosen: torch.Tensor, rejected: torch.Tensor, settings: HeadTraining, seed: int
) -> tuple[EmbeddingHead, float]:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = EmbeddingHead(chosen.shape[1], settings.hidden_dims, settings.activation, settings.dropout)
        head.set_standardization(torch.cat([chosen, rejected]))
        optimizer = torch.optim.AdamW(
            head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        n = chosen.shape[0]
        epoch_loss = float("nan")
        head.train()
        for _ in range(settings.epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for begin in range(0, n, settings.batch_size):
                idx = order[begin : begin + settings.batch_size]
                loss = pair_loss(head(chosen[idx]), head(rejected[idx]), settings.loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            epoch_loss = total / n
    head.eval()
    return head, epoch_loss


def pair_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs whose chosen response scores higher (a tie counts one half)."""
    if chosen_scores.numel() == 0:
        return float("nan")
    wins = (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
    return float(wins.mean())
