"""Pairwise preference models as rewards: P(A better than B) from a causal LM, turned into a win rate.

A pairwise preference model (RLHFlow/pair-preference-model-LLaMA3-8B style) reads one user turn

    [CONTEXT] {context} [RESPONSE A] {A} [RESPONSE B] {B} \\n

rendered with the model's own chat template, and answers with the token ``A`` or ``B``.
``P(A better) = softmax(logit_A, logit_B)[A]`` at the last position, averaged over both orders so the position
bias cancels: ``p = (p_AB + 1 - p_BA) / 2`` (swapping A and B gives exactly ``1 - p``).

The context is the prompt conversation flattened into ``<turn> {label}`` blocks. Two layouts (:data:`LAYOUTS`):

* ``"rh_trl"`` (what ``recipes/train_pairwise.py`` trains on, and every model's default): ``"\\n"``, one
  ``"\\n\\n<turn> {role}\\n {content}"`` block per message, ``"\\n\\n\\n"``; the user turn rendered with the
  template's generation prompt; the BOS the template puts first removed.
* ``"rlhflow"`` (token for token what the published inference code of ``RLHFlow/pair-preference-model-LLaMA3-8B``
  builds; the model registry gives it to that hub id, and ``rh_trl.load`` and :class:`PairwisePM` take it
  from there): ``"\\n"``, one ``"\\n<turn> {label}\\n {content}"`` block per message with the labels
  ``user``/``assistant`` alternating by position whatever the roles (a system message is the first "user"
  turn), ``"\\n"`` (what the card's template renders to in transformers); no generation prompt; every BOS text
  removed.

Each completion is scored against the other completions of its prompt, wherever they sit in the call
(:func:`~rh_trl.rewards.grouping.prompt_groups`: GRPO's groups, online DPO's two completions per prompt; on several
processes, the whole group across them) and gets its mean win probability; or, when the dataset has a reference
column, its win probability against that reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rh_trl.engines.batching import reason_counts
from rh_trl.engines.chosen_logits import ChosenLogits
from rh_trl.engines.hf import HFEngine
from rh_trl.engines.http import RetryPolicy
from rh_trl.engines.vllm_pooling import build_pooling_engine, engine_argument, pooled_rows
from rh_trl.engines.zero3 import check_zero3
from rh_trl.formatting import RewardInputError, message_text, to_sample
from rh_trl.models.catalog import hub_id_from_path, lookup, resolve_target
from rh_trl.models.loading import load_model, load_tokenizer, padding_id
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.grouping import CallGroups, call_groups

logger = logging.getLogger("rh_trl")

PAIR_PROMPT = "[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"


@dataclass(frozen=True)
class PairLayout:
    """How a comparison is laid out for the model (see the module docstring).

    Attributes:
        turn: one context turn, with ``{label}`` and ``{content}``; the context is ``"\\n"``, the turns, then
            ``context_end``.
        context_end: what closes the context.
        turn_labels: ``"role"`` labels each turn with its message's role; ``"position"`` labels the turns
            ``user``, ``assistant``, ``user``, … by position, ignoring the roles.
        generation_prompt: render the user turn with the template's generation prompt after it.
        bos: ``"leading"`` removes the BOS text the template puts first; ``"every"`` removes every occurrence
            of it (``text.replace(bos_token, "")``).
    """

    turn: str
    context_end: str
    turn_labels: Literal["role", "position"]
    generation_prompt: bool
    bos: Literal["leading", "every"]

    def context(self, prompt: str | list[dict[str, Any]]) -> str:
        """The prompt conversation flattened into the context text (a string prompt is one user turn)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.turn_labels == "role":
            labels = [m["role"] for m in messages]
        else:
            labels = [("user", "assistant")[k % 2] for k in range(len(messages))]
        turns = (
            self.turn.format(label=label, content=message_text(m))
            for label, m in zip(labels, messages, strict=True)
        )
        return "\n" + "".join(turns) + self.context_end


#: The named layouts. ``"rlhflow"`` is what the card's context template renders to under transformers' chat
#: template settings (``trim_blocks`` drops the newline after each ``{% … %}`` tag, Jinja the template's last).
LAYOUTS: dict[str, PairLayout] = {
    "rh_trl": PairLayout(
        "\n\n<turn> {label}\n {content}", "\n\n\n", "role", generation_prompt=True, bos="leading"
    ),
    "rlhflow": PairLayout(
        "\n<turn> {label}\n {content}", "\n", "position", generation_prompt=False, bos="every"
    ),
}


def get_layout(layout: str | PairLayout) -> PairLayout:
    """A layout by name (or the layout itself); an unknown name is an error that lists the names."""
    if isinstance(layout, PairLayout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pairwise layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def registered_layout(name: str | os.PathLike | None) -> str | PairLayout | None:
    """The ``layout`` the model registry gives a model's hub id for :class:`PairwisePM` (``name`` is a hub id
    or a hub-cache snapshot path, e.g. a loaded model's ``name_or_path``); ``None`` when it gives none."""
    if not name:
        return None
    entry = lookup(hub_id_from_path(name) or os.fspath(name))
    if entry is None or entry.target is None:
        return None
    target = resolve_target(entry.target)
    if not (isinstance(target, type) and issubclass(target, PairwisePM)):
        return None
    return entry.options.get("layout")


def flatten_context(prompt: str | list[dict[str, Any]], layout: str | PairLayout = "rh_trl") -> str:
    """The prompt conversation as the pairwise model's context in ``layout`` (a string prompt is one user
    turn)."""
    return get_layout(layout).context(prompt)


def response_text(value: Any) -> str:
    """A completion or reference (string or message list) as plain text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(message_text(m) for m in value)
    raise RewardInputError(f"expected a string or a list of messages, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Who is compared with whom
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Opponents:
    """The comparisons a batch needs: each sample's opponents, as other completions or reference texts.

    ``groups`` holds the call's groups (each sample is compared with the other members of its group; on several
    processes, the groups of the whole call, see :func:`~rh_trl.rewards.grouping.call_groups`); ``references`` is set
    instead when every sample is compared with its own reference response.
    """

    groups: CallGroups | None = None
    references: list[Any] | None = None

    def own_pairs(self) -> list[tuple[int, int]]:
        """Every ordered comparison ``(i, j)`` that opens with one of this process's completions ``i``: together,
        the processes run each ordered comparison of the call once."""
        groups = self.groups
        assert groups is not None
        return [(i, j) for g in groups.groups for i in groups.local_members(g) for j in g if j != i]


def find_opponents(
    batch: Batch, group_size: int | None, reference_column: str | None, name: str
) -> Opponents:
    """The comparisons for a batch: against ``batch.columns[reference_column]`` when the call has that column,
    else among the completions of the same prompt in the whole call (:func:`~rh_trl.rewards.grouping.call_groups`;
    ``group_size`` switches to consecutive runs)."""
    if reference_column is not None and batch.columns.get(reference_column) is not None:
        refs = list(batch.columns[reference_column])
        if len(refs) != len(batch):
            raise RewardInputError(
                f"{name}: column '{reference_column}' has {len(refs)} values for {len(batch)} completions; "
                "expected one reference per completion"
            )
        return Opponents(references=refs)
    try:
        return Opponents(groups=call_groups(batch.samples, batch.ranks, group_size))
    except RewardInputError as err:
        raise RewardInputError(f"{name}: {err}") from None


def group_win_rates(
    groups: CallGroups, prob: dict[tuple[int, int], float | None]
) -> tuple[list[float | None], int]:
    """Each of this process's samples' mean ``prob[(i, j)]`` over the other members ``j`` of its group (``None``
    values skipped), in the batch's order.

    Returns the win rates and the number of samples left without any opponent.
    """
    rates: dict[int, float | None] = {}
    alone = 0
    for members in groups.groups:
        for i in groups.local_members(members):
            values = [prob[(i, j)] for j in members if j != i and prob.get((i, j)) is not None]
            if values:
                rates[i] = sum(values) / len(values)  # type: ignore[arg-type]
            else:
                alone += 1
    return [rates.get(i) for i in groups.local], alone


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


ANSWERS = ("A", "B")


def answer_token_ids(tokenizer: Any) -> list[int]:
    """The ids of the answers ``A`` and ``B``, each of which must be a single token."""
    ids = []
    for letter in ANSWERS:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"the tokenizer splits '{letter}' into {len(encoded)} tokens {encoded}; a pairwise preference "
                "model needs 'A' and 'B' to be single tokens (its answer is read from their two logits)"
            )
        ids.append(int(encoded[0]))
    return ids


def render_comparison(
    tokenizer: Any,
    context: str,
    response_a: str,
    response_b: str,
    *,
    layout: str | PairLayout = "rh_trl",
    chat_template: str | None = None,
    strip_bos: bool = True,
) -> str:
    """The text a pairwise model reads for a flattened ``context`` and two response texts (A first): one user
    turn through the chat template, with the generation prompt and BOS removal of ``layout`` (``strip_bos=False``
    keeps the BOS)."""
    layout = get_layout(layout)
    content = PAIR_PROMPT.format(context=context, response_a=response_a, response_b=response_b)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}],
        chat_template=chat_template,
        tokenize=False,
        add_generation_prompt=layout.generation_prompt,
    )
    bos = getattr(tokenizer, "bos_token", None)
    if strip_bos and bos:
        if layout.bos == "every":
            text = text.replace(bos, "")
        elif text.startswith(bos):
            text = text[len(bos) :]
    return text


class _ChoiceLogits(torch.nn.Module):
    """A causal LM that returns only the logits of a few tokens at each row's last real position.

    The output projection runs on one hidden state per row and only the chosen vocabulary rows, so memory does
    not grow with sequence length × vocabulary size.
    """

    def __init__(self, lm: Any, token_ids: Sequence[int]) -> None:
        super().__init__()
        self.lm = lm
        self.token_ids = list(token_ids)
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    @property
    def config(self) -> Any:
        return self.lm.config

    def get_input_embeddings(self) -> Any:
        return self.lm.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        last = attention_mask.sum(dim=1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        head = self.lm.get_output_embeddings()
        ids = torch.tensor(self.token_ids, device=h.device)
        if hasattr(head.weight, "ds_id"):  # sharded (ZeRO-3): the head's own forward gathers its weight
            logits = head(h)[:, ids]
        else:
            logits = h @ head.weight[ids].T
            if getattr(head, "bias", None) is not None:
                logits = logits + head.bias[ids]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _read_choices(
    outputs: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    return outputs


class PairwisePM(Reward):
    """A pairwise preference model (a causal LM that answers ``A`` or ``B``) as a TRL reward function.

    Args:
        model: a model directory, a hub id, or a loaded causal LM.
        tokenizer: its tokenizer (object or path); by default loaded from ``model``. ``"A"`` and ``"B"`` must
            each be one token.
        name: metric name (default ``pairpm_<model name>``, made unique).
        group_size: by default a completion's opponents are the other completions of the same prompt wherever
            they sit (GRPO's groups, online DPO's pairs); ``group_size`` (TRL's ``num_generations``) uses
            consecutive runs of that many completions instead, each run of one prompt.
        reference_column: a dataset column with a reference response per row; when a call has it, each
            completion is scored by its win probability against its reference instead of its group.
        temperature: divides the two logits before the softmax.
        layout: ``"rh_trl"`` (what ``recipes/train_pairwise.py`` trains on) or ``"rlhflow"`` (the published
            inference code of RLHFlow's pairwise models, token for token), or a :class:`PairLayout`; see the
            module docstring. By default, the layout the model registry gives the model's hub id (``"rlhflow"``
            for ``RLHFlow/pair-preference-model-*``), else ``"rh_trl"``.
        strip_bos: remove the BOS text as the layout says; ``False`` keeps it.
        chat_template: a Jinja template to use instead of the tokenizer's.
        max_length: a comparison longer than this many tokens gets no probability (counted as ``too_long``);
            so does one longer than the engine takes.
        engine: ``"hf"`` (transformers in this process), ``"vllm"`` (an in-process ``vllm.LLM`` gives the final
            hidden state at the last token, and the ``A``/``B`` rows of the output projection, read from the
            checkpoint, give the two logits: :class:`~rh_trl.engines.chosen_logits.ChosenLogits`), ``"openai"``
            (the same hidden state from ``vllm serve DIR --runner pooling --convert embed``; ``model`` is the
            server's URL or replicas' URLs, and ``tokenizer`` the checkpoint's directory, whose output rows are
            read), or an already-built ``VLLMPoolingEngine(path, task="embed")`` to share. The same numbers from
            each.
        served_model, api_key, batch_size, max_concurrency, retry, transport: the ``"openai"`` engine (see
            :class:`~rh_trl.engines.vllm_pooling.VLLMPoolingClient`).
        vllm_kwargs: passed to ``vllm.LLM`` with ``engine="vllm"``.
        max_tokens_per_batch, max_batch_size, device, device_map, dtype, progress, zero3: see
            :class:`~rh_trl.ORM`.
        strict: raise on a malformed sample instead of giving it ``None``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        engine: str | Any = "hf",
        name: str | None = None,
        group_size: int | None = None,
        reference_column: str | None = "reference",
        temperature: float = 1.0,
        layout: str | PairLayout | None = None,
        strip_bos: bool = True,
        chat_template: str | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        device: str | torch.device | None = None,
        device_map: Any = None,
        dtype: str | torch.dtype | None = "auto",
        zero3: bool = False,
        served_model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 8,
        retry: RetryPolicy | None = None,
        transport: Any = None,
        vllm_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM

        kind, shared = engine_argument(engine, "embed", pooling="last")
        check_zero3(zero3, kind)
        if group_size is not None and group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (a completion needs an opponent), got {group_size}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if layout is not None:
            get_layout(layout)  # an unknown name fails before the weights load
        self.engine_kind = kind
        self.model: Any = None
        if kind == "hf":
            self.model = load_model(
                model,
                AutoModelForCausalLM,
                dtype=dtype,
                device=device,
                device_map=device_map,
                trust_remote_code=trust_remote_code,
                zero3=zero3,
            )
            self.tokenizer = load_tokenizer(tokenizer, self.model, trust_remote_code=trust_remote_code)
            source: Any = getattr(self.model, "name_or_path", None)
        else:
            if kind == "openai" and not isinstance(tokenizer, str | os.PathLike):
                raise ValueError(
                    "engine='openai' needs tokenizer= (the checkpoint's directory or hub id): tokenization is done "
                    "here, and the A/B rows of the output projection are read from the checkpoint"
                )
            source = os.fspath(model if kind == "vllm" else tokenizer)
            self.tokenizer = load_tokenizer(
                source if tokenizer is None else tokenizer, None, trust_remote_code=trust_remote_code
            )
        self.layout = get_layout(layout or registered_layout(source) or "rh_trl")
        model_name = Path(str(source or "model")).name
        super().__init__(name=name, default_name=f"pairpm_{model_name}", strict=strict)
        self.template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not self.template:
            raise ValueError(
                "the pairwise model's tokenizer has no chat template; pass chat_template='…' (the template the "
                "model was trained with)"
            )
        self.token_ids = answer_token_ids(self.tokenizer)
        self.group_size = group_size
        self.reference_column = reference_column
        self.temperature = temperature
        self.strip_bos = strip_bos
        self.max_length = max_length
        if kind == "hf":
            self.engine: Any = HFEngine(
                _ChoiceLogits(self.model, self.token_ids),
                padding_id(self.tokenizer),
                max_tokens_per_batch,
                max_batch_size,
                progress=progress,
                sharded=zero3,
            )
        else:
            self.engine = build_pooling_engine(
                kind,
                model,
                "embed",
                shared=shared,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                vllm_kwargs=vllm_kwargs,
                pooling="last",
                model=served_model,
                api_key=api_key,
                batch_size=batch_size,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
            self.chosen = ChosenLogits.from_checkpoint(source, self.token_ids, trust_remote_code)

    # -- rendering ------------------------------------------------------------------------------------------------

    def render(self, prompt: Any, response_a: Any, response_b: Any) -> str:
        """The text the model reads for one ordered comparison (A first)."""
        return render_comparison(
            self.tokenizer,
            self.layout.context(prompt),
            response_text(response_a),
            response_text(response_b),
            layout=self.layout,
            chat_template=self.template,
            strip_bos=self.strip_bos,
        )

    def encode(self, prompt: Any, response_a: Any, response_b: Any) -> list[int]:
        ids = self.tokenizer(self.render(prompt, response_a, response_b), add_special_tokens=False)[
            "input_ids"
        ]
        return list(ids)

    # -- probabilities --------------------------------------------------------------------------------------------

    def ordered_probs(
        self, triples: Sequence[tuple[Any, Any, Any]]
    ) -> tuple[list[float | None], dict[str, int]]:
        """P(first response better) for each ``(prompt, a, b)`` in that one order (no averaging)."""
        counts = {"too_long": 0, "render_failed": 0}
        if self.engine_kind == "openai":
            counts.update(server_failed=0, server_rejected=0)
        seqs: list[list[int]] = []
        todo: list[int] = []
        for k, (p, a, b) in enumerate(triples):
            try:
                ids = self.encode(p, a, b)
            except Exception as err:
                if self.strict:
                    raise RewardInputError(
                        f"{self.__name__}: comparison {k} could not be rendered: {err}"
                    ) from err
                counts["render_failed"] += 1
                logger.warning("%s: comparison %d could not be rendered: %s", self.__name__, k, err)
                continue
            if self.max_length is not None and len(ids) > self.max_length:
                counts["too_long"] += 1
                continue
            seqs.append(ids)
            todo.append(k)
        rows, reasons = self.choice_logits(seqs)
        for key, n in reason_counts(reasons).items():
            counts[key] = counts.get(key, 0) + n
        probs: list[float | None] = [None] * len(triples)
        for k, row in zip(todo, rows, strict=True):
            if row is not None:
                probs[k] = float(torch.softmax(row.double() / self.temperature, dim=-1)[0])
        if counts["too_long"]:
            logger.warning(
                "%s: %d comparison(s) are longer than max_length=%d tokens and get no probability",
                self.__name__,
                counts["too_long"],
                self.max_length,
            )
        return probs, counts

    def choice_logits(self, seqs: list[list[int]]) -> tuple[list[torch.Tensor | None], list[str | None]]:
        """The ``A`` and ``B`` logits at the end of each sequence (``None`` and a reason where an engine gave none)."""
        if self.engine_kind == "hf":
            return self.engine.run(seqs, _read_choices), [None] * len(seqs)
        if not seqs:
            return [], []
        hidden, reasons = pooled_rows(self.engine, seqs)
        return [None if h is None else self.chosen(h) for h in hidden], reasons

    def compare_many(
        self, prompts: Sequence[Any], responses_a: Sequence[Any], responses_b: Sequence[Any]
    ) -> list[float | None]:
        """P(a better than b) for each row, averaged over both orders; both orders run in one batch."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise RewardInputError(
                f"got {len(prompts)} prompts, {len(responses_a)} A responses and {len(responses_b)} B responses; "
                "expected one of each per comparison"
            )
        n = len(prompts)
        triples = [(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
        triples += [(p, b, a) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
        probs, _ = self.ordered_probs(triples)
        return [_average(probs[k], probs[n + k]) for k in range(n)]

    def compare(self, prompt: Any, response_a: Any, response_b: Any) -> float:
        """P(``response_a`` better than ``response_b``) for one prompt, averaged over both orders."""
        value = self.compare_many([prompt], [response_a], [response_b])[0]
        if value is None:
            raise RewardInputError(
                f"{self.__name__}: the comparison could not be scored (too long or unrenderable)"
            )
        return value

    # -- the reward -----------------------------------------------------------------------------------------------

    def rank_settings(self) -> Any:
        return ("groups", self.group_size, self.reference_column)

    def compute(self, batch: Batch) -> RewardOutput:
        opponents = find_opponents(batch, self.group_size, self.reference_column, self.__name__)
        n = len(batch)
        if opponents.references is not None:
            todo = [i for i, s in enumerate(batch.samples) if s is not None]
            triples = []
            for i in todo:
                s = batch.samples[i]
                ref = to_sample(s.prompt, opponents.references[i]).response  # type: ignore[union-attr]
                triples.append((s.prompt, s.response, ref))  # type: ignore[union-attr]
            probs_ab, counts = self.ordered_probs(triples + [(p, b, a) for p, a, b in triples])
            rewards: list[float | None] = [None] * n
            for k, i in enumerate(todo):
                rewards[i] = _average(probs_ab[k], probs_ab[len(todo) + k])
            return RewardOutput(rewards, counts)

        groups = opponents.groups
        assert groups is not None
        pairs = opponents.own_pairs()
        samples = groups.samples
        triples = [(samples[i].prompt, samples[i].response, samples[j].response) for i, j in pairs]  # type: ignore[union-attr]
        ordered, counts = self.ordered_probs(triples)
        first = groups.merge("comparisons", dict(zip(pairs, ordered, strict=True)))
        prob = {(i, j): _average(first[(i, j)], first[(j, i)]) for i, j in pairs}
        rewards, alone = group_win_rates(groups, prob)
        if alone:
            logger.warning(
                "%s: %d completion(s) get no reward: no other completion of their prompt in this call, or none "
                "of their comparisons scored; a '%s' column compares each completion with a reference",
                self.__name__,
                alone,
                self.reference_column,
            )
        counts["no_opponent"] = alone
        counts["comparisons"] = len(pairs)
        return RewardOutput(rewards, counts)


def _average(p_ab: float | None, p_ba: float | None) -> float | None:
    """P(A better) from both orders: ``(p_AB + 1 - p_BA) / 2``; one order alone when the other is missing."""
    if p_ab is None and p_ba is None:
        return None
    if p_ba is None:
        return p_ab
    if p_ab is None:
        return 1.0 - p_ba
    return (p_ab + 1.0 - p_ba) / 2.0
