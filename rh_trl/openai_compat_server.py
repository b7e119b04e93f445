"""A small OpenAI-compatible completions server backed by a transformers causal LM.

It follows the schema of vLLM's OpenAI-compatible server for what reward models need, so code written against
``vllm serve`` can be tested and benchmarked without a GPU:

* ``POST /v1/completions``: ``prompt`` as a string, a list of token ids, or a list of either; ``max_tokens``,
  ``temperature``, ``seed``, ``echo``, ``logprobs`` (top-k of the sampled/echoed tokens), vLLM's
  ``prompt_logprobs`` (``None`` first, then ``{token_id: {"logprob", "rank", "decoded_token"}}`` per prompt
  token), ``return_token_ids`` (``prompt_token_ids``/``token_ids`` per choice), ``return_tokens_as_token_ids``,
  ``add_special_tokens`` (string prompts).
* ``GET /v1/models``, ``GET /health``, ``POST /tokenize``, ``POST /detokenize``.

Run it with ``python -m rh_trl.openai_compat_server --model PATH [--port 8000]``, or in a thread with
:func:`start_server`. The prompts of one request run as one right-padded forward pass; requests run one at a
time. Needs ``fastapi`` and ``uvicorn`` (``pip install 'rh_trl[serve]'``).
"""

from __future__ import annotations

import argparse
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


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

    def prompt_logprobs(self, ids: list[int], rows: torch.Tensor, top: int, as_ids: bool) -> list[Any]:
        """vLLM's ``prompt_logprobs`` of one prompt: ``None``, then one dict per following token."""
        if top > 0 or len(ids) < 2:
            return [None] + [self.entry(rows[t - 1], ids[t], top, as_ids) for t in range(1, len(ids))]
        targets = torch.tensor(ids[1:]).unsqueeze(-1)
        dist = rows[:-1]
        picked = dist.gather(-1, targets)
        ranks = ((dist > picked).sum(-1) + 1).tolist()
        return [None] + [
            {str(t): {"logprob": lp, "rank": r, "decoded_token": self.token_str(t, as_ids)}}
            for t, lp, r in zip(ids[1:], picked.squeeze(-1).tolist(), ranks, strict=True)
        ]

    def token_str(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.decode(token)

    @torch.inference_mode()
    def forward(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Float32 log-softmax over the vocabulary at every position of each prompt (``[len, vocab]``)."""
        device = self.model.get_input_embeddings().weight.device
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 1
        with self.lock:  # one forward pass at a time; requests overlap everything else
            logits = self.model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
        return [logits[i, : len(p)].float().log_softmax(-1).cpu() for i, p in enumerate(prompts)]

    def entry(self, row: torch.Tensor, token: int, top: int, as_ids: bool) -> dict[str, dict[str, Any]]:
        """vLLM's per-position dict: the given token, then the ``top`` most likely ones."""
        logprob = float(row[token])
        out = {
            str(token): {
                "logprob": logprob,
                "rank": int((row > row[token]).sum()) + 1,
                "decoded_token": self.token_str(token, as_ids),
            }
        }
        if top > 0:
            values, indices = row.topk(top)
            for rank, (v, t) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
                out.setdefault(
                    str(t), {"logprob": float(v), "rank": rank, "decoded_token": self.token_str(t, as_ids)}
                )
        return out

    def sample(self, row: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(row.argmax())
        probs = (row / temperature).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`start_server`)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def create_app(
    model: Any, tokenizer: Any, model_name: str = "model", max_model_len: int | None = None
) -> Any:
    """The FastAPI app serving ``model`` under ``model_name``."""
    fastapi, _ = _import_server_deps()
    from fastapi.responses import JSONResponse

    backend = CompletionsBackend(model, tokenizer, max_model_len)
    app = fastapi.FastAPI(title="rh_trl OpenAI-compatible completions")
    app.state.backend = backend

    def error(message: str, status: int = 400) -> Any:
        return JSONResponse(
            {"object": "error", "message": message, "type": "BadRequestError", "code": status},
            status_code=status,
        )

    def check_model(name: str | None) -> Any:
        if name is not None and name != model_name:
            return error(f"The model `{name}` does not exist; this server has `{model_name}`.", 404)
        return None

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

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

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> Any:
        if (bad := check_model(request.model)) is not None:
            return bad
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            return error("prompt must not be empty")
        if request.n != 1:
            return error("only n=1 is supported")
        if request.max_tokens < 0:
            return error(f"max_tokens must be at least 0, got {request.max_tokens}")
        prompts: list[list[int]] = []
        for p in prompt:
            ids = (
                list(tokenizer(p, add_special_tokens=request.add_special_tokens)["input_ids"])
                if isinstance(p, str)
                else [int(t) for t in p]
            )
            if not ids:
                return error("every prompt needs at least one token")
            bad_ids = [t for t in ids if not 0 <= t < backend.vocab_size]
            if bad_ids:
                return error(f"token id {bad_ids[0]} is out of vocabulary (size {backend.vocab_size})")
            if len(ids) + request.max_tokens > backend.max_model_len:
                return error(
                    f"This model's maximum context length is {backend.max_model_len} tokens. However, you requested "
                    f"{len(ids) + request.max_tokens} tokens ({len(ids)} in the messages, {request.max_tokens} "
                    "in the completion)."
                )
            prompts.append(ids)
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        choices = [
            choice(i, ids, rows, request, generator)
            for i, (ids, rows) in enumerate(zip(prompts, backend.forward(prompts), strict=True))
        ]
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(c.pop("_generated")) for c in choices)
        return {
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

    def choice(
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
            row = backend.forward([sequence])[0][-1]
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
            out["prompt_logprobs"] = [None] + [
                backend.entry(rows[t - 1], ids[t], request.prompt_logprobs, as_ids)
                for t in range(1, len(ids))
            ]
        if request.logprobs is not None:
            tokens, positions = (
                ([*ids, *generated], [None, *rows[:-1], *gen_rows])
                if request.echo
                else (
                    generated,
                    gen_rows,
                )
            )
            token_logprobs: list[float | None] = []
            top_logprobs: list[dict[str, float] | None] = []
            text_offset, offset = [], 0
            for token, dist in zip(tokens, positions, strict=True):
                text_offset.append(offset)
                offset += len(backend.decode(token))
                if dist is None:
                    token_logprobs.append(None)
                    top_logprobs.append(None)
                    continue
                entry = backend.entry(dist, token, request.logprobs, as_ids)
                token_logprobs.append(entry[str(token)]["logprob"])
                top_logprobs.append({v["decoded_token"]: v["logprob"] for v in entry.values()})
            out["logprobs"] = {
                "text_offset": text_offset,
                "token_logprobs": [None if v is None or math.isnan(v) else v for v in token_logprobs],
                "tokens": [backend.token_str(t, as_ids) for t in tokens],
                "top_logprobs": top_logprobs,
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
) -> RunningServer:
    """Serve ``model`` from a background thread; ``port=0`` picks a free port. Returns once it answers."""
    _, uvicorn = _import_server_deps()
    app = create_app(model, tokenizer, model_name, max_model_len)
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
    return RunningServer(f"http://{host}:{port}", server, thread)


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
    args = parser.parse_args(argv)
    _, uvicorn = _import_server_deps()
    from transformers import AutoModelForCausalLM

    from rh_trl.loading import load_model, load_tokenizer

    model = load_model(args.model, AutoModelForCausalLM, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer, model)
    app = create_app(model, tokenizer, args.served_model_name or args.model, args.max_model_len)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
