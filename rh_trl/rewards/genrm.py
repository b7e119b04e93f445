"""Generative reward models: an LLM judge's verdict as a reward.

The judge runs on an OpenAI-compatible chat server (vLLM, SGLang, …; concurrent requests with retries) or
locally with transformers. Pointwise templates ask for a score per completion; the pairwise template asks which
of two responses is better and is asked in both orders (A vs B and B vs A) so that the judge's position bias
cancels. A verdict that cannot be read gives ``None`` (counted as ``num_unparsed``), a request that fails after
its retries gives ``None`` (``num_server_failed``); the judge's text goes to TRL's completions table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from rh_trl.engines.generation import ChatClient, ChatResult, HFGenerator, TokenGenerator
from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.engines.vllm_llm import engine_kind
from rh_trl.formatting import RewardInputError, message_text, plain_conversation, to_sample
from rh_trl.models.loading import load_model, load_tokenizer
from rh_trl.options import deprecated
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.genrm_templates import JudgeTemplate, builtin_template, number_responses
from rh_trl.rewards.grouping import call_groups
from rh_trl.rewards.pairwise import find_opponents, group_win_rates, response_text

logger = logging.getLogger("rh_trl")

Conversation = list[dict[str, Any]]
BUILTIN_FIELDS = ("question", "response", "response_a", "response_b", "responses", "count")


def _judge_label(engine: Any, model: Any, served_model: str | None) -> str:
    """A short name of the judge for the default metric name."""
    if isinstance(engine, ChatClient):
        return served_model or "judge"
    if isinstance(engine, TokenGenerator) and isinstance(model, str | os.PathLike):
        return Path(os.fspath(model)).name
    lm = getattr(engine, "model", None)
    if lm is not None and getattr(lm, "name_or_path", None):
        return Path(str(lm.name_or_path)).name
    return type(engine).__name__


def question_text(prompt: str | Conversation) -> str:
    """The prompt as the judge reads it: a single user turn as is, longer conversations flattened."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return message_text(prompt[0])
    return plain_conversation(prompt)


class GenRM(Reward):
    """An LLM judge as a TRL reward function.

    The judge runs where ``engine`` says:

    * ``"hf"`` (default): generation with transformers in this process; ``model`` is a directory, a hub id or a
      loaded causal LM;
    * ``"vllm"``: generation with an in-process ``vllm.LLM`` (``model`` a directory or hub id), from the same token
      ids as ``"hf"``, so greedy verdicts are the same;
    * ``"openai"``: an OpenAI-compatible chat server (``vllm serve``, SGLang, …); ``model`` is its base URL or a
      list of replicas' URLs, ``served_model`` the name it serves the judge under (default: its only model);
    * an engine object: a :class:`~rh_trl.engines.generation.TokenGenerator` (``HFGenerator``,
      :class:`~rh_trl.engines.vllm_generation.VLLMGenerator`) or a ``ChatClient`` shared by several judges, or
      any object with ``generate_chat(conversations) -> list[str | None]`` (e.g. a scripted judge in tests).

    Args:
        template: a built-in template name (``"reward"``, ``"rating"``, ``"reward_reference"``,
            ``"rating_reference"``, ``"pairwise"``, ``"listwise"``; see :mod:`rh_trl.rewards.genrm_templates`) or
            a :class:`JudgeTemplate`. A pairwise template compares each completion with the others of its prompt
            (in both orders); a listwise template shows the judge a prompt's whole group at once and reads one
            score per completion. Both see the whole group, on several processes too.
        normalize: divide built-in 1-to-10 ratings by 10.
        group_size, reference_column: for the pairwise and listwise templates, who is compared with whom (as in
            :class:`~rh_trl.rewards.pairwise.PairwisePM`; listwise ignores references).
        max_new_tokens, temperature, top_p: sampling of the judge (greedy when ``temperature == 0``).
        seed: with sampling on ``"vllm"``, each judge prompt's sample is reproducible.
        served_model, api_key, max_concurrency, retry, extra_body, transport: the ``"openai"`` engine
            (:class:`~rh_trl.engines.generation.ChatClient`).
        batch_size, device, dtype: the ``"hf"`` engine's settings (``dtype`` also for ``"vllm"``).
        chat_template_kwargs: passed to the judge's chat template (``"openai"``: sent as vLLM's
            ``chat_template_kwargs``).
        vllm_kwargs: passed to ``vllm.LLM`` with ``engine="vllm"``.
        name: metric name (default ``genrm_<model>``, made unique).
        strict: raise on a malformed sample instead of giving it ``None``.
        base_url, generator: the former spellings of ``engine="openai"`` (with ``model`` the served name) and of an
            engine object; deprecated.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        engine: str | Any = "hf",
        template: str | JudgeTemplate = "reward",
        normalize: bool = True,
        name: str | None = None,
        group_size: int | None = None,
        reference_column: str | None = "reference",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        served_model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        retry: RetryPolicy | None = None,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        batch_size: int = 8,
        chat_template_kwargs: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        vllm_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        strict: bool = False,
        base_url: str | Sequence[str] | None = None,
        generator: Any = None,
    ) -> None:
        self.template = builtin_template(template, normalize) if isinstance(template, str) else template
        self.columns = [f for f in self.template.fields() if f not in BUILTIN_FIELDS]
        needed = self.template.needed_fields()
        missing = needed - set(self.template.fields())
        if missing:
            raise ValueError(
                f"the judge template never shows {sorted(missing)}; a {self.template.kind} template needs "
                f"{sorted(needed)}"
            )
        self.group_size = group_size
        self.reference_column = reference_column
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        if base_url is not None:
            deprecated("GenRM(model, base_url=URL)", "GenRM(URL, engine='openai', served_model=model)")
            model, served_model, engine = base_url, served_model or model, "openai"
        if generator is not None:
            deprecated("GenRM(generator=…)", "GenRM(engine=…)")
            engine = generator
        self.client: ChatClient | None = None
        self.generator: Any = None
        if isinstance(engine, ChatClient):
            self.client = engine
        elif not isinstance(engine, str):
            if not callable(getattr(engine, "generate_chat", None)):
                raise TypeError(
                    "engine= takes 'hf', 'vllm', 'openai' or an engine object with generate_chat(conversations); "
                    f"got a {type(engine).__name__}"
                )
            self.generator = engine
        elif engine_kind(engine) == "openai":
            if model is None:
                raise ValueError("engine='openai' needs the judge server's URL as model (or a list of URLs)")
            if self.chat_template_kwargs:
                extra_body = {"chat_template_kwargs": self.chat_template_kwargs, **(extra_body or {})}
            self.client = ChatClient(
                model,
                served_model,
                api_key=api_key,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if temperature > 0 else None,
                extra_body=extra_body,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
        elif model is None:
            raise ValueError(
                "GenRM needs a judge: model=… (a path or hub id, or a server URL with engine='openai')"
            )
        else:  # generation in this process: the same decoding settings on either engine
            sampling = {
                "max_new_tokens": max_new_tokens,
                "do_sample": temperature > 0,
                "temperature": temperature if temperature > 0 else 1.0,
                "top_p": top_p,
            }
            if engine == "vllm":
                from rh_trl.engines.vllm_generation import VLLMGenerator

                self.generator = VLLMGenerator(
                    model,
                    load_tokenizer(tokenizer if tokenizer is not None else model, None),
                    seed=seed,
                    dtype=dtype,
                    **sampling,
                    **(vllm_kwargs or {}),
                )
            else:
                from transformers import AutoModelForCausalLM

                lm = load_model(model, AutoModelForCausalLM, dtype=dtype, device=device)
                self.generator = HFGenerator(
                    lm, load_tokenizer(tokenizer, lm), batch_size=batch_size, progress=progress, **sampling
                )
        self.engine = self.client or self.generator
        super().__init__(
            name=name, default_name=f"genrm_{_judge_label(self.engine, model, served_model)}", strict=strict
        )

    # -- prompts --------------------------------------------------------------------------------------------------

    def _column_values(self, batch: Batch, i: int) -> dict[str, str]:
        values = {}
        for column in self.columns:
            if column not in batch.columns:
                available = sorted(batch.columns)
                raise RewardInputError(
                    f"{self.__name__}: the judge template uses the field {{{column}}}, but the dataset has no "
                    f"column '{column}'; available columns: {available}"
                )
            value = batch.columns[column][i]
            values[column] = value if isinstance(value, str) else response_text(value)
        return values

    def pointwise_messages(self, batch: Batch, i: int) -> Conversation:
        sample = batch.samples[i]
        assert sample is not None
        values = {"question": question_text(sample.prompt), "response": sample.response_text}
        values.update(self._column_values(batch, i))
        return self.template.messages(values)

    def pairwise_messages(self, batch: Batch, i: int, a: str, b: str) -> Conversation:
        sample = batch.samples[i]
        assert sample is not None
        values = {"question": question_text(sample.prompt), "response_a": a, "response_b": b}
        values.update(self._column_values(batch, i))
        return self.template.messages(values)

    # -- the judge ------------------------------------------------------------------------------------------------

    def judge(self, conversations: Sequence[Conversation]) -> tuple[list[str | None], dict[str, int]]:
        """The judge's answers (``None`` where a request failed for good, or a prompt left the engine no room to
        answer) and how many were lost each way (``server_failed``, ``too_long``)."""
        lost = {"server_failed": 0, "too_long": 0}
        if not conversations:
            return [], lost
        if self.client is not None:
            results: list[ChatResult] = run_sync(self.client.complete_many(list(conversations)))
            failed = [r for r in results if r.text is None]
            if failed:
                logger.error(
                    "%s: %d of %d judge request(s) failed and give no reward (first: %s)",
                    self.__name__,
                    len(failed),
                    len(results),
                    failed[0].error,
                )
            return [r.text for r in results], {**lost, "server_failed": len(failed)}
        if isinstance(self.generator, TokenGenerator):
            outputs = self.generator.generate_chat(conversations, **self.chat_template_kwargs)
            too_long = sum(g.reason == "too_long" for g in outputs)
            if too_long:
                logger.warning(
                    "%s: %d judge prompt(s) leave the engine no room to answer (max_model_len); they give no reward",
                    self.__name__,
                    too_long,
                )
            return [None if g.reason else g.text for g in outputs], {**lost, "too_long": too_long}
        texts = list(self.generator.generate_chat(list(conversations)))
        if len(texts) != len(conversations):
            raise RuntimeError(
                f"{self.__name__}: the generator returned {len(texts)} answers for {len(conversations)} prompts"
            )
        return texts, {**lost, "server_failed": sum(t is None for t in texts)}

    def _parse(self, texts: list[str | None]) -> tuple[list[float | None], int]:
        values = [self.template.parser.parse(t) for t in texts]
        unparsed = [
            k for k, (t, v) in enumerate(zip(texts, values, strict=True)) if t is not None and v is None
        ]
        if unparsed:
            logger.warning(
                "%s: %d judge answer(s) hold no readable verdict and give no reward (first: %r)",
                self.__name__,
                len(unparsed),
                (texts[unparsed[0]] or "")[-200:],
            )
        return values, len(unparsed)

    # -- the reward -----------------------------------------------------------------------------------------------

    def rank_settings(self) -> Any:
        if self.template.pairwise:
            return ("groups", self.group_size, self.reference_column)
        return ("groups", self.group_size) if self.template.listwise else None

    def compute(self, batch: Batch) -> RewardOutput:
        if self.template.pairwise:
            return self._compute_pairwise(batch)
        if self.template.listwise:
            return self._compute_listwise(batch)
        todo = [i for i, s in enumerate(batch.samples) if s is not None]
        conversations = [self.pointwise_messages(batch, i) for i in todo]
        texts, lost = self.judge(conversations)
        values, unparsed = self._parse(texts)
        rewards: list[float | None] = [None] * len(batch)
        judgements: list[str | None] = [None] * len(batch)
        for i, value, text in zip(todo, values, texts, strict=True):
            rewards[i] = value
            judgements[i] = text
        counts = {"unparsed": unparsed, **lost}
        return RewardOutput(rewards, counts, {"judgement": judgements})

    def _compute_pairwise(self, batch: Batch) -> RewardOutput:
        opponents = find_opponents(batch, self.group_size, self.reference_column, self.__name__)
        if opponents.references is not None:
            return self._against_references(batch, opponents.references)
        groups = opponents.groups
        assert groups is not None
        # each process asks the judge the comparisons its own completions open (as response A): together the
        # processes ask every ordered comparison of the call once, and each verdict pair comes from both orders
        pairs = opponents.own_pairs()
        local = dict(zip(groups.local, range(len(batch)), strict=True))
        conversations = [
            self.pairwise_messages(
                batch, local[i], groups.samples[i].response_text, groups.samples[j].response_text
            )  # type: ignore[union-attr]
            for i, j in pairs
        ]
        texts, lost = self.judge(conversations)
        verdicts, unparsed = self._parse(texts)
        as_a = groups.merge("verdicts", dict(zip(pairs, verdicts, strict=True)))
        prob = {(i, j): _both_orders(as_a[(i, j)], as_a.get((j, i))) for i, j in pairs}
        judgements: dict[int, str | None] = {}
        for (i, _), text in zip(pairs, texts, strict=True):
            judgements.setdefault(i, text)
        rewards, alone = group_win_rates(groups, prob)
        counts = {
            "unparsed": unparsed,
            **lost,
            "comparisons": len(conversations),
            "no_opponent": alone,
        }
        return RewardOutput(rewards, counts, {"judgement": [judgements.get(i) for i in groups.local]})

    def _compute_listwise(self, batch: Batch) -> RewardOutput:
        """One judge call per group, showing all its completions; each gets its own score from the answer.

        On several processes the process that holds a group's first completion asks the judge, and shares the
        scores with the processes that hold the rest of the group.
        """
        try:
            groups = call_groups(batch.samples, batch.ranks, self.group_size)
        except RewardInputError as err:
            raise RewardInputError(f"{self.__name__}: {err}") from None
        local = dict(zip(groups.local, range(len(batch)), strict=True))
        led = [g for g in groups.groups if g[0] in local]
        conversations = []
        for members in led:
            responses = [groups.samples[i].response_text for i in members]  # type: ignore[union-attr]
            values = {
                "question": question_text(groups.samples[members[0]].prompt),  # type: ignore[union-attr]
                "responses": number_responses(responses),
                "count": str(len(members)),
            }
            values.update(self._column_values(batch, local[members[0]]))
            conversations.append(self.template.messages(values))
        texts, lost = self.judge(conversations)
        found: dict[int, tuple[float | None, str | None]] = {}
        unparsed = 0
        for members, text in zip(led, texts, strict=True):
            scores = self.template.parser.parse(text, len(members))  # type: ignore[call-arg]
            if scores is None and text is not None:
                unparsed += 1
            for k, i in enumerate(members):
                found[i] = (None if scores is None else scores[k], text)
        if unparsed:
            logger.warning(
                "%s: %d listwise judge answer(s) hold no readable 'Scores: [...]' with one score per response; "
                "their completions get no reward",
                self.__name__,
                unparsed,
            )
        found = groups.merge("listwise", found)
        rewards = [found.get(i, (None, None))[0] for i in groups.local]
        judgements = [found.get(i, (None, None))[1] for i in groups.local]
        counts = {"unparsed": unparsed, **lost, "judge_calls": len(conversations)}
        return RewardOutput(rewards, counts, {"judgement": judgements})

    def _against_references(self, batch: Batch, references: list[Any]) -> RewardOutput:
        """Each completion judged against its own reference, in both orders."""
        todo = [i for i, s in enumerate(batch.samples) if s is not None]
        conversations = []
        for i in todo:
            sample = batch.samples[i]
            assert sample is not None
            ref = to_sample(sample.prompt, references[i]).response_text
            conversations.append(self.pairwise_messages(batch, i, sample.response_text, ref))
            conversations.append(self.pairwise_messages(batch, i, ref, sample.response_text))
        texts, lost = self.judge(conversations)
        verdicts, unparsed = self._parse(texts)
        rewards: list[float | None] = [None] * len(batch)
        judgements: list[str | None] = [None] * len(batch)
        for k, i in enumerate(todo):
            rewards[i] = _both_orders(verdicts[2 * k], verdicts[2 * k + 1])
            judgements[i] = texts[2 * k]
        counts = {"unparsed": unparsed, **lost, "comparisons": len(conversations)}
        return RewardOutput(rewards, counts, {"judgement": judgements})


def _both_orders(first: float | None, second: float | None) -> float | None:
    """P(i better) from the verdict with i as A (``first``) and with i as B (``second``, 1 = B won)."""
    if first is None and second is None:
        return None
    if second is None:
        return first
    if first is None:
        return 1.0 - second
    return (first + 1.0 - second) / 2.0
