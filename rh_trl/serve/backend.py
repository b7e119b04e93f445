"""What the reward server's routes score with: a small interface, and the local implementation.

The FastAPI app (:func:`rh_trl.serve.app.create_app`) owns everything about HTTP — routes, schemas, keys,
limits, errors, idempotency and disconnects — and hands validated samples to a :class:`ScoringBackend`. This
process's :class:`LocalBackend` scores with one :class:`~rh_trl.serve.batcher.DynamicBatcher` per reward; a
deployment elsewhere (e.g. Ray Serve replicas) implements the same few methods and reuses the app unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from rh_trl.rewards.base import Reward, RewardOutput
from rh_trl.serve.batcher import DynamicBatcher
from rh_trl.serve.config import ServerConfig, build_reward

logger = logging.getLogger("rh_trl")


class ScoringBackend(Protocol):
    """Scores validated samples for the hosted rewards named in the server config."""

    async def start(self) -> None:
        """Called once when the app starts (inside its event loop)."""

    async def stop(self) -> None:
        """Called once when the app stops; must not wait for a forward pass to finish."""

    async def score(
        self, name: str, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput:
        """One value per sample of reward ``name``. Raises
        :class:`~rh_trl.serve.errors.RequestError` (429/503 with ``retry_after``) when it cannot take the work
        now; cancelling the call drops work that has not started."""
        ...

    def describe(self, name: str) -> dict[str, Any]:
        """Facts about reward ``name`` for ``GET /v1/models`` (its metric name, limits)."""
        ...

    async def metrics(self) -> dict[str, dict[str, Any]]:
        """Per reward, the state of its batchers added up (:func:`rh_trl.serve.metrics.merge`), for
        ``GET /metrics``."""
        ...


class LocalBackend:
    """Scores in this process: builds each configured reward (or takes it from ``rewards``) and batches it."""

    def __init__(self, config: ServerConfig, rewards: dict[str, Reward] | None = None) -> None:
        specs = {s.name: s for s in config.rewards}
        rewards = dict(rewards or {})
        unknown = sorted(set(rewards) - set(specs))
        if unknown:
            raise ValueError(f"rewards {unknown} are not listed in the config's rewards")
        for name, spec in specs.items():
            if name not in rewards:
                logger.info("loading reward '%s' (%s)", name, spec.type)
                rewards[name] = build_reward(spec)
        self.batchers = {
            name: DynamicBatcher(
                rewards[name],
                max_items=spec.max_batch_items,
                max_chars=spec.max_batch_chars,
                max_wait_ms=spec.max_wait_ms,
                enabled=spec.batching,
                max_queue_samples=spec.max_queue_samples,
                max_queue_wait_s=spec.max_queue_wait_s,
                max_sample_tokens=spec.max_sample_tokens,
                compute_timeout_s=spec.compute_timeout_s,
            )
            for name, spec in specs.items()
        }
        for name, batcher in self.batchers.items():
            logger.info(
                "reward '%s': samples over %d tokens (%s) get no reward; at most %d samples wait",
                name,
                batcher.cap.max_tokens,
                batcher.cap.source,
                batcher.max_queue_samples,
            )

    async def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()

    async def score(
        self, name: str, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput:
        return await self.batchers[name].submit(prompts, completions, columns)

    def describe(self, name: str) -> dict[str, Any]:
        batcher = self.batchers[name]
        return {
            "reward_name": batcher.reward.__name__,
            "max_sample_tokens": batcher.cap.max_tokens,
            "max_queue_samples": batcher.max_queue_samples,
            "max_queue_wait_s": batcher.max_queue_wait_s,
        }

    async def metrics(self) -> dict[str, dict[str, Any]]:
        return {name: b.metrics.state() for name, b in self.batchers.items()}
