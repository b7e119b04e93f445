"""Generative reward models: an LLM judge's verdict as a reward.

The judge runs on an OpenAI-compatible chat server (vLLM, SGLang, …; concurrent requests with retries) or
locally with transformers. Pointwise templates ask for a score per completion; the pairwise template asks which
of two responses is better and is asked in both orders (A vs B and B vs A) so that the judge's position bias
cancels. A verdict that cannot be read gives ``None`` (counted as ``num_unparsed``), a request that fails after
its retries gives ``None`` (``num_server_failed``); the judge's text goes to TRL's completions table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from rh_trl.engines.generation import ChatClient, ChatResult, HFGenerator
from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.formatting import RewardInputError, message_text, plain_conversation, to_sample
from rh_trl.loading import load_model, load_tokenizer
from rh_trl.rewards.base import Batch, Reward, RewardOutput
from rh_trl.rewards.genrm_templates import JudgeTemplate, builtin_template
from rh_trl.rewards.pairwise import find_opponents, group_win_rates, response_text

logger = logging.getLogger("rh_trl")

Conversation = list[dict[str, Any]]
BUILTIN_FIELDS = ("question", "response", "response_a", "response_b")


def question_text(prompt: str | Conversation) -> str:
    """The prompt as the judge reads it: a single user turn as is, longer conversations flattened."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return message_text(prompt[0])
    return plain_conversation(prompt)


class GenRM(Reward):
    """An LLM judge as a TRL reward function.

    Engines (one of them):

    * a server: ``GenRM("Qwen/Qwen2.5-72B-Instruct", base_url="http://host:8000/v1")`` — ``model`` is the served
      model's name; ``base_url`` may be a list of replicas;
    * local: ``GenRM(model_or_path, tokenizer)`` — generation with transformers in this process;
    * any object with ``generate_chat(conversations) -> list[str | None]`` as ``generator=`` (e.g. a scripted
      judge in tests).

    Args:
        template: a built-in template name (``"reward"``, ``"rating"``, ``"reward_reference"``,
            ``"rating_reference"``, ``"pairwise"``; see :mod:`rh_trl.rewards.genrm_templates`) or a
            :class:`JudgeTemplate`.
        normalize: divide built-in 1-to-10 ratings by 10.
        group_size, reference_column: for the pairwise template, who is compared with whom (as in
            :class:`~rh_trl.rewards.pairwise.PairwisePM`).
        max_new_tokens, temperature: sampling of the judge (greedy when ``temperature == 0``).
        api_key, max_concurrency, retry, extra_body, transport: the server client's settings
            (:class:`~rh_trl.engines.generation.ChatClient`).
        batch_size, chat_template_kwargs, device, dtype: the local engine's settings.
        name: metric name (default ``genrm_<model>``, made unique).
        strict: raise on a malformed sample instead of giving it ``None``.
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        base_url: str | Sequence[str] | None = None,
        generator: Any = None,
        template: str | JudgeTemplate = "reward",
        normalize: bool = True,
        name: str | None = None,
        group_size: int | None = None,
        reference_column: str | None = "reference",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        api_key: str | None = None,
        max_concurrency: int = 32,
        retry: RetryPolicy | None = None,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        batch_size: int = 8,
        chat_template_kwargs: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        self.template = builtin_template(template, normalize) if isinstance(template, str) else template
        self.columns = [f for f in self.template.fields() if f not in BUILTIN_FIELDS]
        needed = {"response_a", "response_b"} if self.template.pairwise else {"response"}
        missing = needed - set(self.template.fields())
        if missing:
            raise ValueError(
                f"the judge template never shows {sorted(missing)}; a "
                f"{'pairwise' if self.template.pairwise else 'pointwise'} template needs {sorted(needed)}"
            )
        self.group_size = group_size
        self.reference_column = reference_column
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.client: ChatClient | None = None
        self.generator: Any = generator
        if base_url is not None:
            if not isinstance(model, str):
                raise ValueError("with base_url=…, model must be the served model's name (a string)")
            self.client = ChatClient(
                base_url,
                model,
                api_key=api_key,
                max_tokens=max_new_tokens,
                temperature=temperature,
                extra_body=extra_body,
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
            label = model
        elif generator is None:
            if model is None:
                raise ValueError(
                    "GenRM needs a judge: model=… (local), model=… with base_url=…, or generator=…"
                )
            from transformers import AutoModelForCausalLM

            lm = load_model(model, AutoModelForCausalLM, dtype=dtype, device=device)
            tok = load_tokenizer(tokenizer, lm)
            self.generator = HFGenerator(
                lm,
                tok,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else 1.0,
                batch_size=batch_size,
                progress=progress,
            )
            label = str(getattr(lm, "name_or_path", "") or "model")
        else:
            label = type(generator).__name__
        super().__init__(name=name, default_name=f"genrm_{Path(label).name}", strict=strict)

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

    def judge(self, conversations: Sequence[Conversation]) -> tuple[list[str | None], int]:
        """The judge's answers (``None`` where the request failed for good) and the number of failures."""
        if not conversations:
            return [], 0
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
            return [r.text for r in results], len(failed)
        if isinstance(self.generator, HFGenerator):
            outputs = self.generator.generate_chat(conversations, **self.chat_template_kwargs)
            return [g.text for g in outputs], 0
        texts = list(self.generator.generate_chat(list(conversations)))
        if len(texts) != len(conversations):
            raise RuntimeError(
                f"{self.__name__}: the generator returned {len(texts)} answers for {len(conversations)} prompts"
            )
        return texts, sum(t is None for t in texts)

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
        return ("groups", self.group_size, self.reference_column) if self.template.pairwise else None

    def compute(self, batch: Batch) -> RewardOutput:
        if self.template.pairwise:
            return self._compute_pairwise(batch)
        todo = [i for i, s in enumerate(batch.samples) if s is not None]
        conversations = [self.pointwise_messages(batch, i) for i in todo]
        texts, failed = self.judge(conversations)
        values, unparsed = self._parse(texts)
        rewards: list[float | None] = [None] * len(batch)
        judgements: list[str | None] = [None] * len(batch)
        for i, value, text in zip(todo, values, texts, strict=True):
            rewards[i] = value
            judgements[i] = text
        counts = {"unparsed": unparsed, "server_failed": failed}
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
        texts, failed = self.judge(conversations)
        verdicts, unparsed = self._parse(texts)
        as_a = groups.merge("verdicts", dict(zip(pairs, verdicts, strict=True)))
        prob = {(i, j): _both_orders(as_a[(i, j)], as_a.get((j, i))) for i, j in pairs}
        judgements: dict[int, str | None] = {}
        for (i, _), text in zip(pairs, texts, strict=True):
            judgements.setdefault(i, text)
        rewards, alone = group_win_rates(groups, prob)
        counts = {
            "unparsed": unparsed,
            "server_failed": failed,
            "comparisons": len(conversations),
            "no_opponent": alone,
        }
        return RewardOutput(rewards, counts, {"judgement": [judgements.get(i) for i in groups.local]})

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
        texts, failed = self.judge(conversations)
        verdicts, unparsed = self._parse(texts)
        rewards: list[float | None] = [None] * len(batch)
        judgements: list[str | None] = [None] * len(batch)
        for k, i in enumerate(todo):
            rewards[i] = _both_orders(verdicts[2 * k], verdicts[2 * k + 1])
            judgements[i] = texts[2 * k]
        counts = {"unparsed": unparsed, "server_failed": failed, "comparisons": len(conversations)}
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
