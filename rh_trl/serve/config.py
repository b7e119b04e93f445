"""The reward server's configuration (YAML, validated with pydantic) and how each configured reward is built."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rh_trl.rewards import factory
from rh_trl.rewards.base import Reward

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RayDeploymentOptions(BaseModel):
    """How a deployment runs on Ray Serve (``rh-trl serve --ray``; the single-process server ignores it):
    ``num_replicas`` or ``autoscaling_config`` (Serve's: ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, …), ``ray_actor_options`` per replica (``num_cpus``, ``num_gpus``, ``memory``,
    ``resources``, …) and ``max_ongoing_requests``, the requests one replica holds at once (its batcher queues
    them; the default, 1024, lets the batcher see every request and refuse overload with 429 itself)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    max_ongoing_requests: int = Field(default=1024, ge=1)

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> RayDeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(
                "give num_replicas (a fixed count) or autoscaling_config (min_replicas/max_replicas), not both"
            )
        return self

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of Serve's ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


class RayServeOptions(BaseModel):
    """The Ray Serve application (``rh-trl serve --ray``): the cluster to join (``address``: ``auto`` for a
    running one; none starts a local Ray), the application's name, its HTTP ingress deployment (the FastAPI app;
    one replica, a quarter CPU by default) and how often each reward replica reports its metrics."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    app_name: str = Field(default="rh_trl", pattern=r"^[A-Za-z0-9_-]+$")
    ingress: RayDeploymentOptions = Field(
        default_factory=lambda: RayDeploymentOptions(ray_actor_options={"num_cpus": 0.25})
    )
    metrics_interval_s: float = Field(default=1.0, gt=0)


class RewardSpec(BaseModel):
    """One hosted reward.

    ``type``: ``"orm"`` builds ``rh_trl.ORM(model, tokenizer, **options)``; ``"auto"`` builds whatever class
    ``rh_trl.load(model, **options)`` picks for the model (PRM, PairwisePM, CLoud, …); ``"tiny"`` builds an ORM on a tiny
    random model with an offline tokenizer (``options``: ``style`` "llama"/"chatml", ``seed``, ``layers``,
    ``hidden``, plus ORM options) for demos; ``"python"`` calls ``target`` (``"package.module:factory"``)
    with ``options`` and expects an :class:`~rh_trl.Reward`.

    Batching: requests queued for this reward are concatenated into one scoring call of at most
    ``max_batch_items`` samples and ``max_batch_chars`` characters (a cheap proxy for tokens; the engine then
    cuts its own token-budget micro-batches), waiting at most ``max_wait_ms`` for more requests to arrive.
    ``batching: false`` scores each request on its own.

    ``ray``: replicas and resources of this reward on Ray Serve (:class:`RayDeploymentOptions`).

    Limits: a sample with more than ``max_sample_tokens`` tokens (default: the model's context length) gets
    ``None``, counted as ``too_long``; at most ``max_queue_samples`` samples (default: 4 batches) and
    ``max_queue_wait_s`` seconds of work (at the recent throughput) wait at once, beyond that requests get 429
    with ``Retry-After``; a scoring call running past ``compute_timeout_s`` stops at its next forward pass and
    its requests get 503.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.:/-]+$")
    type: Literal["orm", "auto", "tiny", "python"] = "orm"
    model: str | None = None
    tokenizer: str | None = None
    target: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    batching: bool = True
    max_batch_items: int = Field(default=256, ge=1)
    max_batch_chars: int = Field(default=1_000_000, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    strip_suffixes: list[str] = Field(
        default_factory=list,
        description="strings cut from the end of a /get_reward response (e.g. the policy's EOS text)",
    )
    max_sample_tokens: int | None = Field(default=None, ge=1)
    max_queue_samples: int | None = Field(default=None, ge=1)
    max_queue_wait_s: float = Field(default=5.0, gt=0)
    compute_timeout_s: float = Field(default=120.0, gt=0)
    failure_score: float | None = Field(
        default=None,
        description="the score /get_reward answers for a sample this reward could not score (OpenRLHF cannot "
        "hold a missing reward); a reward without one is not served on /get_reward",
    )
    ray: RayDeploymentOptions = Field(default_factory=RayDeploymentOptions)

    @model_validator(mode="after")
    def _check_type_fields(self) -> RewardSpec:
        if self.type in ("orm", "auto") and not self.model:
            raise ValueError(f"reward '{self.name}': type '{self.type}' needs model: <path or hub id>")
        if self.type == "python" and (not self.target or ":" not in self.target):
            raise ValueError(f"reward '{self.name}': type 'python' needs target: 'package.module:factory'")
        return self


class ServerConfig(BaseModel):
    """The server: where it listens, who may call it, request limits, and the rewards it hosts.

    Connections: at most ``max_connections`` at once (more get 503), ``header_timeout_s`` to send a request's
    line and headers and ``body_timeout_s`` to send its body (slower clients are cut off; 408 for the body),
    ``keep_alive_s`` idle between requests. Bodies: at most ``max_request_bytes``, ``max_items_per_request``
    samples and ``max_json_depth`` levels of nesting. A retry that carries the same ``Idempotency-Key`` (and
    body) as a request in flight, or one answered in the last ``idempotency_ttl_s`` seconds, gets that answer
    instead of being scored again. On shutdown, requests in flight have ``graceful_shutdown_s`` to finish.
    ``ray``: the application on Ray Serve (:class:`RayServeOptions`; ``rh-trl serve --ray``).
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: str | None = None
    api_key_env: str = "RH_TRL_API_KEY"
    max_request_bytes: int = Field(default=16 * 2**20, ge=1)
    max_items_per_request: int = Field(default=4096, ge=1)
    graceful_shutdown_s: float = Field(default=30.0, ge=0)
    max_connections: int = Field(default=512, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=60.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    max_json_depth: int = Field(default=32, ge=2)
    idempotency_ttl_s: float = Field(default=120.0, ge=0)
    rewards: list[RewardSpec] = Field(min_length=1)
    get_reward_default: str | None = Field(
        default=None,
        description="the reward a /get_reward request without ?model= gets (required when several are hosted)",
    )
    get_reward_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="how long a /get_reward request waits for room when the reward's queue is full (OpenRLHF gives "
        "up after five 1 s retries of a 429 and has no reward for the sample); past it, failure_score, counted",
    )
    ray: RayServeOptions = Field(default_factory=RayServeOptions)

    @field_validator("rewards")
    @classmethod
    def _unique_names(cls, rewards: list[RewardSpec]) -> list[RewardSpec]:
        names = [r.name for r in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique; repeated: {duplicates}")
        return rewards

    @model_validator(mode="after")
    def _check_get_reward(self) -> ServerConfig:
        served = [r.name for r in self.rewards if r.failure_score is not None]
        default = self.get_reward_default
        if default is not None:
            if default not in {r.name for r in self.rewards}:
                raise ValueError(
                    f"get_reward_default '{default}' is not a hosted reward; hosted: {[r.name for r in self.rewards]}"
                )
            if default not in served:
                raise ValueError(
                    f"get_reward_default '{default}' has no failure_score: OpenRLHF cannot take a missing reward, "
                    "so a reward served on /get_reward needs failure_score: <number> (the score a sample it "
                    "cannot score gets, counted in extra_logs)"
                )
        elif served and len(self.rewards) > 1:
            raise ValueError(
                f"this server hosts {len(self.rewards)} rewards and serves {served} on /get_reward but names no "
                "default: a /get_reward request without ?model= (OpenRLHF's --reward.remote_url as usually "
                "written) would be refused, and OpenRLHF turns a refused request into a missing reward for "
                "every sample. Set get_reward_default: <one of " + str(served) + ">"
            )
        return self

    def resolved_api_key(self) -> str | None:
        """``api_key`` from the file, else from the environment variable ``api_key_env``."""
        return self.api_key or os.environ.get(self.api_key_env) or None

    def check_exposure(self) -> None:
        """Refuse to listen beyond this machine without an API key."""
        if self.host not in LOOPBACK_HOSTS and not self.resolved_api_key():
            raise ValueError(
                f"refusing to listen on {self.host}: an API key is required when binding anything but loopback "
                f"(127.0.0.1). Export {self.api_key_env}=<key> (or set api_key in the config)"
            )


def load_config(path: str | os.PathLike[str], **overrides: Any) -> ServerConfig:
    """Read and validate a YAML server config; ``overrides`` (e.g. ``host``, ``port``) replace file values."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"server config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"{path} is not a valid server config:\n{err}") from None


def build_reward(spec: RewardSpec) -> Reward:
    """Instantiate the reward that ``spec`` describes (named after the spec)."""
    options = dict(spec.options)
    options.setdefault("name", spec.name)
    if spec.type in ("orm", "auto"):
        if spec.tokenizer:
            options["tokenizer"] = spec.tokenizer
        reward: Any = factory.build_reward({"type": spec.type, "model": spec.model, **options})
    elif spec.type == "tiny":
        from rh_trl.models.offline import bpe_tokenizer, tiny_reward_model
        from rh_trl.rewards.orm import ORM

        style = options.pop("style", "llama")
        model_kwargs = {k: options.pop(k) for k in ("seed", "layers", "hidden", "heads") if k in options}
        tok = bpe_tokenizer(style)
        reward = ORM(tiny_reward_model(tok, **model_kwargs), tok, **options)
    else:
        reward = factory.import_target(str(spec.target), f"reward '{spec.name}'")(**options)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward '{spec.name}' built a {type(reward).__name__}; expected an rh_trl Reward")
    return reward
