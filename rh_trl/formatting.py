"""Formatting: TRL prompts/completions → the reward model's tokens.

This is the first layer of rh_trl (formatting → reward model → engine). It turns TRL's two input formats into
one canonical sample, renders it with the *reward model's* tokenizer and chat template (never the policy's),
tokenizes it, locates the response span from character offsets, and truncates over-long samples from the
left of the prompt so that the whole response is kept.

Layouts
-------
* Conversational input (lists of ``{"role", "content"}`` messages) with a tokenizer that has a chat template:
  the template renders ``prompt + completion`` and the result is tokenized with ``add_special_tokens=False``
  (the template already places every special token it wants, as ``apply_chat_template`` does).
* Conversational input and a tokenizer without a chat template (or ``chat_template=False``): the plain layout
  ``"System: …\\n\\nUser: …\\n\\nAssistant: …"`` (one ``Role: content`` block per message, blocks joined by a
  blank line), tokenized with the tokenizer's own special tokens, then the EOS token.
* Standard input (strings): ``prompt + completion + eos_token``, tokenized with the tokenizer's own special
  tokens — exactly what TRL's ``RewardTrainer`` trains on, so a reward model trained there is scored on the
  same layout. ``text_as_chat=True`` renders strings as one user turn and one assistant turn instead.

In every layout a doubled BOS (template BOS + tokenizer BOS) is collapsed to one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

Message = dict[str, Any]
Conversation = list[Message]
TRLText = str | Conversation

PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class RewardInputError(ValueError):
    """A prompt/completion (or a batch of them) is not in a form a reward can read."""


# ----------------------------------------------------------------------------------------------------------------
# Normalization of TRL's two formats
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One (prompt, completion) pair in canonical form.

    ``prompt`` and ``response`` are both strings (standard format) or both lists of messages (conversational).
    """

    prompt: str | Conversation
    response: str | Conversation

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)

    @property
    def messages(self) -> Conversation:
        """The whole conversation (conversational samples only)."""
        assert not isinstance(self.prompt, str) and not isinstance(self.response, str)
        return [*self.prompt, *self.response]

    @property
    def response_text(self) -> str:
        """The text of the response, however it is represented."""
        if isinstance(self.response, str):
            return self.response
        return "".join(message_text(m) for m in self.response)

    def key(self) -> str:
        """A hashable identity of the sample (used to score duplicates once)."""
        return repr((self.prompt, self.response))


def _check_messages(value: Any, what: str) -> Conversation:
    if not isinstance(value, list) or not value:
        raise RewardInputError(
            f"{what} must be a string or a non-empty list of messages, got {type(value).__name__}"
        )
    for m in value:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise RewardInputError(
                f"{what} holds {m!r}; each message must be a dict with 'role' and 'content' keys "
                "(TRL's conversational format)"
            )
    return [dict(m) for m in value]


def to_sample(prompt: Any, completion: Any, text_as_chat: bool = False) -> Sample:
    """Normalize one TRL prompt/completion pair.

    A string completion after a conversational prompt becomes one assistant message; a conversational
    completion after a string prompt turns the prompt into one user message. With ``text_as_chat`` two strings
    become a user turn and an assistant turn.
    """
    if completion is None:
        raise RewardInputError("completion is None; expected a string or a list of messages")
    if isinstance(prompt, str) and isinstance(completion, str):
        if text_as_chat:
            return Sample(
                [{"role": "user", "content": prompt}], [{"role": "assistant", "content": completion}]
            )
        return Sample(prompt, completion)
    if isinstance(prompt, str):
        prompt_messages: Conversation = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _check_messages(prompt, "prompt")
    if isinstance(completion, str):
        response: Conversation = [{"role": "assistant", "content": completion}]
    else:
        response = _check_messages(completion, "completion")
    return Sample(prompt_messages, response)


def to_samples(
    prompts: Sequence[Any], completions: Sequence[Any], text_as_chat: bool = False
) -> list[Sample]:
    """Check that a batch is well formed (equal lengths) and normalize each pair (see :func:`to_sample`).

    Raises :class:`RewardInputError` for a batch-level problem. Per-sample problems raise too; callers that
    must not stop on one bad sample call :func:`to_sample` per pair.
    """
    check_batch(prompts, completions)
    return [to_sample(p, c, text_as_chat) for p, c in zip(prompts, completions, strict=True)]


def check_batch(prompts: Sequence[Any], completions: Sequence[Any]) -> None:
    """Raise a clear error unless ``prompts`` and ``completions`` are equal-length sequences."""
    for name, value in (("prompts", prompts), ("completions", completions)):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise RewardInputError(
                f"{name} must be a list (one entry per completion), got {type(value).__name__}; "
                "wrap a single example in a list"
            )
    if len(prompts) != len(completions):
        raise RewardInputError(
            f"got {len(prompts)} prompts and {len(completions)} completions; expected one prompt per completion "
            "(TRL repeats each prompt once per generation)"
        )


def message_text(message: Message) -> str:
    """The text of a message whose content is a string or a list of ``{"type": "text", "text": …}`` parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
    raise RewardInputError(
        f"message content must be a string or a list of parts, got {type(content).__name__}"
    )


def plain_conversation(messages: Conversation) -> str:
    """Render messages in the plain layout: ``"User: …\\n\\nAssistant: …"``."""
    return "\n\n".join(
        f"{PLAIN_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {message_text(m)}" for m in messages
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering and tokenization
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A tokenized sample.

    ``response_start`` is the index of the first response token (``None`` when it could not be located);
    ``truncated`` is ``None``, ``"prompt"`` (tokens cut from the left of the prompt) or ``"response"`` (the
    response alone was longer than ``max_length``, so its beginning was cut too). ``tail_tokens``, when an
    ``end_char`` was given to :meth:`ChatFormatter.encode_rendered` and the tokenizer is fast, counts the tokens
    at the end that follow that character (e.g. a template's end-of-turn tokens after the response text).
    """

    input_ids: list[int]
    response_start: int | None
    truncated: str | None = None
    text: str = field(default="", repr=False)
    tail_tokens: int | None = field(default=None, repr=False)

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :] if self.response_start is not None else []


class ChatFormatter:
    """Renders samples with a reward model's tokenizer and turns them into token ids.

    Args:
        tokenizer: the reward model's tokenizer (a fast tokenizer gives exact response spans from offsets).
        max_length: longest sequence the model sees; longer samples lose prompt tokens from the left
            (the first BOS token is kept), never response tokens unless the response alone is too long.
        chat_template: ``None`` uses the tokenizer's template when it has one; ``False`` forces the plain
            layout; a string is a Jinja template to use instead of the tokenizer's.
        text_as_chat: render standard-format strings as a user turn and an assistant turn.
        add_eos: append the EOS token in the plain layouts (as TRL's ``RewardTrainer`` does).
        chat_template_kwargs: passed to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        chat_template: str | bool | None = None,
        text_as_chat: bool = False,
        add_eos: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_as_chat = text_as_chat
        self.add_eos = add_eos
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if chat_template is False:
            self.template: str | None = None
        elif isinstance(chat_template, str):
            self.template = chat_template
        else:
            self.template = getattr(tokenizer, "chat_template", None) or None
        # the token that opens every sequence and survives left truncation: BOS, or [CLS] for BERT-style
        # encoders, whose classifiers pool that first position
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_id: int | None = bos if bos is not None else getattr(tokenizer, "cls_token_id", None)

    @property
    def uses_chat_template(self) -> bool:
        return self.template is not None

    # -- rendering --------------------------------------------------------------------------------------------

    def render(self, sample: Sample) -> tuple[str, int | None, bool]:
        """Return ``(text, response_char_start, add_special_tokens)`` for a sample."""
        if not sample.conversational:
            assert isinstance(sample.prompt, str) and isinstance(sample.response, str)
            return self._with_eos(sample.prompt + sample.response), len(sample.prompt), True
        if self.template is None:
            prefix = plain_conversation(sample.prompt) + "\n\nAssistant: "  # type: ignore[arg-type]
            return self._with_eos(prefix + sample.response_text), len(prefix), True
        full = self._apply_template(sample.messages, add_generation_prompt=False)
        prefix = self._apply_template(sample.prompt, add_generation_prompt=True)  # type: ignore[arg-type]
        if full.startswith(prefix):
            return full, len(prefix), False
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property: fall back to the
        # last occurrence of the response text.
        response_text = sample.response_text
        at = full.rfind(response_text) if response_text else -1
        return full, (at if at >= 0 else None), False

    def _apply_template(self, messages: Conversation, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **self.chat_template_kwargs,
        )

    def _with_eos(self, text: str) -> str:
        eos = getattr(self.tokenizer, "eos_token", None)
        if self.add_eos and eos and not text.endswith(eos):
            return text + eos
        return text

    # -- tokenization -----------------------------------------------------------------------------------------

    def encode(self, sample: Sample) -> Encoded:
        """Render, tokenize, locate the response and truncate one sample."""
        return self.encode_rendered(*self.render(sample))

    def encode_rendered(
        self, text: str, response_char: int | None, add_special: bool, end_char: int | None = None
    ) -> Encoded:
        """Tokenize, locate the response and truncate what :meth:`render` returned (``end_char``: see
        :class:`Encoded`'s ``tail_tokens``)."""
        ids, response_start, tail = self._tokenize(text, response_char, add_special, end_char)
        if len(ids) >= 2 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
            response_start = None if response_start is None else max(response_start - 1, 1)
        encoded = Encoded(ids, response_start, text=text, tail_tokens=tail)
        return self.truncate(encoded)

    def _tokenize(
        self, text: str, response_char: int | None, add_special: bool, end_char: int | None = None
    ) -> tuple[list[int], int | None, int | None]:
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=add_special, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offsets = enc["offset_mapping"]
            real = [i for i, (s, e) in enumerate(offsets) if e > s]
            tail = None
            if end_char is not None:
                # the tail is what follows the last real token starting before end_char: template tokens, or
                # special tokens appended with zero-width offsets
                inside = [i for i in real if offsets[i][0] < end_char]
                tail = len(ids) - (inside[-1] + 1 if inside else 0)
            if response_char is None:
                return ids, None, tail
            start = next((i for i in real if offsets[i][1] > response_char), None)
            if start is None:  # empty response: it starts after the last real token
                start = real[-1] + 1 if real else len(ids)
            return ids, start, tail
        ids = list(tok(text, add_special_tokens=add_special)["input_ids"])
        if response_char is None:
            return ids, None, None
        prefix_ids = list(tok(text[:response_char], add_special_tokens=add_special)["input_ids"])
        # the prefix ends with the tokenizer's closing special tokens, if any: compare only the shared part
        n = 0
        while n < min(len(prefix_ids), len(ids)) and prefix_ids[n] == ids[n]:
            n += 1
        return ids, n, None

    def truncate(self, encoded: Encoded) -> Encoded:
        """Cut ``encoded`` to ``max_length`` from the left of the prompt, keeping a leading BOS (or [CLS]) token."""
        limit = self.max_length
        ids = encoded.input_ids
        if limit is None or len(ids) <= limit:
            return encoded
        head = 1 if self.bos_id is not None and ids and ids[0] == self.bos_id else 0
        excess = len(ids) - limit
        start = encoded.response_start
        if start is not None and start - head >= excess:
            return replace(
                encoded,
                input_ids=ids[:head] + ids[head + excess :],
                response_start=start - excess,
                truncated="prompt",
            )
        kept = ids[:head] + ids[len(ids) - (limit - head) :]
        if start is None:  # span unknown: plain left truncation
            return replace(encoded, input_ids=kept, truncated="prompt")
        return replace(encoded, input_ids=kept, response_start=head, truncated="response")


T = TypeVar("T")


def encode_samples(
    encode: Callable[[Sample], T], samples: Sequence[Sample | None], *, strict: bool = False, where: str = ""
) -> tuple[list[T | None], list[str | None]]:
    """``encode`` applied to each distinct sample once (``None`` samples stay ``None``), and per sample the
    error of a sample that could not be rendered: it gets ``None`` and ``"<Error>: <message>"`` so that one
    bad sample never stops training, or, with ``strict``, a :class:`RewardInputError` naming it (after
    ``where``, e.g. ``"orm_x: "``)."""
    done: dict[str, tuple[T | None, str | None]] = {}
    encoded: list[T | None] = []
    errors: list[str | None] = []
    for i, sample in enumerate(samples):
        if sample is None:
            encoded.append(None)
            errors.append(None)
            continue
        key = sample.key()
        if key not in done:
            try:
                done[key] = (encode(sample), None)
            except Exception as err:
                if strict:
                    raise RewardInputError(f"{where}sample {i} could not be rendered: {err}") from err
                done[key] = (None, f"{type(err).__name__}: {err}")
        value, error = done[key]
        encoded.append(value)
        errors.append(error)
    return encoded, errors


def encoding_counts(encoded: Sequence[Encoded | None], errors: Sequence[str | None]) -> dict[str, int]:
    """``truncated`` (samples that lost prompt tokens), ``response_truncated`` and ``render_failed``."""
    return {
        "truncated": sum(1 for e in encoded if e is not None and e.truncated == "prompt"),
        "response_truncated": sum(1 for e in encoded if e is not None and e.truncated == "response"),
        "render_failed": sum(1 for e in errors if e is not None),
    }
