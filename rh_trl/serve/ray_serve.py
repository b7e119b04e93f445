"""The reward server as a Ray Serve application (``rh-trl serve --ray --config …``; needs ``rh_trl[ray]``).

One deployment per configured reward (its ``ray:`` block: replicas or autoscaling bounds, actor options), each
replica loading the reward once and batching with the same :class:`~rh_trl.serve.batcher.DynamicBatcher` as
the single-process server; an ingress deployment running the same FastAPI app
(:func:`~rh_trl.serve.app.create_app`) with a :class:`RayBackend`, so routes, schemas, keys, limits and errors
are those of ``rh-trl serve``; and a small deployment that adds up the replicas' metrics for ``/metrics``.
Ray restarts a replica whose actor dies; a request it was scoring gets 503 with ``Retry-After``, which
:class:`~rh_trl.RemoteRM` retries.

    rh-trl serve --ray --config configs/serve/ray.yaml
    serve run rh_trl.serve.ray_serve:app_builder config=configs/serve/ray.yaml
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from rh_trl.rewards.base import RewardOutput
from rh_trl.serve.config import ServerConfig, load_config
from rh_trl.serve.errors import RequestError
from rh_trl.serve.metrics import merge

logger = logging.getLogger("rh_trl")

#: a replica silent for this many metrics intervals counts as gone (its counters stay, its queue does not)
SILENT_INTERVALS = 5


def import_serve() -> Any:
    """``ray.serve``, or an ImportError naming the extra that brings it."""
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(
            f"the reward server on Ray needs Ray Serve ({err}); pip install 'rh_trl[ray]'"
        ) from err
    return serve


def deployment_names(config: ServerConfig) -> dict[str, str]:
    """Reward name → its Serve deployment's name (Serve's names take fewer characters than reward names)."""
    return {
        spec.name: f"reward{i}_{re.sub(r'[^A-Za-z0-9_-]', '_', spec.name)}"
        for i, spec in enumerate(config.rewards)
    }


class RemoteScoringError(Exception):
    """Scoring failed in a replica: the error's type name and message, as the single-process server shows them."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


# -- the deployments (plain classes; :func:`build_application` makes them Serve deployments) ---------------------


class RewardReplica:
    """One replica of one reward: builds it once, batches what the ingress sends, reports its metrics."""

    async def __init__(self, config_data: dict[str, Any], name: str, store: Any) -> None:
        from rh_trl.serve.backend import LocalBackend

        config = ServerConfig.model_validate(config_data)
        spec = next(s for s in config.rewards if s.name == name)
        self.name = name
        self.backend = LocalBackend(config.model_copy(update={"rewards": [spec], "get_reward_default": None}))
        await self.backend.start()
        self.store = store
        self.interval = config.ray.metrics_interval_s
        self.replica = import_serve().get_replica_context().replica_id.unique_id
        self.reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            try:
                await self.store.report.remote(
                    self.name, self.replica, self.backend.batchers[self.name].metrics.state()
                )
            except Exception as err:  # the store restarting: the next report fills it again
                logger.debug("%s: metrics report failed: %r", self.name, err)
            await asyncio.sleep(self.interval)

    async def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput | tuple[str, Any]:
        """The reward of each sample, or ``("refused", (status, message, retry_after))`` /
        ``("failed", (type name, message))`` for the ingress to answer as the single-process server would."""
        try:
            return await self.backend.score(self.name, prompts, completions, columns)
        except RequestError as err:
            return "refused", (err.status, err.message, err.retry_after)
        except Exception as err:
            return "failed", (type(err).__name__, str(err))

    async def describe(self) -> dict[str, Any]:
        return self.backend.describe(self.name)

    async def __del__(self) -> None:
        self.reporter.cancel()
        await self.backend.stop()


class MetricsStore:
    """The latest metrics state of every reward replica, added up per reward on request."""

    def __init__(self, interval_s: float) -> None:
        self.max_age = SILENT_INTERVALS * interval_s
        self.states: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    async def report(self, reward: str, replica: str, state: dict[str, Any]) -> None:
        self.states[(reward, replica)] = (time.monotonic(), state)

    async def collect(self, rewards: list[str]) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        out = {}
        for name in rewards:
            found = [(seen, state) for (reward, _), (seen, state) in self.states.items() if reward == name]
            out[name] = merge(
                [state for _, state in found], [now - seen <= self.max_age for seen, _ in found]
            )
        return out


class RayBackend:
    """The :class:`~rh_trl.serve.backend.ScoringBackend` of the ingress: each reward's deployment scores, the
    metrics store adds up the replicas."""

    def __init__(self, config: ServerConfig) -> None:
        self.app_name = config.ray.app_name
        self.names = deployment_names(config)
        self.handles: dict[str, Any] = {}
        self.described: dict[str, dict[str, Any]] = {}
        self.store: Any = None

    async def start(self) -> None:
        serve = import_serve()
        self.handles = {name: serve.get_deployment_handle(d, self.app_name) for name, d in self.names.items()}
        self.store = serve.get_deployment_handle("metrics", self.app_name)
        described = await asyncio.gather(*(handle.describe.remote() for handle in self.handles.values()))
        self.described = dict(zip(self.handles, described, strict=True))

    async def stop(self) -> None:
        return None

    async def score(
        self, name: str, prompts: Sequence[Any], completions: Sequence[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            result = await self.handles[name].score.remote(list(prompts), list(completions), columns)
        except BackPressureError as err:
            raise RequestError(429, f"reward '{name}' is busy: {err}", retry_after=1) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError) as err:
            logger.warning(
                "%s: a replica stopped while scoring %d samples: %s", name, len(prompts), type(err).__name__
            )
            raise RequestError(
                503, f"a replica of reward '{name}' stopped while scoring this request; retry", retry_after=1
            ) from None
        if isinstance(result, RewardOutput):
            return result
        kind, details = result
        if kind == "refused":
            status, message, retry_after = details
            raise RequestError(status, message, retry_after=retry_after)
        raise RemoteScoringError(*details)

    def describe(self, name: str) -> dict[str, Any]:
        return self.described[name]

    async def metrics(self) -> dict[str, dict[str, Any]]:
        return await self.store.collect.remote(list(self.handles))


def ingress_app(config_data: dict[str, Any]) -> Callable[[], Any]:
    """The builder Serve's ingress calls in each ingress replica: the FastAPI app over a :class:`RayBackend`."""

    def build() -> Any:
        from rh_trl.serve.app import create_app

        config = ServerConfig.model_validate(config_data)
        return create_app(config, backend=RayBackend(config))

    return build


def build_application(config: ServerConfig, replica: type = RewardReplica) -> Any:
    """The Serve application for ``config``: the ingress, one deployment per reward (of class ``replica``,
    whose ``__init__``, ``score`` and ``describe`` are :class:`RewardReplica`'s), the metrics store. The API key
    is resolved here (from the config or its environment variable) and handed to the ingress."""
    serve = import_serve()
    data = config.model_copy(update={"api_key": config.resolved_api_key()}).model_dump(mode="json")
    store = serve.deployment(
        MetricsStore,
        name="metrics",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        logging_config={"enable_access_log": False},  # a report per replica per second
    )
    store_app = store.bind(config.ray.metrics_interval_s)
    rewards = []
    for spec in config.rewards:
        deployment = serve.deployment(
            replica,
            name=deployment_names(config)[spec.name],
            graceful_shutdown_timeout_s=config.graceful_shutdown_s,
            logging_config={"enable_access_log": False},  # the ingress logs each request
            **spec.ray.deployment_options(),
        )
        rewards.append(deployment.bind(data, spec.name, store_app))

    class Ingress:
        def __init__(
            self, *deployments: Any
        ) -> None:  # the reward deployments, bound so that Serve runs them
            self.deployments = deployments

    ingress = serve.deployment(
        serve.ingress(ingress_app(data))(Ingress),
        name="ingress",
        graceful_shutdown_timeout_s=config.graceful_shutdown_s,
        **config.ray.ingress.deployment_options(),
    )
    return ingress.bind(*rewards, store_app)


def app_builder(args: dict[str, str]) -> Any:
    """``serve run rh_trl.serve.ray_serve:app_builder config=<path>``."""
    if "config" not in args:
        raise ValueError("pass the server config: serve run rh_trl.serve.ray_serve:app_builder config=<path>")
    return build_application(load_config(args["config"]))


def serve_on_ray(config: ServerConfig, *, blocking: bool = True, replica: type = RewardReplica) -> str:
    """Start (or join) Ray, deploy the application (:func:`build_application`) on Serve's proxy at the
    config's host and port, and, when ``blocking``, serve until interrupted (SIGINT or SIGTERM), then delete
    the application. Returns the base URL."""
    serve = import_serve()
    import ray

    config.check_exposure()
    started = not ray.is_initialized()
    if started:
        ray.init(address=config.ray.address, logging_level=logging.WARNING)
    serve.start(
        http_options={"host": config.host, "port": config.port, "keep_alive_timeout_s": config.keep_alive_s}
    )
    serve_logger = logging.getLogger("ray.serve")
    level = serve_logger.level
    serve_logger.setLevel(logging.ERROR)  # serve.run warns that its own default HTTP options are not applied
    try:
        serve.run(build_application(config, replica), name=config.ray.app_name, route_prefix="/")
    finally:
        serve_logger.setLevel(level)
    url = f"http://{config.host}:{config.port}"
    logger.info("serving %s on Ray Serve at %s", [s.name for s in config.rewards], url)
    if blocking:

        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                time.sleep(3600)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt is enough: clean up undisturbed
            logger.info("deleting the application %s", config.ray.app_name)
            serve.delete(config.ray.app_name)
            if started:
                serve.shutdown()
                ray.shutdown()
    return url


__all__ = ["MetricsStore", "RayBackend", "RewardReplica", "app_builder", "build_application", "serve_on_ray"]
