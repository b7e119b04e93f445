"""A test server for OpenAI's ``/v1/chat/completions`` schema (as vLLM serves it) with scripted answers.

The answer to a request is chosen by the content of its messages: the first ``(substring, answer)`` rule
that matches wins. Requests are validated against the documented request schema; a request naming another model
gets a 404 as vLLM answers it. Every request is recorded, so tests can check what the client sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class ChatMessage(BaseModel):
    role: str
    content: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    temperature: float | None = None
    n: int = 1


Rule = tuple[str, str | Callable[[ChatRequest], str]]


def make_app(model: str, rules: list[Rule], default: str = "I cannot judge this.") -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> Any:
        app.state.requests.append(request)
        if request.model != model:
            return JSONResponse(
                {
                    "error": {
                        "message": f"The model `{request.model}` does not exist.",
                        "type": "NotFoundError",
                    }
                },
                status_code=404,
            )
        content = "\n".join(m.content or "" for m in request.messages)
        answer = default
        for needle, reply in rules:
            if needle in content:
                answer = reply(request) if callable(reply) else reply
                break
        return {
            "id": f"chatcmpl-{len(app.state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Runs an app with uvicorn on 127.0.0.1 in a background thread (``with ServerThread(app) as url: …``)."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the test chat server did not start within 20 s")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
