"""The local transformers engine: one model in the training process, token-budget micro-batched."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from rh_trl.engines import deadline
from rh_trl.engines.batching import (
    BatchStats,
    Reason,
    deduplicate,
    plan_batches,
    run_fitting,
)

logger = logging.getLogger(__name__)

#: ``read(outputs, input_ids, attention_mask) -> Tensor[batch, ...]``: what to keep from a forward pass.
Reader = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def read_logits(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reader for sequence-classification heads: ``outputs.logits`` of shape ``[batch, num_labels]``."""
    return outputs.logits


class HFEngine:
    """Runs a transformers model over token sequences.

    Sequences are deduplicated (each distinct one is run once), sorted by length and cut into the micro-batches
    with the least padding whose padded size stays within ``max_tokens_per_batch`` (see
    :func:`~rh_trl.engines.batching.plan_batches`); each batch runs under ``torch.inference_mode`` on
    the model's device. A CUDA out-of-memory error splits the batch in two and retries. Before each forward pass
    the engine checks the thread's :func:`~rh_trl.engines.deadline.deadline` (the reward server sets one per batch).

    Every reward family asks this engine for forward passes through a ``read`` function that picks what it
    needs from the outputs (a score per sequence, log-probs of a span, …), so one engine serves them all.

    Args:
        model: a loaded ``PreTrainedModel`` (put in eval mode here).
        pad_token_id: id used to right-pad batches (masked out by the attention mask).
        max_tokens_per_batch: budget of padded tokens (batch size × longest sequence) per forward pass.
        max_batch_size: optional cap on sequences per forward pass.
        batch_overhead_tokens: what one extra forward pass costs, in padded tokens; the batch planner trades
            it against padding (lower: more, tighter batches; higher: fewer, fuller ones).
        progress: show a tqdm bar over micro-batches.
        sharded: the model is sharded over the processes with DeepSpeed ZeRO-3 (:mod:`rh_trl.engines.zero3`):
            prepared with the run's ZeRO-3 config at the first run, and its forward passes run in step on every
            process, which therefore all run the same number of micro-batches (a process with fewer runs one-token
            passes whose outputs it drops). It runs only inside a trainer's call (every process calls it) or on one
            process; an out-of-memory error is not retried in halves.
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        progress: bool = False,
        batch_overhead_tokens: int = 1024,
        sharded: bool = False,
    ) -> None:
        if pad_token_id is None:
            raise ValueError("HFEngine needs a pad_token_id to build batches")
        self.model = model.eval()
        self.module = self.model  # the model itself (self.model becomes DeepSpeed's engine once sharded)
        self.sharded = sharded
        self._prepared = False
        self.pad_token_id = int(pad_token_id)
        self.max_tokens_per_batch = max_tokens_per_batch
        self.max_batch_size = max_batch_size
        self.batch_overhead_tokens = batch_overhead_tokens
        self.progress = progress
        self.last_stats = BatchStats()
        params = inspect.signature(model.forward).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._forward_kwargs = {"use_cache": False} if accepts_any or "use_cache" in params else {}

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the model's input embeddings."""
        try:
            return self.module.get_input_embeddings().weight.device
        except (AttributeError, NotImplementedError):
            return next(self.module.parameters()).device

    @property
    def max_sequence_length(self) -> int | None:
        """The longest sequence the model's position embeddings cover (``config.max_position_embeddings``), when
        its config says."""
        config = getattr(self.module, "config", None)
        if config is None:  # a wrapper around a model (e.g. one that computes only some logits)
            config = getattr(getattr(self.module, "model", None), "config", None)
        value = getattr(config, "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def run(self, sequences: Sequence[Sequence[int]], read: Reader = read_logits) -> list[torch.Tensor]:
        """Forward every sequence and return, in order, the row ``read`` keeps for it (float32, on CPU)."""
        start = time.perf_counter()
        for i, seq in enumerate(sequences):
            if len(seq) == 0:
                raise ValueError(f"sequence {i} has no tokens; every sequence needs at least one token")
        unique, inverse = deduplicate([tuple(s) for s in sequences])
        lengths = [len(sequences[i]) for i in unique]
        batches = plan_batches(
            lengths, self.max_tokens_per_batch, self.max_batch_size, self.batch_overhead_tokens
        )
        rows: list[torch.Tensor | None] = [None] * len(unique)
        stats = BatchStats(sequences=len(sequences), unique_sequences=len(unique))
        in_step = self._in_step_passes(len(batches)) if self.sharded else len(batches)
        with torch.inference_mode():
            for batch in tqdm(batches, desc="scoring", unit="batch", disable=not self.progress):
                deadline.check()
                seqs = [sequences[unique[j]] for j in batch]
                for j, row in zip(batch, self._forward(seqs, read, stats), strict=True):
                    rows[j] = row
            for _ in range(in_step - len(batches)):  # the other processes' extra passes need this one too
                self._forward([[self.pad_token_id]], read, BatchStats())
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return [rows[k] for k in inverse]  # type: ignore[misc]

    def _in_step_passes(self, own: int) -> int:
        """The number of forward passes every process runs for this call of a sharded model (the most any
        process needs); prepares the model at the first call."""
        import torch.distributed as dist

        from rh_trl.engines.ranks import current_call
        from rh_trl.engines.zero3 import prepare_sharded

        call = current_call()
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if several and call is None:
            raise RuntimeError(
                "this reward model is sharded over the processes (zero3=True), so its forward passes need every "
                "process: it scores inside a trainer's calls, which every process makes together, not in a call on "
                "one process (reward.score(...)); load it with zero3=False for that"
            )
        if not self._prepared:
            self.model = prepare_sharded(self.module)
            self._prepared = True
        if call is None:
            return own
        return max(call.gather(call.phase("forwards"), own))

    def run_checked(
        self, sequences: Sequence[Sequence[int]], read: Reader = read_logits
    ) -> tuple[list[torch.Tensor | None], list[Reason]]:
        """:meth:`run`, except that a sequence longer than :attr:`max_sequence_length` gets ``None`` and the
        reason ``"too_long"`` instead of running (and failing, or reading positions the model never learned)."""
        return run_fitting(
            "transformers engine",
            sequences,
            self.max_sequence_length,
            lambda fits: self.run(fits, read),
            run_empty=self.sharded,
        )

    def _forward(self, seqs: list[Sequence[int]], read: Reader, stats: BatchStats) -> list[torch.Tensor]:
        longest = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            attention_mask[i, : len(s)] = 1
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        try:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._forward_kwargs)
            kept = read(outputs, input_ids, attention_mask).float().cpu()
        except torch.OutOfMemoryError:
            if len(seqs) == 1 or self.sharded:  # a sharded model's passes are counted: no extra ones
                raise
            del input_ids, attention_mask
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(seqs) // 2
            logger.warning("out of memory on a batch of %d sequences; splitting it in two", len(seqs))
            return self._forward(seqs[:half], read, stats) + self._forward(seqs[half:], read, stats)
        stats.batches += 1
        stats.real_tokens += sum(len(s) for s in seqs)
        stats.padded_tokens += len(seqs) * longest
        return list(kept.unbind(0))
