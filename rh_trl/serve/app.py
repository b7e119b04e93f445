"""The rh_trl reward server: FastAPI routes over dynamically batched rewards.

Routes:
    POST /v1/rewards   {"model", "prompts", "completions", <columns>…} -> {"model", "rewards", "num_none", ["extra"]}
    POST /get_reward   OpenRLHF's remote reward protocol: {"query", "prompts", "labels"} ->
                       {"rewards", "scores", "extra_logs"}; only rewards with a failure_score, never null
    GET  /health       liveness (no key needed)
    GET  /v1/models    the hosted rewards and their batching settings
    GET  /metrics      requests, latency and batch size histograms, queue depth, samples without reward, refusals,
                       per reward (Prometheus' text format)
    GET  /metrics/json the same counters as JSON, with latency percentiles

Every route but ``/health`` needs ``Authorization: Bearer <key>`` when the server has a key, checked in constant
time before the body is read. POST bodies must be ``application/json``; they are read with size and time limits
and validated (:mod:`rh_trl.serve.body`, the schemas below, which ``/openapi.json`` documents) before anything
is queued, so a bad request gets a 4xx with a message and never reaches a batch that other requests share. An
overloaded reward answers 429 with ``Retry-After``; a client that goes away has its queued samples dropped,
with one log line; a retry with the same ``Idempotency-Key`` joins the call already made
(:mod:`rh_trl.serve.idempotency`). Scoring goes through a :class:`~rh_trl.serve.backend.ScoringBackend`, so
another deployment can reuse this app with its own backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rh_trl.rewards.base import Reward, RewardOutput
from rh_trl.serve.config import RewardSpec, ServerConfig

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
except ImportError as _err:
    raise ImportError(
        f"the rh_trl reward server needs fastapi and uvicorn ({_err}); pip install 'rh_trl[serve]'"
    ) from _err

from rh_trl.serve.backend import LocalBackend, ScoringBackend
from rh_trl.serve.body import check_content_type, parse_object, read_body
from rh_trl.serve.errors import ClientGone, RequestError
from rh_trl.serve.idempotency import SharedCalls
from rh_trl.serve.metrics import AppMetrics, app_json, prometheus_text
from rh_trl.serve.protocol import header_timeout_protocol

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

    model: str | None = Field(default=None, min_length=1)
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
    model: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check_lengths(self) -> OpenRLHFRequest:
        n = len(self.query)
        for key in ("prompts", "labels"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"got {len(value)} {key} for {n} queries; expected one per query")
        return self


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


async def get_reward(
    server: RewardServer, request: Request, name: str, body: OpenRLHFRequest
) -> dict[str, Any]:
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
    extra_logs: dict[str, list[Any]] = {}
    loop = asyncio.get_running_loop()
    give_up = loop.time() + server.config.get_reward_wait_s
    while True:
        try:
            output = await server.score(request, name, prompts, completions, columns)
            values: list[float | None] = list(output.rewards)
            extra_logs = {
                key: column
                for key, column in output.extra.items()
                if all(isinstance(v, int | float) and not isinstance(v, bool) for v in column)
            }
        except ClientGone:
            raise  # nobody to answer
        except RequestError as err:
            # overload: OpenRLHF would retry a 429 five times a second apart and then lose the reward, so the
            # request waits here for room (the queue stays bounded), then gets the failure score
            pause = err.retry_after if err.retry_after is not None else 1.0
            if err.status in (429, 503) and loop.time() + pause < give_up:
                await asyncio.sleep(pause)
                continue
            logger.error(
                "%s: /get_reward of %d queries could not be scored: %s", name, len(prompts), err.message
            )
            values = [None] * len(prompts)
        except Exception as err:
            logger.error("%s: /get_reward scoring of %d queries failed: %r", name, len(prompts), err)
            values = [None] * len(prompts)
        break
    failed = [0 if v is not None and math.isfinite(v) else 1 for v in values]
    rewards = [failure_score if bad else v for v, bad in zip(values, failed, strict=True)]
    for key, flags in (("get_reward_failed", failed), ("get_reward_query_without_prompt", without_prompt)):
        server.app_metrics.count(name, key, sum(flags))
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
    """What the routes share: the config, the scoring backend, the key, the limits, and the calls in flight."""

    def __init__(
        self,
        config: ServerConfig,
        rewards: dict[str, Reward] | None = None,
        backend: ScoringBackend | None = None,
    ) -> None:
        self.config = config
        self.api_key = config.resolved_api_key()
        self.specs: dict[str, RewardSpec] = {s.name: s for s in config.rewards}
        self.backend: ScoringBackend = backend if backend is not None else LocalBackend(config, rewards)
        self.calls: SharedCalls[RewardOutput] = SharedCalls(config.idempotency_ttl_s)
        self.get_reward_served = [s.name for s in config.rewards if s.failure_score is not None]
        self.app_metrics = AppMetrics(counts={name: {} for name in self.specs})

    def pick(self, model: str | None) -> str:
        if model is None:
            if len(self.specs) == 1:
                return next(iter(self.specs))
            raise RequestError(
                400,
                f'this server hosts several rewards; name one with "model": one of {sorted(self.specs)}',
            )
        if model not in self.specs:
            raise RequestError(404, f"unknown model {model!r}; this server hosts {sorted(self.specs)}")
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
        """The validated body (the raw bytes are kept in ``request.state.body`` for idempotency keys)."""
        check_content_type(request.headers.get("content-type"))
        config = self.config
        body = await read_body(
            request.stream(),
            request.headers.get("content-length"),
            config.max_request_bytes,
            config.body_timeout_s,
        )
        request.state.body = body
        data = parse_object(body, config.max_json_depth)
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

    async def score(
        self,
        request: Request,
        name: str,
        prompts: list[Any],
        completions: list[Any],
        columns: dict[str, list[Any]],
    ) -> RewardOutput:
        """Score through the backend, sharing the call with requests of the same ``Idempotency-Key``, and drop
        it when the client disconnects first."""
        idempotency = request.headers.get("idempotency-key")
        key = None
        if idempotency:
            key = SharedCalls.key(request.url.path, name, idempotency, body=request.state.body)

        def call() -> Awaitable[RewardOutput]:
            return self.backend.score(name, prompts, completions, columns)

        output = await until_disconnected(request, self.calls.run(key, call))
        nonfinite = sum(r is not None and not math.isfinite(r) for r in output.rewards)
        if nonfinite:  # JSON has no NaN: "no reward", as TRL reads NaN
            logger.warning("%s: %d reward(s) were not finite numbers; answered as null", name, nonfinite)
            rewards = [r if r is None or math.isfinite(r) else None for r in output.rewards]
            output = RewardOutput(rewards, output.counts, output.extra)
        return output


async def until_disconnected(request: Request, work: Awaitable[RewardOutput]) -> RewardOutput:
    """Await ``work`` unless the client disconnects first: then ``work`` is cancelled and :class:`ClientGone`
    raised. The body must have been read (after it, the only message left to receive is the disconnect)."""
    task = asyncio.ensure_future(work)

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # uvicorn cancels what is left when the shutdown grace period ends
        raise RequestError(503, "the server is shutting down; retry elsewhere", retry_after=5) from None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientGone("went away before its answer; its queued samples were dropped")


def request_body(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that reads its body itself (the schemas are added by the app's
    ``openapi``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema.__name__}"}}},
        }
    }


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so that any message (even one quoting a client's broken
    text) can be encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(
    config: ServerConfig, rewards: dict[str, Reward] | None = None, *, backend: ScoringBackend | None = None
) -> FastAPI:
    """Build the FastAPI app for ``config``; ``rewards`` supplies already-built rewards by name, ``backend``
    another scoring backend (default: :class:`~rh_trl.serve.backend.LocalBackend` in this process)."""
    server = RewardServer(config, rewards, backend)
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
        await server.backend.start()
        yield
        await server.backend.stop()

    app = FastAPI(title="rh_trl reward server", lifespan=lifespan)
    app.state.server = server
    schemas = (RewardRequest, OpenRLHFRequest)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the request bodies the routes read themselves."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for schema in schemas:
                found = schema.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                # "model" names one of the hosted rewards
                found["properties"]["model"]["anyOf"][0]["enum"] = sorted(server.specs)
                components[schema.__name__] = found
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestError)
    async def _refuse(request: Request, err: RequestError) -> Response:
        rejected = server.app_metrics.rejected
        rejected[err.status] = rejected.get(err.status, 0) + 1
        log = logger.warning if err.status in (429, 503) else logger.info
        log("%s %s refused: %d %s", request.method, request.url.path, err.status, err.message)
        return AsciiJSONResponse({"detail": err.message}, status_code=err.status, headers=err.headers())

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, err: ClientGone) -> Response:
        server.app_metrics.abandoned += 1
        client = f"{request.client[0]}:{request.client[1]}" if request.client else "a client"
        logger.info("%s %s: %s %s", request.method, request.url.path, client, err)  # one line, no traceback
        return Response(status_code=499)  # nobody reads it

    async def score(
        request: Request, name: str, prompts: list[Any], completions: list[Any], columns: dict[str, list[Any]]
    ) -> RewardOutput:
        try:
            return await server.score(request, name, prompts, completions, columns)
        except (RequestError, ClientGone):
            raise
        except Exception as err:
            kind = getattr(err, "type_name", type(err).__name__)  # a replica's error keeps its type's name
            raise RequestError(500, f"scoring failed: {kind}: {err}") from err

    @app.post("/v1/rewards", openapi_extra=request_body(RewardRequest))
    async def rewards_route(request: Request) -> dict[str, Any]:
        server.check_key(request)
        body: RewardRequest = await server.read(request, RewardRequest)
        name = server.pick(body.model)
        prompts, completions = body.texts()
        output = await score(request, name, prompts, completions, dict(body.model_extra or {}))
        answer: dict[str, Any] = {
            "model": name,
            "rewards": output.rewards,
            "num_none": sum(r is None for r in output.rewards),
        }
        if output.counts.get("too_long"):
            answer["num_too_long"] = output.counts["too_long"]
        if output.extra:
            answer["extra"] = output.extra
        return answer

    @app.post("/get_reward", openapi_extra=request_body(OpenRLHFRequest))
    async def openrlhf_route(request: Request) -> dict[str, Any]:
        try:
            server.check_key(request)
            body: OpenRLHFRequest = await server.read(request, OpenRLHFRequest)
            name = server.pick_get_reward(body.model or request.query_params.get("model"))
        except RequestError as err:
            # OpenRLHF retries a refused request, logs it at INFO and then has no reward for the sample
            logger.warning("/get_reward refused (%d): %s", err.status, err.message)
            raise
        return await get_reward(server, request, name, body)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        uptime = time.time() - server.app_metrics.started
        return {"status": "ok", "models": sorted(server.specs), "uptime_s": uptime}

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
                    "batching": spec.batching,
                    "max_batch_items": spec.max_batch_items,
                    "max_wait_ms": spec.max_wait_ms,
                    **server.backend.describe(name),
                }
            )
        return {"object": "list", "data": data}

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus' text format."""
        server.check_key(request)
        body, content_type = prometheus_text(
            server.app_metrics, server.calls.reused, await server.backend.metrics()
        )
        return Response(body, media_type=content_type)

    @app.get("/metrics/json")
    async def metrics_json(request: Request) -> dict[str, Any]:
        server.check_key(request)
        return app_json(server.app_metrics, server.calls.reused, await server.backend.metrics())

    return app


def uvicorn_config(app: FastAPI, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """uvicorn settings from the server config: connection limit, header and keep-alive timeouts, and the
    shutdown grace period (after it, requests still in flight are cancelled and the process exits)."""
    settings: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "http": header_timeout_protocol(config.header_timeout_s),
        "limit_concurrency": config.max_connections,
        "timeout_keep_alive": config.keep_alive_s,
        "timeout_graceful_shutdown": config.graceful_shutdown_s,
        "lifespan": "on",
    }
    return uvicorn.Config(app, **{**settings, **overrides})


def serve(config: ServerConfig, rewards: dict[str, Reward] | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted: on SIGTERM/SIGINT it stops taking connections, lets
    requests in flight finish for ``graceful_shutdown_s``, fails the rest, and exits."""
    config.check_exposure()
    app = create_app(config, rewards)
    uvicorn.Server(uvicorn_config(app, config, log_level=log_level)).run()


__all__ = [
    "OpenRLHFRequest",
    "RewardRequest",
    "RewardServer",
    "create_app",
    "serve",
    "split_query",
    "uvicorn_config",
]
