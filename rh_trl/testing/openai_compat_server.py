"""A small OpenAI-compatible completions server backed by a transformers causal LM.

It follows the schema of vLLM's OpenAI-compatible server for what reward models need, so code written against
``vllm serve`` can be tested and benchmarked without a GPU:

* ``POST /v1/completions``: ``prompt`` as a string, a list of token ids, or a list of either; ``max_tokens``,
  ``temperature``, ``seed``, ``echo``, ``logprobs`` (top-k of the sampled/echoed tokens), vLLM's
  ``prompt_logprobs`` (``None`` first, then ``{token_id: {"logprob", "rank", "decoded_token"}}`` per prompt
  token), ``return_token_ids`` (``prompt_token_ids``/``token_ids`` per choice), ``return_tokens_as_token_ids``,
  ``add_special_tokens`` (string prompts).
* ``GET /v1/models``, ``GET /health``, ``POST /tokenize``, ``POST /detokenize``.

Like vLLM, it batches concurrent requests together (:class:`ForwardScheduler`): the prompts of every request
that arrives while a forward pass runs are scored together in the next step, sorted by length and cut into
right-padded forward passes of at most ``max_batch_tokens`` padded tokens. Every prompt gets the same numbers
as when it is scored alone, and each request gets its own prompts back in order. A request the server refuses
(unknown model, token out of vocabulary, too long) is answered at once and never joins a batch; a forward pass
that fails is retried one prompt at a time, so only the requests whose own prompts fail get an error.

Run it with ``python -m rh_trl.testing.openai_compat_server --model PATH [--port 8000] [--max-batch-tokens 8192]``,
or in a thread with :func:`start_server`. Needs ``fastapi`` and ``uvicorn`` (``pip install 'rh_trl[serve]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from rh_trl.engines.batching import plan_batches

logger = logging.getLogger("rh_trl")


def _import_server_deps() -> tuple[Any, Any]:
    try:
        import fastapi
        import uvicorn
    except ImportError as err:
        raise ImportError(
            "the completions server needs fastapi and uvicorn: pip install 'rh_trl[serve]'"
        ) from err
    return fastapi, uvicorn


class CompletionRequest(BaseModel):
    """The fields of vLLM's completions request that this server reads (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    seed: int | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    add_special_tokens: bool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class CompletionsBackend:
    """The numbers behind the server: prompt log-probs, top-k and short generations from a causal LM."""

    def __init__(self, model: Any, tokenizer: Any, max_model_len: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_model_len = max_model_len or int(getattr(model.config, "max_position_embeddings", 4096))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.lock = threading.Lock()
        self._decoded: dict[int, str] = {}

    def decode(self, token: int) -> str:
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._decoded[token]

    def token_str(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.decode(token)

    @staticmethod
    def picked(rows: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[int]]:
        """Log-prob and rank (1 = most likely) of ``tokens[i]`` in ``rows[i]``, for every ``i`` at once."""
        if not tokens:
            return [], []
        values = rows.gather(-1, torch.tensor(tokens).unsqueeze(-1))
        ranks = (rows > values).sum(-1) + 1
        return values.squeeze(-1).tolist(), ranks.tolist()

    def entries(self, rows: torch.Tensor, tokens: list[int], top: int, as_ids: bool) -> list[dict[str, Any]]:
        """vLLM's per-position dicts: ``tokens[i]`` scored by ``rows[i]``, then its ``top`` most likely ones."""
        logprobs, ranks = self.picked(rows, tokens)
        out = [
            {str(t): {"logprob": lp, "rank": r, "decoded_token": self.token_str(t, as_ids)}}
            for t, lp, r in zip(tokens, logprobs, ranks, strict=True)
        ]
        if top > 0 and tokens:
            values, indices = rows.topk(top, dim=-1)
            for entry, vs, ts in zip(out, values.tolist(), indices.tolist(), strict=True):
                for rank, (v, t) in enumerate(zip(vs, ts, strict=True), start=1):
                    entry.setdefault(
                        str(t), {"logprob": v, "rank": rank, "decoded_token": self.token_str(t, as_ids)}
                    )
        return out

    def prompt_logprobs(self, ids: list[int], rows: torch.Tensor, top: int, as_ids: bool) -> list[Any]:
        """vLLM's ``prompt_logprobs`` of one prompt: ``None``, then one dict per following token."""
        return [None, *self.entries(rows[: len(ids) - 1], ids[1:], top, as_ids)]

    @torch.inference_mode()
    def forward(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Float32 log-softmax over the vocabulary at every position of each prompt (``[len, vocab]``), from one
        right-padded forward pass."""
        device = self.model.get_input_embeddings().weight.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        with self.lock:  # one forward pass at a time
            logits = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
        return [logits[i, : len(p)].float().log_softmax(-1).cpu() for i, p in enumerate(prompts)]

    def sample(self, row: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(row.argmax())
        probs = (row / temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Waiting:
    """One prompt of one request, waiting for its log-prob rows."""

    ids: list[int]
    future: asyncio.Future[torch.Tensor]


@dataclass
class SchedulerStats:
    """What the scheduler did so far (also served at ``GET /stats``)."""

    requests: int = 0
    steps: int = 0
    forwards: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    failed_forwards: int = 0
    max_step_requests: int = 0
    max_forward_sequences: int = 0
    seconds: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["padding_efficiency"] = self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0
        return out


@dataclass
class ForwardScheduler:
    """Scores the prompts of concurrent requests together, like vLLM's continuous batching (prefill only).

    While a step runs, new requests queue up; the next step takes every waiting request (or, with
    ``batch_requests=False``, only the oldest one), sorts their prompts by length and cuts them into
    right-padded forward passes of at most ``max_batch_tokens`` padded tokens (rows × longest; a longer prompt
    runs alone), choosing the cuts that minimize padding plus ``batch_overhead_tokens`` per pass
    (:func:`~rh_trl.engines.batching.plan_batches`). Forward passes run in one worker thread, so the event loop
    keeps accepting requests. A pass that fails is retried one prompt at a time; a prompt that still fails
    fails only its own request.
    """

    backend: CompletionsBackend
    max_batch_tokens: int = 8192
    batch_overhead_tokens: int = 256
    batch_requests: bool = True
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")
        if self.batch_overhead_tokens < 0:
            raise ValueError(f"batch_overhead_tokens must be at least 0, got {self.batch_overhead_tokens}")
        self._waiting: list[list[_Waiting]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Prompts queued for the next step."""
        return sum(len(request) for request in self._waiting)

    async def logprob_rows(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Each prompt's ``[len, vocab]`` log-softmax rows, scored in the next step with whatever else waits."""
        loop = asyncio.get_running_loop()
        request = [_Waiting(list(p), loop.create_future()) for p in prompts]
        self._start(loop)
        self._waiting.append(request)
        self.stats.requests += 1
        self._wakeup.set()  # type: ignore[union-attr]
        results = await asyncio.gather(*(w.future for w in request), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rh_trl-completions")
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._wakeup = loop, asyncio.Event()
            self._task = loop.create_task(self._work(), name="rh_trl-completions-scheduler")

    async def stop(self) -> None:
        """Fail what still waits, stop the scheduling task and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request in self._waiting:
            for w in request:
                if not w.future.done():
                    w.future.set_exception(RuntimeError("the server is shutting down"))
        self._waiting = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                take = len(self._waiting) if self.batch_requests else 1
                requests, self._waiting = self._waiting[:take], self._waiting[take:]
                step = [w for request in requests for w in request if not w.future.done()]
                self.stats.steps += 1
                self.stats.max_step_requests = max(self.stats.max_step_requests, len(requests))
                try:
                    lengths = [len(w.ids) for w in step]
                    for group in plan_batches(
                        lengths, self.max_batch_tokens, overhead_tokens=self.batch_overhead_tokens
                    ):
                        await self._forward([step[i] for i in group])
                except Exception as err:  # never leave a request waiting forever
                    logger.exception("completions server: a scheduling step failed")
                    for w in step:
                        if not w.future.done():
                            w.future.set_exception(err)

    async def _forward(self, group: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            rows = await loop.run_in_executor(self._pool, self.backend.forward, [w.ids for w in group])
        except Exception as err:
            self.stats.failed_forwards += 1
            if len(group) > 1:
                logger.warning(
                    "completions server: a forward pass of %d prompts failed (%r); scoring them one by one",
                    len(group),
                    err,
                )
                for w in group:
                    await self._forward([w])
                return
            logger.error("completions server: a prompt of %d tokens failed: %r", len(group[0].ids), err)
            if not group[0].future.done():
                group[0].future.set_exception(err)
            return
        s = self.stats
        s.seconds += time.perf_counter() - start
        s.forwards += 1
        s.sequences += len(group)
        s.real_tokens += sum(len(w.ids) for w in group)
        s.padded_tokens += len(group) * max(len(w.ids) for w in group)
        s.max_forward_sequences = max(s.max_forward_sequences, len(group))
        for w, r in zip(group, rows, strict=True):
            if not w.future.done():  # a client that went away cancels its futures
                w.future.set_result(r)


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`start_server`)."""

    url: str
    server: Any
    thread: threading.Thread
    app: Any = None

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def create_app(
    model: Any,
    tokenizer: Any,
    model_name: str = "model",
    max_model_len: int | None = None,
    *,
    max_batch_tokens: int = 8192,
    batch_overhead_tokens: int = 256,
    batch_requests: bool = True,
) -> Any:
    """The FastAPI app serving ``model`` under ``model_name`` (batching options: see :class:`ForwardScheduler`).

    ``app.state.backend`` holds the :class:`CompletionsBackend`, ``app.state.scheduler`` the scheduler.
    """
    fastapi, _ = _import_server_deps()
    from fastapi.responses import JSONResponse

    backend = CompletionsBackend(model, tokenizer, max_model_len)
    scheduler = ForwardScheduler(backend, max_batch_tokens, batch_overhead_tokens, batch_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await scheduler.stop()

    app = fastapi.FastAPI(title="rh_trl OpenAI-compatible completions", lifespan=lifespan)
    app.state.backend = backend
    app.state.scheduler = scheduler

    def error(message: str, status: int = 400) -> Any:
        kind = "BadRequestError" if status < 500 else "InternalServerError"
        return JSONResponse(
            {"object": "error", "message": message, "type": kind, "code": status}, status_code=status
        )

    def check_model(name: str | None) -> Any:
        if name is not None and name != model_name:
            return error(f"The model `{name}` does not exist; this server has `{model_name}`.", 404)
        return None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {**scheduler.stats.snapshot(), "waiting": scheduler.waiting}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "rh_trl",
            "max_model_len": backend.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    def tokenize(request: TokenizeRequest) -> Any:
        if (bad := check_model(request.model)) is not None:
            return bad
        tokens = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        return {"tokens": list(tokens), "count": len(tokens), "max_model_len": backend.max_model_len}

    @app.post("/detokenize")
    def detokenize(request: DetokenizeRequest) -> Any:
        return {"prompt": tokenizer.decode(request.tokens, skip_special_tokens=False)}

    def read_prompts(request: CompletionRequest) -> list[list[int]] | str:
        """The request's prompts as token ids, or why it is refused."""
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            return "prompt must not be empty"
        if request.n != 1:
            return "only n=1 is supported"
        if request.max_tokens < 0:
            return f"max_tokens must be at least 0, got {request.max_tokens}"
        prompts: list[list[int]] = []
        for p in prompt:
            ids = (
                list(tokenizer(p, add_special_tokens=request.add_special_tokens)["input_ids"])
                if isinstance(p, str)
                else [int(t) for t in p]
            )
            if not ids:
                return "every prompt needs at least one token"
            bad_ids = [t for t in ids if not 0 <= t < backend.vocab_size]
            if bad_ids:
                return f"token id {bad_ids[0]} is out of vocabulary (size {backend.vocab_size})"
            if len(ids) + request.max_tokens > backend.max_model_len:
                return (
                    f"This model's maximum context length is {backend.max_model_len} tokens. However, you "
                    f"requested {len(ids) + request.max_tokens} tokens ({len(ids)} in the messages, "
                    f"{request.max_tokens} in the completion)."
                )
            prompts.append(ids)
        return prompts

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        if (bad := check_model(request.model)) is not None:
            return bad
        prompts = read_prompts(request)
        if isinstance(prompts, str):
            return error(prompts)
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        try:
            scored = await scheduler.logprob_rows(prompts)
            choices = [
                await choice(i, ids, rows, request, generator)
                for i, (ids, rows) in enumerate(zip(prompts, scored, strict=True))
            ]
        except Exception as err:
            return error(f"scoring failed: {type(err).__name__}: {err}", 500)
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.pop("_generated")) for c in choices)
        body = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return JSONResponse(body)  # plain JSON types already: skips FastAPI's slow recursive encoder

    async def choice(
        index: int, ids: list[int], rows: torch.Tensor, request: Any, generator: torch.Generator | None
    ) -> dict[str, Any]:
        as_ids = request.return_tokens_as_token_ids
        generated: list[int] = []
        gen_rows: list[torch.Tensor] = []
        row = rows[-1]
        sequence = list(ids)
        while len(generated) < request.max_tokens:
            token = backend.sample(row, request.temperature, generator)
            generated.append(token)
            gen_rows.append(row)
            if token == tokenizer.eos_token_id or len(generated) == request.max_tokens:
                break
            sequence.append(token)
            row = (await scheduler.logprob_rows([sequence]))[0][-1]
        finish = "stop" if generated and generated[-1] == tokenizer.eos_token_id else "length"
        out: dict[str, Any] = {
            "index": index,
            "text": (tokenizer.decode(ids, skip_special_tokens=False) if request.echo else "")
            + tokenizer.decode(generated, skip_special_tokens=False),
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_logprobs": None,
            "_generated": generated,
        }
        if request.prompt_logprobs is not None:
            out["prompt_logprobs"] = backend.prompt_logprobs(ids, rows, request.prompt_logprobs, as_ids)
        if request.logprobs is not None:
            tokens = [*ids, *generated] if request.echo else generated
            dists = [rows[:-1]] if request.echo else []
            if gen_rows:
                dists.append(torch.stack(gen_rows))
            scored = tokens[1:] if request.echo else tokens
            entries: list[Any] = (
                backend.entries(torch.cat(dists), scored, request.logprobs, as_ids) if scored else []
            )
            if request.echo:
                entries = [None, *entries]
            text_offset, offset = [], 0
            for token in tokens:
                text_offset.append(offset)
                offset += len(backend.decode(token))
            out["logprobs"] = {
                "text_offset": text_offset,
                "token_logprobs": [
                    None if e is None or math.isnan(e[str(t)]["logprob"]) else e[str(t)]["logprob"]
                    for t, e in zip(tokens, entries, strict=True)
                ],
                "tokens": [backend.token_str(t, as_ids) for t in tokens],
                "top_logprobs": [
                    None if e is None else {v["decoded_token"]: v["logprob"] for v in e.values()}
                    for e in entries
                ],
            }
        if request.return_token_ids:
            out["prompt_token_ids"] = ids
            out["token_ids"] = generated
        return out

    return app


def start_server(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str = "model",
    host: str = "127.0.0.1",
    port: int = 0,
    max_model_len: int | None = None,
    max_batch_tokens: int = 8192,
    batch_overhead_tokens: int = 256,
    batch_requests: bool = True,
) -> RunningServer:
    """Serve ``model`` from a background thread; ``port=0`` picks a free port. Returns once it answers."""
    _, uvicorn = _import_server_deps()
    app = create_app(
        model,
        tokenizer,
        model_name,
        max_model_len,
        max_batch_tokens=max_batch_tokens,
        batch_overhead_tokens=batch_overhead_tokens,
        batch_requests=batch_requests,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the completions server on {host}:{port} did not start")
        time.sleep(0.02)
    return RunningServer(f"http://{host}:{port}", server, thread, app)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a causal LM directory (save_pretrained) or hub id")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send as 'model'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=8192,
        help="padded tokens (rows x longest) per forward pass when concurrent requests are batched together",
    )
    parser.add_argument(
        "--batch-overhead-tokens",
        type=int,
        default=256,
        help="what one more forward pass costs, in padded tokens (trades padding against passes)",
    )
    parser.add_argument(
        "--no-batch-requests",
        dest="batch_requests",
        action="store_false",
        help="score one request per forward pass instead of gathering concurrent requests",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (warning: no access log)")
    args = parser.parse_args(argv)
    _, uvicorn = _import_server_deps()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    from transformers import AutoModelForCausalLM

    from rh_trl.models.loading import load_model, load_tokenizer

    model = load_model(args.model, AutoModelForCausalLM, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer, model)
    app = create_app(
        model,
        tokenizer,
        args.served_model_name or args.model,
        args.max_model_len,
        max_batch_tokens=args.max_batch_tokens,
        batch_overhead_tokens=args.batch_overhead_tokens,
        batch_requests=args.batch_requests,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
