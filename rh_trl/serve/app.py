"""The rh_trl reward server: FastAPI routes over dynamically batched rewards.

Routes:
    POST /v1/rewards   {"model", "prompts", "completions", <columns>…} -> {"model", "rewards", "num_none", ["extra"]}
    POST /get_reward   OpenRLHF's remote reward protocol: {"query", "prompts", "labels"} ->
                       {"rewards", "scores", "extra_logs"}; only rewards with a failure_score, never null
    GET  /health       liveness (no key needed)
    GET  /v1/models    the hosted rewards and their batching settings
    GET  /metrics      requests, batch sizes, queue depth and latency per reward (JSON)

Every route but ``/health`` needs ``Authorization: Bearer <key>`` when the server has a key. Bodies are read
with a size limit and validated before anything is queued, so a bad request gets a 4xx with a message and never
reaches a batch that other requests share.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rh_trl.rewards.base import Reward
from rh_trl.serve.batcher import DynamicBatcher
from rh_trl.serve.config import RewardSpec, ServerConfig, build_reward

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
except ImportError as _err:
    raise ImportError(
        f"the rh_trl reward server needs fastapi and uvicorn ({_err}); pip install 'rh_trl[serve]'"
    ) from _err

logger = logging.getLogger("rh_trl")


# -- request schemas ------------------------------------------------------------------------------------------


class Message(BaseModel):
    """One chat message of TRL's conversational format."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]]


TRLText = str | list[Message]


class RewardRequest(BaseModel):
    """``POST /v1/rewards``: prompts and completions in either TRL format; other keys are dataset columns
    (one value per completion)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompts: list[TRLText]
    completions: list[TRLText]

    @model_validator(mode="after")
    def _check_lengths(self) -> RewardRequest:
        n = len(self.completions)
        if len(self.prompts) != n:
            raise ValueError(
                f"got {len(self.prompts)} prompts and {n} completions; expected one prompt per completion"
            )
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, list) or len(value) != n:
                raise ValueError(
                    f"column '{key}' must be a list with one value per completion ({n}), "
                    f"got {type(value).__name__}"
                    + (f" of length {len(value)}" if isinstance(value, list) else "")
                )
        return self

    def texts(self) -> tuple[list[Any], list[Any]]:
        def plain(x: TRLText) -> Any:
            return x if isinstance(x, str) else [m.model_dump() for m in x]

        return [plain(p) for p in self.prompts], [plain(c) for c in self.completions]


class OpenRLHFRequest(BaseModel):
    """``POST /get_reward``, as OpenRLHF's remote reward client sends it."""

    model_config = ConfigDict(extra="allow")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _check_lengths(self) -> OpenRLHFRequest:
        n = len(self.query)
        for key in ("prompts", "labels"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"got {len(value)} {key} for {n} queries; expected one per query")
        return self


class RequestError(Exception):
    """A request the server refuses: status code and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def split_query(query: str, prompt: str | None, strip_suffixes: list[str]) -> tuple[str, str, bool]:
    """OpenRLHF's ``query`` is the decoded prompt + response: ``(prompt, response, matched)``.

    With a prompt that starts the query, the response is ``query[len(prompt):]``; otherwise the whole query is
    scored as the response of an empty prompt (``matched`` is False). Suffixes such as the policy's EOS text,
    which OpenRLHF keeps when decoding, are cut from the end of the response.
    """
    if prompt and query.startswith(prompt):
        prompt_text, response, matched = prompt, query[len(prompt) :], True
    else:
        prompt_text, response, matched = "", query, not prompt
    changed = True
    while changed:
        changed = False
        for suffix in strip_suffixes:
            if suffix and response.endswith(suffix):
                response = response[: -len(suffix)]
                changed = True
    return prompt_text, response, matched


async def get_reward(server: RewardServer, name: str, body: OpenRLHFRequest) -> dict[str, Any]:
    """Score an OpenRLHF request: every query gets a number (the reward's ``failure_score`` where it has no
    reward), and ``extra_logs`` carries, per query, ``rh_trl/failed`` (1 where the failure score was used) and
    ``rh_trl/query_without_prompt`` (1 where the query did not start with its prompt and was scored whole)."""
    spec = server.specs[name]
    failure_score = float(spec.failure_score)  # type: ignore[arg-type]  # pick_get_reward checked it
    prompts, completions, without_prompt = [], [], []
    for i, query in enumerate(body.query):
        prompt, response, matched = split_query(
            query, body.prompts[i] if body.prompts else None, spec.strip_suffixes
        )
        prompts.append(prompt)
        completions.append(response)
        without_prompt.append(0 if matched else 1)
    columns = {"label": list(body.labels)} if body.labels is not None else {}
    batcher = server.batchers[name]
    extra_logs: dict[str, list[Any]] = {}
    try:
        output = await batcher.submit(prompts, completions, columns)
        values: list[float | None] = list(output.rewards)
        extra_logs = {
            key: column
            for key, column in output.extra.items()
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in column)
        }
    except Exception as err:
        logger.error("%s: /get_reward scoring of %d queries failed: %r", name, len(prompts), err)
        values = [None] * len(prompts)
    failed = [0 if v is not None and math.isfinite(v) else 1 for v in values]
    rewards = [failure_score if bad else v for v, bad in zip(values, failed, strict=True)]
    counts = batcher.metrics.counts
    for key, flags in (("get_reward_failed", failed), ("get_reward_query_without_prompt", without_prompt)):
        counts[key] = counts.get(key, 0) + sum(flags)
    if any(failed):
        logger.warning(
            "%s: %d of %d /get_reward queries got no reward and were answered failure_score=%s",
            name,
            sum(failed),
            len(failed),
            failure_score,
        )
    if any(without_prompt):
        logger.warning(
            "%s: %d /get_reward quer(ies) do not start with their prompt (a truncated prompt?); scored as "
            "whole texts with an empty prompt",
            name,
            sum(without_prompt),
        )
    extra_logs.update({"rh_trl/failed": failed, "rh_trl/query_without_prompt": without_prompt})
    return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}


# -- the app ----------------------------------------------------------------------------------------------------


class RewardServer:
    """The rewards a server hosts, with their batchers, limits and key."""

    def __init__(self, config: ServerConfig, rewards: dict[str, Reward] | None = None) -> None:
        self.config = config
        self.api_key = config.resolved_api_key()
        self.specs: dict[str, RewardSpec] = {s.name: s for s in config.rewards}
        self.get_reward_served = [s.name for s in config.rewards if s.failure_score is not None]
        rewards = dict(rewards or {})
        for name, spec in self.specs.items():
            if name not in rewards:
                logger.info("loading reward '%s' (%s)", name, spec.type)
                rewards[name] = build_reward(spec)
        unknown = sorted(set(rewards) - set(self.specs))
        if unknown:
            raise ValueError(f"rewards {unknown} are not listed in the config's rewards")
        self.batchers = {
            name: DynamicBatcher(
                rewards[name],
                max_items=spec.max_batch_items,
                max_chars=spec.max_batch_chars,
                max_wait_ms=spec.max_wait_ms,
                enabled=spec.batching,
            )
            for name, spec in self.specs.items()
        }
        self.started = time.time()
        self.rejected: dict[int, int] = {}

    def pick(self, model: str | None) -> str:
        if model is None:
            if len(self.batchers) == 1:
                return next(iter(self.batchers))
            raise RequestError(
                400,
                f'this server hosts several rewards; name one with "model": one of {sorted(self.batchers)}',
            )
        if model not in self.batchers:
            raise RequestError(404, f"unknown model '{model}'; this server hosts {sorted(self.batchers)}")
        return model

    def pick_get_reward(self, model: str | None) -> str:
        """The reward a ``/get_reward`` request is scored with: ``model``, else the configured default (or the
        only served reward). It must have a ``failure_score``: OpenRLHF cannot take a missing reward."""
        served = self.get_reward_served
        why = "OpenRLHF cannot take a missing reward, so a reward is served there only with failure_score"
        if not served:
            raise RequestError(404, f"this server serves no reward on /get_reward: {why} in its config")
        # the config names a default whenever several rewards are hosted and some are served
        name = self.pick(model or self.config.get_reward_default or served[0])
        if self.specs[name].failure_score is None:
            raise RequestError(
                404, f"reward '{name}' is not served on /get_reward: {why} (served here: {served})"
            )
        return name

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "wrong API key")

    async def read(self, request: Request, schema: type[BaseModel]) -> Any:
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        try:
            data = json.loads(body)
        except ValueError as err:
            raise RequestError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5]
            )
            raise RequestError(422, f"invalid {schema.__name__}: {problems}") from None
        n = len(getattr(parsed, "completions", None) or getattr(parsed, "query", None) or [])
        if n > self.config.max_items_per_request:
            raise RequestError(
                413,
                f"{n} items in one request; the limit is {self.config.max_items_per_request} (split the call)",
            )
        return parsed


def create_app(config: ServerConfig, rewards: dict[str, Reward] | None = None) -> FastAPI:
    """Build the FastAPI app for ``config``; ``rewards`` supplies already-built rewards by name."""
    server = RewardServer(config, rewards)
    if server.get_reward_served:
        logger.info(
            "/get_reward serves %s (without ?model=: %s)",
            server.get_reward_served,
            config.get_reward_default or server.get_reward_served[0],
        )
    else:
        logger.info("/get_reward is off: no hosted reward has a failure_score")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in server.batchers.values():
            batcher.start()
        yield
        for batcher in server.batchers.values():
            await batcher.stop()

    app = FastAPI(title="rh_trl reward server", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _refuse(request: Request, err: RequestError) -> JSONResponse:
        server.rejected[err.status] = server.rejected.get(err.status, 0) + 1
        logger.info("%s %s refused: %d %s", request.method, request.url.path, err.status, err.message)
        return JSONResponse({"detail": err.message}, status_code=err.status)

    async def score(
        name: str, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
    ) -> Any:
        try:
            return await server.batchers[name].submit(prompts, completions, columns)
        except Exception as err:
            raise RequestError(500, f"scoring failed: {type(err).__name__}: {err}") from err

    @app.post("/v1/rewards")
    async def rewards_route(request: Request) -> dict[str, Any]:
        server.check_key(request)
        body: RewardRequest = await server.read(request, RewardRequest)
        name = server.pick(body.model)
        prompts, completions = body.texts()
        output = await score(name, prompts, completions, dict(body.model_extra or {}))
        answer: dict[str, Any] = {
            "model": name,
            "rewards": output.rewards,
            "num_none": sum(r is None for r in output.rewards),
        }
        if output.extra:
            answer["extra"] = output.extra
        return answer

    @app.post("/get_reward")
    async def openrlhf_route(request: Request) -> dict[str, Any]:
        try:
            server.check_key(request)
            body: OpenRLHFRequest = await server.read(request, OpenRLHFRequest)
            name = server.pick_get_reward(body.model or request.query_params.get("model"))
        except RequestError as err:
            # OpenRLHF retries a refused request, logs it at INFO and then has no reward for the sample
            logger.warning("/get_reward refused (%d): %s", err.status, err.message)
            raise
        return await get_reward(server, name, body)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(server.batchers), "uptime_s": time.time() - server.started}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_key(request)
        data = []
        for name, spec in server.specs.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "type": spec.type,
                    "reward_name": server.batchers[name].reward.__name__,
                    "batching": spec.batching,
                    "max_batch_items": spec.max_batch_items,
                    "max_wait_ms": spec.max_wait_ms,
                }
            )
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics(request: Request) -> dict[str, Any]:
        server.check_key(request)
        return {
            "uptime_s": time.time() - server.started,
            "rejected": {str(k): v for k, v in sorted(server.rejected.items())},
            "rewards": {name: b.metrics.snapshot() for name, b in server.batchers.items()},
        }

    return app


def serve(config: ServerConfig, rewards: dict[str, Reward] | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted (requests in flight are finished first)."""
    config.check_exposure()
    app = create_app(config, rewards)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        timeout_graceful_shutdown=config.graceful_shutdown_s or None,
    )
    uvicorn.Server(uv_config).run()


__all__ = ["OpenRLHFRequest", "RewardRequest", "RewardServer", "create_app", "serve", "split_query"]
