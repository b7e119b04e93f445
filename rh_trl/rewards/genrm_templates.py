"""Prompt templates for LLM judges and the parsing of their verdicts.

A :class:`JudgeTemplate` is a system prompt, a user prompt with ``str.format`` fields, and a parser that reads
the verdict from the judge's answer. Fields: ``{question}`` (the prompt; a multi-turn prompt is flattened to
``"User: …\\n\\nAssistant: …"``), ``{response}`` (pointwise), ``{response_a}``/``{response_b}`` (pairwise),
``{responses}`` and ``{count}`` (listwise: the group's responses, numbered, and how many there are), and any
dataset column by its name (e.g. ``{reference}``).

Parsing is strict where it matters: the last match in the answer wins (judges restate the format before giving
their verdict), a value outside the scale gives ``None``, and an answer with no verdict gives ``None`` — never
a silent 0.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class ScoreParser:
    """Reads a number from a judge's answer.

    Args:
        patterns: regular expressions whose first group is the number; the match that ends last in the text wins.
        low, high: the scale; a value outside it gives ``None``.
        scale_to_unit: map the value to [0, 1] with ``(x - low) / (high - low)``.
    """

    patterns: tuple[str, ...]
    low: float
    high: float
    scale_to_unit: bool = False

    def parse(self, text: str | None) -> float | None:
        """The verdict in ``text``, or ``None`` when there is none or it is off the scale."""
        if not text:
            return None
        best: tuple[int, str] | None = None
        for pattern in self.patterns:
            for match in re.finditer(pattern, text, flags=re.IGNORECASE):
                if best is None or match.end() > best[0]:
                    best = (match.end(), match.group(1))
        if best is None:
            return None
        try:
            value = float(best[1])
        except ValueError:
            return None
        if not self.low <= value <= self.high:
            return None
        if self.scale_to_unit:
            return (value - self.low) / (self.high - self.low)
        return value


@dataclass(frozen=True)
class VerdictParser:
    """Reads a pairwise verdict: ``[[A]]`` → 1, ``[[B]]`` → 0, ``[[C]]`` (a tie) → 0.5; the last one wins."""

    pattern: str = r"\[\[\s*([ABC])\s*\]\]"

    def parse(self, text: str | None) -> float | None:
        if not text:
            return None
        found = re.findall(self.pattern, text)
        if not found:
            return None
        return {"A": 1.0, "B": 0.0, "C": 0.5}[found[-1].upper()]


@dataclass(frozen=True)
class ListParser:
    """Reads one score per response from a listwise verdict: the last ``Scores: [s1, s2, …]`` in the answer.

    A list with another number of scores than responses, or a score outside ``[low, high]``, gives ``None``;
    ``scale_to_unit`` maps the scores to [0, 1].
    """

    low: float = 0.0
    high: float = 10.0
    scale_to_unit: bool = True
    pattern: str = r"scores\s*[:=]\s*\[([^\[\]]*)\]"

    def parse(self, text: str | None, count: int) -> list[float] | None:
        if not text:
            return None
        found = re.findall(self.pattern, text, flags=re.IGNORECASE)
        if not found:
            return None
        values = re.findall(NUMBER, found[-1])
        if len(values) != count:
            return None
        scores = [float(v) for v in values]
        if not all(self.low <= v <= self.high for v in scores):
            return None
        if self.scale_to_unit:
            return [(v - self.low) / (self.high - self.low) for v in scores]
        return scores


@dataclass(frozen=True)
class JudgeTemplate:
    """A judge prompt: ``system`` and ``user`` texts (``str.format`` fields) and the parser of the verdict.

    ``pairwise``: the template compares two responses (``{response_a}``, ``{response_b}``; a :class:`VerdictParser`);
    ``listwise``: it shows a prompt's whole group (``{responses}``; a :class:`ListParser`); else it scores one
    ``{response}``.
    """

    user: str
    parser: ScoreParser | VerdictParser | ListParser
    system: str | None = None
    pairwise: bool = False
    listwise: bool = False

    def __post_init__(self) -> None:
        if self.pairwise and self.listwise:
            raise ValueError("a judge template is pairwise or listwise, not both")
        if self.listwise != isinstance(self.parser, ListParser):
            raise ValueError("a listwise template reads its verdict with a ListParser (and only it does)")

    @property
    def kind(self) -> str:
        return "pairwise" if self.pairwise else "listwise" if self.listwise else "pointwise"

    def needed_fields(self) -> set[str]:
        """The fields the template must show for its kind."""
        return {"pairwise": {"response_a", "response_b"}, "listwise": {"responses"}}.get(
            self.kind, {"response"}
        )

    def fields(self) -> list[str]:
        """The names of the fields the template fills in."""
        names: list[str] = []
        for text in (self.system or "", self.user):
            for _, field, _, _ in string.Formatter().parse(text):
                if field is not None and field not in names:
                    if not field.isidentifier():
                        raise ValueError(
                            f"template field '{{{field}}}' is not a plain name; use names like {{question}}, "
                            "{response} or a dataset column's name (write '{{' and '}}' for literal braces)"
                        )
                    names.append(field)
        return names

    def messages(self, values: dict[str, str]) -> list[dict[str, str]]:
        """The chat messages for one judgement."""
        out = []
        if self.system:
            out.append({"role": "system", "content": self.system.format(**values)})
        out.append({"role": "user", "content": self.user.format(**values)})
        return out


REWARD_SYSTEM = (
    "You are a strict and fair evaluator of AI assistant responses. Judge how well the response answers the "
    "question: correctness first, then helpfulness, clarity and safety. Explain your reasoning briefly, then end "
    "with one line of the form 'Reward: x', where x is a number between 0 and 1 (0 = useless or wrong, "
    "1 = excellent)."
)
REWARD_USER = "Question:\n{question}\n\nResponse:\n{response}"
REWARD_REFERENCE_USER = "Question:\n{question}\n\nReference answer:\n{reference}\n\nResponse:\n{response}"

RATING_SYSTEM = (
    "You are an impartial judge. Evaluate the quality of the AI assistant's response to the user question "
    "below, considering helpfulness, relevance, accuracy, depth and level of detail. Write a short explanation, "
    "then give your rating on a scale of 1 to 10 in exactly this format: 'Rating: [[5]]'."
)
RATING_USER = "[Question]\n{question}\n\n[The Start of the Assistant's Answer]\n{response}\n[The End of the Assistant's Answer]"
RATING_REFERENCE_USER = (
    "[Question]\n{question}\n\n[The Start of the Reference Answer]\n{reference}\n[The End of the Reference Answer]"
    "\n\n[The Start of the Assistant's Answer]\n{response}\n[The End of the Assistant's Answer]"
)

PAIRWISE_SYSTEM = (
    "You are an impartial judge. Compare two AI assistant responses to the user question below and decide which "
    "one is better, considering helpfulness, relevance, accuracy and level of detail. The order of the responses "
    "and their length must not influence you. Explain your reasoning briefly, then give your verdict in exactly "
    "this format: '[[A]]' if response A is better, '[[B]]' if response B is better, '[[C]]' for a tie."
)
PAIRWISE_USER = (
    "[Question]\n{question}\n\n[The Start of Response A]\n{response_a}\n[The End of Response A]\n\n"
    "[The Start of Response B]\n{response_b}\n[The End of Response B]"
)

LISTWISE_SYSTEM = (
    "You are an impartial judge. Below are {count} responses to the same user question, numbered from 1. Score "
    "each one from 0 to 10 for how well it answers the question, considering correctness, helpfulness, clarity and "
    "safety. Compare the responses with each other: a better response gets a higher score. Their order and length "
    "must not influence you. Explain your reasoning briefly, then end with one line of exactly this form, one "
    "score per response in their order: 'Scores: [s1, s2, ...]'."
)
LISTWISE_USER = "[Question]\n{question}\n\n{responses}"


def number_responses(responses: list[str]) -> str:
    """The ``{responses}`` field of a listwise template: each response between numbered markers."""
    return "\n\n".join(
        f"[The Start of Response {k}]\n{text}\n[The End of Response {k}]"
        for k, text in enumerate(responses, 1)
    )


#: "Reward: x" with x in [0, 1]
REWARD_PARSER = ScoreParser((rf"reward\s*[:=]\s*\**\s*({NUMBER})",), 0.0, 1.0)
#: "Rating: [[x]]" (or "[[x]]", or "Rating: x") out of 10
RATING_PARSER = ScoreParser((rf"\[\[\s*({NUMBER})\s*\]\]", rf"rating\s*[:=]\s*\**\s*({NUMBER})"), 0.0, 10.0)
#: the last number in the answer, in [0, 10]
NUMBER_PARSER = ScoreParser((rf"({NUMBER})",), 0.0, 10.0)


def rating_parser(normalize: bool = True) -> ScoreParser:
    """The 1-to-10 rating parser; ``normalize`` divides by 10 (a rating of 7 becomes 0.7)."""
    return ScoreParser(RATING_PARSER.patterns, 0.0, 10.0, scale_to_unit=normalize)


def builtin_template(name: str, normalize: bool = True) -> JudgeTemplate:
    """A built-in template by name.

    ``"reward"``: a score in [0, 1] as ``Reward: x``; ``"rating"``: ``Rating: [[x]]`` out of 10 (divided by 10
    unless ``normalize=False``); ``"reward_reference"``/``"rating_reference"``: the same with the dataset's
    ``reference`` column; ``"pairwise"``: ``[[A]]``/``[[B]]``/``[[C]]``.
    """
    templates = {
        "reward": lambda: JudgeTemplate(REWARD_USER, REWARD_PARSER, REWARD_SYSTEM),
        "reward_reference": lambda: JudgeTemplate(REWARD_REFERENCE_USER, REWARD_PARSER, REWARD_SYSTEM),
        "rating": lambda: JudgeTemplate(RATING_USER, rating_parser(normalize), RATING_SYSTEM),
        "rating_reference": lambda: JudgeTemplate(
            RATING_REFERENCE_USER, rating_parser(normalize), RATING_SYSTEM
        ),
        "pairwise": lambda: JudgeTemplate(PAIRWISE_USER, VerdictParser(), PAIRWISE_SYSTEM, pairwise=True),
        "listwise": lambda: JudgeTemplate(
            LISTWISE_USER, ListParser(scale_to_unit=normalize), LISTWISE_SYSTEM, listwise=True
        ),
    }
    if name not in templates:
        raise ValueError(f"unknown judge template '{name}'; built-in templates: {sorted(templates)}")
    return templates[name]()
