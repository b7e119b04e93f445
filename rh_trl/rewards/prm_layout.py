"""How each PRM family lays out a (prompt, steps) pair, and where in the tokens its step scores are read.

Every layout renders text, tokenizes it once with character offsets, and locates each step's *marker*
(the separator token, the assistant's ``"+"``, the step tag) from the character position where the layout put
it. The token there is checked against the marker's id; a mismatch (a merge by the tokenizer, a template that
rewrote the text) is an error for that sample, never a guess.

* ``separator`` (Qwen2.5-Math-PRM): ``[system, *prompt, assistant: s1<sep>s2<sep>…sN<sep>]`` through the chat
  template; the score rows are read AT each separator token.
* ``next_token`` (RLHFlow PRMs): ``[*prompt with s1 appended to the last user turn, assistant "+", user s2,
  assistant "+", …]`` through the chat template; the score row of step k is read at the token BEFORE the k-th
  assistant ``"+"`` (the position whose logits predict it), so one forward pass scores every step.
* ``step_tag`` (Math-Shepherd): plain text ``question + " " + "s1 <tag>\\ns2 <tag>\\n…sN <tag>"``; the score
  rows are read AT each tag token, as Math-Shepherd's own scoring code does (the logits there predict the token
  after the tag, which the model was trained to make ``"+"`` or ``"-"``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rh_trl.formatting import Conversation, Sample, message_text

Kind = Literal["separator", "next_token", "step_tag"]
KINDS: tuple[str, ...] = ("separator", "next_token", "step_tag")


class StepLocateError(ValueError):
    """The step markers of a sample could not be located in its tokens."""


class TooLongError(ValueError):
    """The steps of a sample do not fit in ``max_length`` tokens."""


@dataclass
class StepSequence:
    """A tokenized sample: ``positions[k]`` is the row whose output gives step k's score."""

    input_ids: list[int]
    positions: list[int]
    response_start: int
    truncated: bool = False


@dataclass(frozen=True)
class Layout:
    """What a PRM family needs to render and locate steps.

    Attributes:
        kind: ``"separator"``, ``"next_token"`` or ``"step_tag"``.
        marker: the text placed after each step (separator token, ``"+"`` assistant turn, step tag).
        marker_id: the token id the marker must be in the tokenized text.
        system_prompt: system message put first (chat layouts); ``None`` keeps the prompt's own.
        chat_template: the Jinja template used (chat layouts).
        chat_template_kwargs: passed to ``apply_chat_template``.
    """

    kind: str
    marker: str
    marker_id: int
    system_prompt: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Offsets
# ----------------------------------------------------------------------------------------------------------------


class _Offsets:
    """Maps character positions to token indices (tokens with an empty span, e.g. an added BOS, are skipped)."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self.index = [i for i, (s, e) in enumerate(offsets) if e > s]
        self.starts = [offsets[i][0] for i in self.index]
        self.ends = [offsets[i][1] for i in self.index]

    def token_at(self, char: int) -> int | None:
        """The token whose span covers ``char``, or ``None``."""
        j = bisect.bisect_right(self.ends, char)
        if j < len(self.ends) and self.starts[j] <= char:
            return self.index[j]
        return None


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _context(sample: Sample, system_prompt: str | None) -> Conversation:
    """The prompt as messages; with a PRM system prompt, the prompt's own system messages are replaced by it."""
    if isinstance(sample.prompt, str):
        messages: Conversation = [{"role": "user", "content": sample.prompt}]
    else:
        messages = [{"role": m["role"], "content": message_text(m)} for m in sample.prompt]
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + [
            m for m in messages if m["role"] != "system"
        ]
    return messages


def _question_text(sample: Sample) -> str:
    if isinstance(sample.prompt, str):
        return sample.prompt
    return "\n\n".join(message_text(m) for m in sample.prompt if m["role"] != "system")


def _apply(tokenizer: Any, layout: Layout, messages: Conversation, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=layout.chat_template,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        **dict(layout.chat_template_kwargs),
    )


def render(
    tokenizer: Any, layout: Layout, sample: Sample, steps: list[str]
) -> tuple[str, bool, list[int], int]:
    """Render one sample.

    Returns ``(text, add_special_tokens, marker_chars, first_step_char)``: ``marker_chars[k]`` is the position
    of the LAST character of step k's marker in ``text``; ``first_step_char`` is where step 1 starts.
    """
    if layout.kind == "step_tag":
        return _render_step_tag(layout, sample, steps)
    if layout.kind == "separator":
        return _render_separator(tokenizer, layout, sample, steps)
    return _render_next_token(tokenizer, layout, sample, steps)


def _render_step_tag(layout: Layout, sample: Sample, steps: list[str]) -> tuple[str, bool, list[int], int]:
    text = _question_text(sample) + " "
    first = len(text)
    marker_chars = []
    for k, step in enumerate(steps):
        text += step + " " + layout.marker
        marker_chars.append(len(text) - 1)
        if k < len(steps) - 1:
            text += "\n"
    return text, True, marker_chars, first


def _render_separator(
    tokenizer: Any, layout: Layout, sample: Sample, steps: list[str]
) -> tuple[str, bool, list[int], int]:
    context = _context(sample, layout.system_prompt)
    content = "".join(step + layout.marker for step in steps)
    full = _apply(tokenizer, layout, [*context, {"role": "assistant", "content": content}], False)
    prefix = _apply(tokenizer, layout, context, True)
    start = len(prefix) if full.startswith(prefix) else full.rfind(content)
    if start < 0 or full[start : start + len(content)] != content:
        raise StepLocateError(
            "the chat template changed the steps' text, so the separators cannot be located"
        )
    marker_chars, at = [], start
    for step in steps:
        at += len(step) + len(layout.marker)
        marker_chars.append(at - 1)
    return full, False, marker_chars, start


def _render_next_token(
    tokenizer: Any, layout: Layout, sample: Sample, steps: list[str]
) -> tuple[str, bool, list[int], int]:
    context = _context(sample, layout.system_prompt)
    if context and context[-1]["role"] == "user":
        first_turn = {"role": "user", "content": context[-1]["content"] + " " + steps[0]}
        conversation = context[:-1] + [first_turn]
    else:
        conversation = [*context, {"role": "user", "content": steps[0]}]
    conversation.append({"role": "assistant", "content": layout.marker})
    for step in steps[1:]:
        conversation += [{"role": "user", "content": step}, {"role": "assistant", "content": layout.marker}]
    full = _apply(tokenizer, layout, conversation, False)
    marker_chars = []
    for k in range(len(steps)):
        before = len(conversation) - 2 * (len(steps) - k) + 1  # the messages before step k's assistant turn
        prefix = _apply(tokenizer, layout, conversation[:before], True)
        at = len(prefix)
        if not full.startswith(prefix) or full[at : at + len(layout.marker)] != layout.marker:
            raise StepLocateError(
                f"the chat template does not render step {k + 1}'s assistant turn as a continuation of the "
                "conversation before it, so its judgement token cannot be located"
            )
        marker_chars.append(at + len(layout.marker) - 1)
    first = full.rfind(steps[0], 0, marker_chars[0])
    return full, False, marker_chars, max(first, 0)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization, location, truncation
# ----------------------------------------------------------------------------------------------------------------


def encode(
    tokenizer: Any, layout: Layout, sample: Sample, steps: list[str], max_length: int | None = None
) -> StepSequence:
    """Render, tokenize, locate every step's score row, and left-truncate the prompt to ``max_length``.

    Raises :class:`StepLocateError` when a marker is not the expected token, :class:`TooLongError` when the
    steps alone (from the first step on, plus a leading BOS) do not fit in ``max_length``.
    """
    text, add_special, marker_chars, first_char = render(tokenizer, layout, sample, steps)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = _Offsets(enc["offset_mapping"])
    positions = []
    for k, char in enumerate(marker_chars):
        t = offsets.token_at(char)
        if t is None or ids[t] != layout.marker_id:
            found = (
                "no token" if t is None else f"token {ids[t]} ({tokenizer.convert_ids_to_tokens(ids[t])!r})"
            )
            raise StepLocateError(
                f"step {k + 1}: expected the token {layout.marker!r} (id {layout.marker_id}) after the step, "
                f"found {found}"
            )
        positions.append(t - 1 if layout.kind == "next_token" else t)
    start = offsets.token_at(first_char)
    response_start = positions[0] if start is None else min(start, positions[0])
    seq = StepSequence(ids, positions, response_start)
    return truncate(seq, max_length, getattr(tokenizer, "bos_token_id", None))


def truncate(seq: StepSequence, max_length: int | None, bos_id: int | None) -> StepSequence:
    """Cut prompt tokens from the left (keeping a leading BOS) until ``seq`` fits; never cut a step."""
    ids = seq.input_ids
    if max_length is None or len(ids) <= max_length:
        return seq
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    excess = len(ids) - max_length
    if seq.response_start - head < excess:
        raise TooLongError(
            f"the steps need {len(ids) - seq.response_start + head} tokens, more than max_length={max_length}"
        )
    return StepSequence(
        ids[:head] + ids[head + excess :],
        [p - excess for p in seq.positions],
        seq.response_start - excess,
        truncated=True,
    )
