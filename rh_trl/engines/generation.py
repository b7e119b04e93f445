"""Text generation for generative rewards (LLM judges, critique-then-score models).

Three engines:

* :class:`HFGenerator` generates locally with transformers: each distinct prompt once, sorted by length, left
  padded, in batches of ``batch_size``; greedy or sampled; at most ``max_new_tokens`` new tokens.
* :class:`~rh_trl.engines.vllm_generation.VLLMGenerator` generates with an in-process ``vllm.LLM`` from the same
  token ids, with the same stop tokens and decoding (:class:`TokenGenerator`), so greedy texts are the same.
* :class:`ChatClient` calls an OpenAI-compatible ``POST /v1/chat/completions`` endpoint (vLLM, SGLang, …)
  concurrently through :class:`~rh_trl.engines.http.HTTPPool` (pooling, retries with backoff, failover).
  A request that still fails after the retries gives ``None`` for that conversation; callers count it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from tqdm.auto import tqdm

from rh_trl.engines import deadline
from rh_trl.engines.http import HTTPPool, MalformedResponse, RequestRejected, RetriesExhausted, RetryPolicy

logger = logging.getLogger("rh_trl")

Conversation = list[dict[str, Any]]


@dataclass
class Generation:
    """One generated continuation: its text, its token ids, and whether it ended before the length limit.

    ``reason`` says why a prompt got no continuation at all (``"too_long"``: no room left in the engine)."""

    text: str
    token_ids: list[int]
    finished: bool
    reason: str | None = None


class TokenGenerator:
    """What the local generators share: the chat rendering of prompts, the stop tokens and the decoding.

    Subclasses implement :meth:`generate` (token ids in, :class:`Generation` s out, in order).

    Args:
        tokenizer: the generating model's tokenizer (chat template, pad id, decoding).
        max_new_tokens: longest continuation, in tokens.
        do_sample: sample instead of greedy decoding; ``temperature`` and ``top_p`` then apply.
        stop_token_ids: tokens that end a continuation (default: the tokenizer's EOS); the stop token is not
            part of the returned text or ids.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            stop_token_ids = [] if eos is None else [eos]
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = self.stop_token_ids[0] if self.stop_token_ids else 0
        self.pad_token_id = int(pad)

    def render(self, conversation: Conversation, **template_kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template and a generation prompt."""
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids)

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Continue every prompt (token ids); results in the order of ``prompts``."""
        raise NotImplementedError

    def generate_chat(
        self, conversations: Sequence[Conversation], **template_kwargs: Any
    ) -> list[Generation]:
        """Render conversations with the chat template (plus generation prompt) and continue them."""
        return self.generate([self.render(c, **template_kwargs) for c in conversations])

    def finish(self, new_tokens: Sequence[int], stopped: bool = False) -> Generation:
        """A continuation's :class:`Generation`: cut at the first stop token, decoded without special tokens."""
        stops = set(self.stop_token_ids)
        row = [int(t) for t in new_tokens]
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        ids = row if cut is None else row[:cut]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text, ids, finished=cut is not None or stopped)

    @staticmethod
    def distinct(prompts: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Each prompt as a key, and the distinct keys (each distinct prompt is generated once)."""
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one token")
        keys = [tuple(int(t) for t in p) for p in prompts]
        return keys, list(dict.fromkeys(keys))


class HFGenerator(TokenGenerator):
    """Batched local generation with a transformers causal LM.

    Args:
        model: a loaded causal LM (``generate`` is called on it).
        tokenizer: its tokenizer (for the chat template, the pad id and decoding).
        batch_size: prompts per ``generate`` call.
        progress: show a tqdm bar over batches.
        max_new_tokens, do_sample, temperature, top_p, stop_token_ids: see :class:`TokenGenerator`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        stop_token_ids: Sequence[int] | None = None,
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        super().__init__(
            tokenizer,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=stop_token_ids,
        )
        self.model = model
        self.batch_size = batch_size
        self.progress = progress

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[Generation]:
        """Continue every prompt (token ids); results in the order of ``prompts``."""
        keys, unique = self.distinct(prompts)
        order = sorted(range(len(unique)), key=lambda k: len(unique[k]))
        results: dict[tuple[int, ...], Generation] = {}
        batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in tqdm(batches, desc="generating", unit="batch", disable=not self.progress):
                deadline.check()
                seqs = [unique[k] for k in batch]
                for seq, gen in zip(seqs, self._generate_batch(seqs), strict=True):
                    results[seq] = gen
        finally:
            self.model.train(was_training)
        return [results[k] for k in keys]

    @torch.inference_mode()
    def _generate_batch(self, seqs: list[tuple[int, ...]]) -> list[Generation]:
        longest = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: every prompt ends at the last column
            input_ids[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, longest - len(s) :] = 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "pad_token_id": self.pad_token_id,
        }
        if self.stop_token_ids:
            kwargs["eos_token_id"] = list(self.stop_token_ids)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        device = self.device
        out = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
        )
        return [self.finish(row) for row in out[:, longest:].cpu().tolist()]


@dataclass
class ChatResult:
    """A chat completion: the text (``None`` when the request failed), why it stopped, and any error."""

    text: str | None
    finish_reason: str | None = None
    error: str | None = None


class ChatClient:
    """An async client for OpenAI-compatible ``/v1/chat/completions`` servers (vLLM, SGLang, OpenAI, …).

    Args:
        urls: base URL(s), with or without the trailing ``/v1`` (``http://host:8000`` or ``http://host:8000/v1``).
        model: the served model's name (``None``: not sent; vLLM then uses the one model it serves).
        api_key: sent as ``Authorization: Bearer <key>``.
        max_tokens, temperature, top_p: sampling settings sent with every request.
        extra_body: more fields for every request (e.g. vLLM's ``{"continue_final_message": True,
            "add_generation_prompt": False}`` or ``{"chat_template_kwargs": {…}}``).
        max_concurrency: requests in flight at once.
        retry: attempts, backoff and timeout (:class:`~rh_trl.engines.http.RetryPolicy`).
        transport: an ``httpx`` transport (tests).
    """

    PATH = "/v1/chat/completions"

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str | None = None,
        *,
        api_key: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float | None = None,
        extra_body: dict[str, Any] | None = None,
        max_concurrency: int = 32,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        urls = [u.strip().rstrip("/").removesuffix("/v1") for u in urls]
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.extra_body = dict(extra_body or {})
        self.pool = HTTPPool(
            urls, api_key=api_key, max_concurrency=max_concurrency, retry=retry, transport=transport
        )

    def payload(self, messages: Conversation) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "n": 1,
        }
        if self.model is not None:
            body["model"] = self.model
        if self.top_p is not None:
            body["top_p"] = self.top_p
        body.update(self.extra_body)
        return body

    async def complete(self, messages: Conversation) -> ChatResult:
        """One chat completion; a request that fails for good gives ``ChatResult(None, error=…)``.

        A 401/403 answer (a missing or wrong API key) raises, and so does a 404 for the model's name
        (:class:`~rh_trl.engines.http.ModelNotServedError`, naming the served models): no retry can fix those.
        """
        try:
            answer = await self.pool.post(self.PATH, self.payload(messages))
            return self._read(answer)
        except RequestRejected as err:
            if err.status_code in (401, 403):
                raise
            if err.status_code == 404:
                raise await self.pool.model_not_served(self.model, err, "chat server") from err
            return ChatResult(None, error=f"rejected: {err}")
        except RetriesExhausted as err:
            return ChatResult(None, error=f"failed: {err}")
        except MalformedResponse as err:
            return ChatResult(None, error=f"malformed: {err}")

    async def complete_many(self, conversations: Sequence[Conversation]) -> list[ChatResult]:
        """Complete every conversation concurrently (up to ``max_concurrency`` at once), results in order."""
        return list(await asyncio.gather(*(self.complete(c) for c in conversations)))

    @staticmethod
    def _read(answer: Any) -> ChatResult:
        try:
            choice = answer["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise MalformedResponse(
                f"expected {{'choices': [{{'message': {{'content': …}}}}]}}, got {str(answer)[:200]}"
            ) from err
        if content is not None and not isinstance(content, str):
            raise MalformedResponse(f"message content must be a string or null, got {type(content).__name__}")
        return ChatResult(content or "", choice.get("finish_reason"))
