"""Reading a request body the way the reward server must: refuse early, never crash on what a client sends.

Order of checks: ``Content-Type`` must be JSON (415; a web page cannot make a browser send that without a CORS
preflight this server never grants), the declared length (413), the body itself read within a time limit (408)
and a size limit (413), then strict JSON (orjson: valid UTF-8, no lone surrogates, no ``NaN``; 400), a JSON
object (422) nested no deeper than a limit (422). A client that disconnects mid-body raises
:class:`~rh_trl.serve.errors.ClientGone`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from rh_trl.serve.errors import ClientGone, RequestError

JSON_TYPES = ("application/json",)


def check_content_type(value: str | None) -> None:
    """Refuse a body that is not declared as JSON (``application/json`` or ``application/<x>+json``)."""
    media = (value or "").split(";", 1)[0].strip().lower()
    if media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json")):
        return
    shown = (value or "")[:100].encode("ascii", "backslashreplace").decode()
    raise RequestError(
        415,
        f"Content-Type must be application/json, got {shown!r}"
        if value
        else "Content-Type is missing; send the body as JSON with 'Content-Type: application/json'",
    )


def depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` nests lists and objects more than ``limit`` levels deep (iterative, no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


async def read_body(stream: Any, declared: str | None, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body from an ASGI byte stream, within ``max_bytes`` and ``timeout_s``."""
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    body = bytearray()

    async def collect() -> None:
        async for chunk in stream:
            body.extend(chunk)
            if len(body) > max_bytes:
                raise RequestError(413, f"request body exceeds the limit of {max_bytes} bytes")

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(
            408, f"the body did not arrive within {timeout_s:g} s ({len(body)} bytes received)"
        ) from None
    except ClientDisconnect:
        raise ClientGone(f"went away after {len(body)} bytes of its body") from None
    return bytes(body)


def parse_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """Strict JSON object from ``body``: 400 for what is not JSON, 422 for a non-object or too deep a nesting."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"expected a JSON object, got {type(data).__name__}")
    if depth_exceeds(data, max_depth):
        raise RequestError(422, f"the body nests lists and objects more than {max_depth} levels deep")
    return data
