"""verl glue: a reward manager that scores the policy's real prompt, and custom reward functions.

**The reward manager** (recommended), :class:`RhTrlRewardManager` (in
:mod:`rh_trl.integrations.verl_reward_manager`, loaded on first use because it subclasses verl's own base): verl
hands it ``raw_prompt``, the chat messages the policy saw, and it merges verl's concurrent per-sample calls into
batches. In verl's config::

    reward:
      reward_manager:
        source: importlib
        name: RhTrlRewardManager
        module: {path: pkg://rh_trl.integrations.verl}
      reward_kwargs:
        reward: {type: remote, urls: "http://127.0.0.1:8000", model: tiny}
        failure_score: 0.0

**Custom reward functions**: verl calls ``compute_score(data_source, solution_str, ground_truth,
extra_info=None, **kwargs)`` once per response, with the response only (special tokens stripped) and no prompt;
``compute_score_async`` is the ``async def`` form. Both send the sample to the server's ``POST /v1/rewards``,
where concurrent calls are batched into full forward passes. The prompt must be in ``extra_info`` under
``prompt`` (or the key ``prompt_key`` names): these functions never guess it from other keys. In verl's
config::

    custom_reward_function:
      path: pkg://rh_trl.integrations.verl
      name: compute_score_async          # or compute_score
      reward_kwargs:                     # merged into every call; or use the environment variables below
        url: http://127.0.0.1:8000
        model: helpful

Settings, from keyword arguments (``reward_kwargs`` or ``functools.partial``) or else the environment:

=================  =========================  =======================================================
keyword            environment variable       meaning
=================  =========================  =======================================================
``url``            ``RH_TRL_REWARD_URL``      server base URL; several separated by commas
``model``          ``RH_TRL_REWARD_MODEL``    the reward's name on the server
``api_key``        ``RH_TRL_API_KEY``         bearer key
``prompt_key``     ``RH_TRL_PROMPT_KEY``      the ``extra_info`` key holding the prompt (default ``prompt``)
``failure_score``  ``RH_TRL_FAILURE_SCORE``   score for a sample the server could not score; unset: raise
=================  =========================  =======================================================

verl has no "no reward" value, so a sample the server could not score (after retries) raises unless
``failure_score`` is set; either way it is logged. ``data_source`` and ``ground_truth`` travel to the server as
columns, which rewards that use them can read.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.integrations.verl_columns import sample_columns
from rh_trl.rewards.remote import RemoteRM

logger = logging.getLogger("rh_trl")

DEFAULT_PROMPT_KEY = "prompt"

_clients: dict[tuple[Any, ...], RemoteRM] = {}
_clients_lock = threading.Lock()


def _setting(value: Any, env: str) -> Any:
    return value if value is not None else (os.environ.get(env) or None)


def _client(url: str | None, model: str | None, api_key: str | None, retry: RetryPolicy | None) -> RemoteRM:
    url = _setting(url, "RH_TRL_REWARD_URL")
    if not url:
        raise ValueError(
            "no reward server URL: pass url=… (verl: custom_reward_function.reward_kwargs.url) "
            "or set RH_TRL_REWARD_URL=http://host:port"
        )
    urls = tuple(u.strip() for u in url.split(",") if u.strip()) if isinstance(url, str) else tuple(url)
    model = _setting(model, "RH_TRL_REWARD_MODEL")
    api_key = _setting(api_key, "RH_TRL_API_KEY")
    key = (urls, model, api_key, retry)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = RemoteRM(
                list(urls),
                model,
                api_key=api_key,
                name=f"verl_{model or 'rm'}",
                columns=("data_source", "ground_truth"),
                retry=retry,
                chunk_size=1,
            )
        return _clients[key]


def _prompt(extra_info: Any, prompt_key: str | None) -> Any:
    key = _setting(prompt_key, "RH_TRL_PROMPT_KEY") or DEFAULT_PROMPT_KEY
    info = extra_info if isinstance(extra_info, dict) else {}
    value = info.get(key)
    if value is None:
        raise ValueError(
            f"the reward model needs the prompt the policy saw, but extra_info has no '{key}' (it has "
            f"{sorted(info)}); put the prompt messages in extra_info['{DEFAULT_PROMPT_KEY}'] when preparing the "
            "data, name the key that holds them with prompt_key=… (or RH_TRL_PROMPT_KEY), or use "
            "RhTrlRewardManager, which reads verl's raw_prompt"
        )
    return list(value) if not isinstance(value, str) else value


def _result(value: float | None, rm: RemoteRM, failure_score: float | str | None) -> float:
    if value is not None:
        return value
    failure_score = _setting(failure_score, "RH_TRL_FAILURE_SCORE")
    stats = rm.last_stats
    reason = ", ".join(f"{k}={int(v)}" for k, v in stats.items() if k.startswith("num_") and v) or "unknown"
    if failure_score is None:
        raise RuntimeError(
            f"the reward server gave no reward for this sample ({reason}); set failure_score=… "
            "(or RH_TRL_FAILURE_SCORE) to use a fixed score instead"
        )
    logger.warning("reward server gave no reward (%s); using failure_score=%s", reason, failure_score)
    return float(failure_score)


async def compute_score_async(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    *,
    url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    prompt_key: str | None = None,
    failure_score: float | None = None,
    retry: RetryPolicy | None = None,
    **kwargs: Any,
) -> float:
    """verl's custom reward function (async form): the server's reward for ``solution_str``."""
    rm = _client(url, model, api_key, retry)
    prompt = _prompt(extra_info, prompt_key)
    columns = sample_columns(data_source, ground_truth)
    (value,) = await rm([prompt], [solution_str], **columns)
    return _result(value, rm, failure_score)


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """verl's custom reward function (sync form); same settings as :func:`compute_score_async`."""
    return run_sync(compute_score_async(data_source, solution_str, ground_truth, extra_info, **kwargs))


def __getattr__(name: str) -> Any:
    # the manager subclasses verl's RewardManagerBase, so it is imported only when verl's config asks for it
    if name in ("RhTrlRewardManager", "VerlRewardSettings"):
        try:
            from rh_trl.integrations import verl_reward_manager
        except ImportError as err:
            raise ImportError(
                f"rh_trl.integrations.verl.{name} needs verl (0.9 or later) installed: {err}"
            ) from err
        return getattr(verl_reward_manager, name)
    raise AttributeError(f"module 'rh_trl.integrations.verl' has no attribute {name!r}")
