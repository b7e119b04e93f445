"""A verl reward manager that scores the prompt the policy saw and merges verl's per-sample calls into batches.

verl's reward loop (``RewardLoopWorker``, one per reward worker process) calls a manager's ``run_single`` once
per sample, many at a time on the worker's event loop. :class:`RhTrlRewardManager` turns each call into a
conversation, ``raw_prompt`` (the chat messages verl's dataset gave the policy) plus the decoded response as an
assistant turn, and queues it; calls that arrive together are scored as one batch by any rh_trl reward (a
``RemoteRM`` on an ``rh-trl serve`` server, whose batcher merges the workers' batches further, or a reward built
in the worker process). verl's config loads it by name (see :mod:`rh_trl.integrations.verl`); its settings are
``reward.reward_kwargs`` (:class:`VerlRewardSettings`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from rh_trl.integrations.verl_columns import sample_columns
from rh_trl.rewards import factory
from rh_trl.rewards.base import Reward
from rh_trl.serve.batcher import DynamicBatcher

logger = logging.getLogger("rh_trl")


class VerlRewardSettings(BaseModel):
    """``reward.reward_kwargs`` of a verl config that uses :class:`RhTrlRewardManager`.

    ``reward``: a spec for :func:`rh_trl.rewards.factory.build_reward` (``{type: remote, urls, model}`` for a
    server, or a reward built in each reward worker). ``failure_score``: required, since verl cannot hold a
    missing reward; a sample with none gets it, counted in ``reward_extra_info["rh_trl/failed"]`` and logged.
    ``max_batch_items``, ``max_wait_ms``: the largest batch, and how long its first call waits for company.
    """

    model_config = ConfigDict(extra="forbid")

    reward: dict[str, Any]
    failure_score: float
    max_batch_items: int = Field(default=256, ge=1)
    max_wait_ms: float = Field(default=10.0, ge=0)

    @classmethod
    def from_config(cls, config: Any) -> VerlRewardSettings:
        """Read and validate ``config.reward.reward_kwargs`` (an OmegaConf config or a mapping)."""
        kwargs = (config.get("reward") or {}).get("reward_kwargs")
        if kwargs is None:
            raise ValueError(
                "RhTrlRewardManager needs reward.reward_kwargs in verl's config, e.g. "
                "{reward: {type: remote, urls: 'http://127.0.0.1:8000', model: tiny}, failure_score: 0.0}"
            )
        if OmegaConf.is_config(kwargs):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        try:
            return cls.model_validate(dict(kwargs))
        except ValidationError as err:
            raise ValueError(
                f"reward.reward_kwargs of verl's config is not valid for RhTrlRewardManager: {err}. Expected "
                "reward: <an rh_trl reward spec>, failure_score: <the score of a sample with no reward>, and "
                "optionally max_batch_items, max_wait_ms"
            ) from None


class RhTrlRewardManager(RewardManagerBase):
    """verl 0.9 reward manager scoring ``raw_prompt`` + the decoded response with an rh_trl reward (see the
    module docstring). ``reward`` overrides the reward built from the config (for tests and custom code)."""

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        compute_score: Any = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: Any = None,
        *,
        reward: Reward | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, tokenizer, compute_score)
        self.settings = VerlRewardSettings.from_config(config)
        self.reward = reward if reward is not None else factory.build_reward(self.settings.reward)
        self.num_samples = 0
        self.num_failed = 0
        self.batcher: DynamicBatcher | None = None  # the queue of the event loop verl runs the calls on
        self._batcher_loop: asyncio.AbstractEventLoop | None = None

    def _queue(self) -> DynamicBatcher:
        loop = asyncio.get_running_loop()  # verl runs one per reward worker; tests may run several in turn
        if self.batcher is None or self._batcher_loop is not loop:
            self.batcher = DynamicBatcher(
                self.reward, max_items=self.settings.max_batch_items, max_wait_ms=self.settings.max_wait_ms
            )
            self.batcher.start()
            self._batcher_loop = loop
        return self.batcher

    async def run_single(self, data: Any) -> dict[str, Any]:
        """Score one sample of verl's batch (the last sequence, as verl's own managers do)."""
        item = data[-1:][0]
        non_tensor = item.non_tensor_batch
        if "raw_prompt" not in non_tensor:
            raise ValueError(
                "RhTrlRewardManager scores the chat messages the policy saw (verl's 'raw_prompt'), but this "
                f"batch has none; it has {sorted(non_tensor)}. verl's RLHFDataset adds raw_prompt from the "
                "dataset's prompt column (data.prompt_key)"
            )
        prompt = [dict(message) for message in non_tensor["raw_prompt"]]
        response_ids = item.batch["responses"]
        valid_length = int(item.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        response = self.tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
        ground_truth = (non_tensor.get("reward_model") or {}).get("ground_truth")
        columns = sample_columns(non_tensor.get("data_source"), ground_truth)
        try:
            output = await self._queue().submit(
                [prompt], [[{"role": "assistant", "content": response}]], columns
            )
            (value,) = output.rewards
        except Exception as err:
            logger.error("%s: scoring failed for a verl sample: %r", self.reward.__name__, err)
            value = None
        self.num_samples += 1
        failed = value is None or not math.isfinite(value)
        if failed:
            self.num_failed += 1
            logger.warning(
                "%s: no reward for a verl sample; using failure_score=%s (%d of %d samples so far)",
                self.reward.__name__,
                self.settings.failure_score,
                self.num_failed,
                self.num_samples,
            )
            value = self.settings.failure_score
        return {"reward_score": float(value), "reward_extra_info": {"rh_trl/failed": float(failed)}}
