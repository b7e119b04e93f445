"""Critique-out-Loud (CLoud) reward models: the model writes a critique of the response, then scores it.

A CLoud reward model is a causal LM with a reward head (dense → tanh → linear) on its last hidden state. Scoring
one (prompt, response):

1. render ``prompt + response`` with the model's chat template, then open a user turn that holds the preamble
   ``"The following is a break down on the correctness and usefulness of the assistant's response to my
   question: "`` and leave it open;
2. the LM continues that user turn: the critique (greedy, at most ``max_new_tokens``, until the end-of-turn
   token), generated locally in left-padded batches or by a chat server;
3. append the critique and the end-of-turn token, run one forward pass, and read the reward head at that last
   end-of-turn token.

:class:`CLoudModel` is a ``PreTrainedModel`` with its own config class, so it saves and loads with
``save_pretrained``/``from_pretrained`` (and ``AutoModel``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rh_trl.engines.generation import ChatClient, HFGenerator
from rh_trl.engines.hf import HFEngine
from rh_trl.engines.http import RetryPolicy, run_sync
from rh_trl.formatting import RewardInputError, Sample
from rh_trl.loading import load_model, load_tokenizer, padding_id
from rh_trl.rewards.base import Batch, Reward, RewardOutput

logger = logging.getLogger("rh_trl")

CLOUD_PREAMBLE = "The following is a break down on the correctness and usefulness of the assistant's response to my question: "


class CLoudConfig(PretrainedConfig):
    """Config of a :class:`CLoudModel`: the base causal LM's config (``base_config``, a dict) and the head."""

    model_type = "rh_trl_cloud"

    def __init__(self, base_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.base_config = dict(base_config or {})
        super().__init__(**kwargs)

    def base(self) -> PretrainedConfig:
        """The base LM's config object."""
        settings = dict(self.base_config)
        model_type = settings.pop("model_type", None)
        if model_type is None:
            raise ValueError(
                "CLoudConfig.base_config has no 'model_type'; expected the base LM's config.to_dict()"
            )
        return AutoConfig.for_model(model_type, **settings)

    @property
    def hidden_size(self) -> int:  # type: ignore[override]
        return int(self.base_config["hidden_size"])


@dataclass
class CLoudOutput(ModelOutput):
    """``rewards``: the reward head at every position, shape ``[batch, seq_len]``."""

    rewards: torch.Tensor | None = None


class CLoudHead(torch.nn.Module):
    """dense → tanh → linear, from a hidden state to one reward."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(hidden_size, hidden_size)
        self.out_proj = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden))).squeeze(-1)


class CLoudModel(PreTrainedModel):
    """A causal LM (``self.lm``, which writes critiques) with a reward head (``self.reward_head``).

    Build one from an existing LM with :meth:`from_causal_lm`; load a saved one with ``from_pretrained``.
    ``forward`` returns the reward head at every position (no LM logits: use ``self.lm`` to generate).
    """

    config_class = CLoudConfig
    base_model_prefix = "cloud"
    _no_split_modules: list[str] = []

    def __init__(self, config: CLoudConfig, lm: Any = None) -> None:
        super().__init__(config)
        self.lm = lm if lm is not None else AutoModelForCausalLM.from_config(config.base())
        self._no_split_modules = list(getattr(self.lm, "_no_split_modules", None) or [])
        self.reward_head = CLoudHead(config.hidden_size)
        self.post_init()

    @classmethod
    def from_causal_lm(cls, lm: Any) -> CLoudModel:
        """A CLoud model around a loaded causal LM, with a freshly initialized reward head."""
        config = CLoudConfig(base_config=lm.config.to_dict())
        return cls(config, lm=lm).to(lm.device)

    def get_input_embeddings(self) -> Any:
        return self.lm.get_input_embeddings()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> CLoudOutput:
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        return CLoudOutput(rewards=self.reward_head(hidden))


AutoConfig.register(CLoudConfig.model_type, CLoudConfig, exist_ok=True)
AutoModel.register(CLoudConfig, CLoudModel, exist_ok=True)


def _read_last_reward(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    last = attention_mask.sum(dim=1) - 1
    return outputs.rewards[torch.arange(input_ids.shape[0], device=input_ids.device), last].unsqueeze(-1)


@dataclass
class CritiqueLayout:
    """Where a critique goes: the rendered text up to the open preamble turn, and the end-of-turn token."""

    prefix: str
    end_of_turn_id: int
    end_of_turn_text: str


class CLoud(Reward):
    """A Critique-out-Loud reward model as a TRL reward function.

    Args:
        model: a :class:`CLoudModel`, or a directory / hub id saved from one.
        tokenizer: its tokenizer (object or path); by default loaded from ``model``. It needs a chat template.
        name: metric name (default ``cloud_<model name>``, made unique).
        preamble: the text that opens the critique turn (the CLoud default unless the model was trained with
            another).
        max_new_tokens: longest critique, in tokens (a critique cut there is counted as ``critique_truncated``).
        critique_url, critique_model: generate critiques on an OpenAI-compatible server that serves this model's
            LM as ``critique_model`` (vLLM: the request continues the open user turn with
            ``continue_final_message``); scoring stays local. A critique that fails gives ``None``
            (``num_critique_failed``).
        batch_size: prompts per local ``generate`` call.
        max_tokens_per_batch, max_batch_size: the scoring engine's micro-batch budget.
        chat_template: a Jinja template to use instead of the tokenizer's.
        device, dtype, progress, strict: as for :class:`~rh_trl.ORM`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        preamble: str = CLOUD_PREAMBLE,
        max_new_tokens: int = 1024,
        critique_url: str | Sequence[str] | None = None,
        critique_model: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 32,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        batch_size: int = 8,
        max_tokens_per_batch: int = 16384,
        max_batch_size: int | None = None,
        chat_template: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        progress: bool = False,
        strict: bool = False,
    ) -> None:
        if not preamble.strip():
            raise ValueError("preamble must hold some text: the critique turn is found by it")
        self.model = load_model(model, CLoudModel, dtype=dtype, device=device)
        if not isinstance(self.model, CLoudModel):
            raise TypeError(
                f"expected a CLoudModel (or a directory saved from one), got {type(self.model).__name__}; wrap a "
                "causal LM with CLoudModel.from_causal_lm(lm)"
            )
        self.tokenizer = load_tokenizer(tokenizer, self.model)
        model_name = Path(str(getattr(self.model, "name_or_path", "") or "model")).name
        super().__init__(name=name, default_name=f"cloud_{model_name}", strict=strict)
        self.template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not self.template:
            raise ValueError("the CLoud model's tokenizer has no chat template; pass chat_template='…'")
        self.preamble = preamble
        self.max_new_tokens = max_new_tokens
        probe = self.layout([{"role": "user", "content": "x"}], [{"role": "assistant", "content": "y"}])
        stops = [probe.end_of_turn_id]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and eos not in stops:
            stops.append(int(eos))
        self.generator = HFGenerator(
            self.model.lm,
            self.tokenizer,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_token_ids=stops,
            progress=progress,
        )
        self.client: ChatClient | None = None
        if critique_url is not None:
            if not critique_model:
                raise ValueError("critique_url=… needs critique_model=… (the served model's name)")
            self.client = ChatClient(
                critique_url,
                critique_model,
                api_key=api_key,
                max_tokens=max_new_tokens,
                temperature=0.0,
                extra_body={"continue_final_message": True, "add_generation_prompt": False},
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
        self.engine = HFEngine(
            self.model, padding_id(self.tokenizer), max_tokens_per_batch, max_batch_size, progress=progress
        )

    # -- layout ---------------------------------------------------------------------------------------------------

    def conversation(self, prompt: Any, response: Any) -> list[dict[str, Any]]:
        """``prompt + response + [user: preamble]`` (strings become a user turn and an assistant turn)."""
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        response = (
            [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
        )
        return [*prompt, *response, {"role": "user", "content": self.preamble}]

    def layout(self, prompt: Any, response: Any) -> CritiqueLayout:
        """Render the conversation and cut it right after the preamble, leaving the critique turn open."""
        text = self.tokenizer.apply_chat_template(
            self.conversation(prompt, response), chat_template=self.template, tokenize=False
        )
        core = self.preamble.rstrip()
        at = text.rfind(core)
        if at < 0:
            raise RewardInputError(
                "the chat template did not reproduce the critique preamble; expected it in the last user turn"
            )
        cut = at + len(core)
        tail = self.preamble[len(core) :]
        if tail and text.startswith(tail, cut):  # templates that keep trailing whitespace keep it here too
            cut += len(tail)
        suffix_ids = self.tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
        if not suffix_ids:
            raise RewardInputError(
                "the chat template closes the user turn with nothing; no end-of-turn token"
            )
        eot = int(suffix_ids[0])
        return CritiqueLayout(text[:cut], eot, self.tokenizer.decode([eot]))

    def score_ids(self, layout: CritiqueLayout, critique: str) -> list[int]:
        """Token ids of the rendered conversation, the critique and the closing end-of-turn token."""
        ids = list(
            self.tokenizer(layout.prefix + critique + layout.end_of_turn_text, add_special_tokens=False)[
                "input_ids"
            ]
        )
        if not ids or ids[-1] != layout.end_of_turn_id:
            ids = list(self.tokenizer(layout.prefix + critique, add_special_tokens=False)["input_ids"])
            ids.append(layout.end_of_turn_id)
        return ids

    # -- critiques ------------------------------------------------------------------------------------------------

    def critiques(
        self, samples: Sequence[Sample], layouts: Sequence[CritiqueLayout]
    ) -> tuple[list[str | None], dict[str, int]]:
        """One critique per sample (``None`` where the server failed for good)."""
        if self.client is not None:
            conversations = [self.conversation(s.prompt, s.response) for s in samples]
            results = run_sync(self.client.complete_many(conversations))
            failed = [r for r in results if r.text is None]
            if failed:
                logger.error(
                    "%s: %d critique request(s) failed; those samples get no reward (first: %s)",
                    self.__name__,
                    len(failed),
                    failed[0].error,
                )
            truncated = sum(r.finish_reason == "length" for r in results)
            texts = [None if r.text is None else r.text.strip() for r in results]
            return texts, {"critique_failed": len(failed), "critique_truncated": truncated}
        prefixes = [self.tokenizer(lay.prefix, add_special_tokens=False)["input_ids"] for lay in layouts]
        outputs = self.generator.generate(prefixes)
        truncated = sum(not g.finished for g in outputs)
        return [g.text.strip() for g in outputs], {"critique_failed": 0, "critique_truncated": truncated}

    # -- the reward -----------------------------------------------------------------------------------------------

    def compute(self, batch: Batch) -> RewardOutput:
        n = len(batch)
        todo: list[int] = []
        layouts: list[CritiqueLayout] = []
        render_failed = 0
        for i, sample in enumerate(batch.samples):
            if sample is None:
                continue
            try:
                layouts.append(self.layout(sample.prompt, sample.response))
                todo.append(i)
            except Exception as err:
                if self.strict:
                    raise RewardInputError(
                        f"{self.__name__}: sample {i} could not be rendered: {err}"
                    ) from err
                render_failed += 1
                logger.warning("%s: sample %d could not be rendered: %s", self.__name__, i, err)
        samples = [batch.samples[i] for i in todo]
        texts, counts = (
            self.critiques(samples, layouts)
            if todo
            else ([], {"critique_failed": 0, "critique_truncated": 0})
        )  # type: ignore[arg-type]
        scored = [k for k, t in enumerate(texts) if t is not None]
        rows = (
            self.engine.run([self.score_ids(layouts[k], texts[k]) for k in scored], _read_last_reward)
            if scored
            else []
        )  # type: ignore[arg-type]
        rewards: list[float | None] = [None] * n
        critiques: list[str | None] = [None] * n
        for k, row in zip(scored, rows, strict=True):
            rewards[todo[k]] = float(row[0])
        for k, i in enumerate(todo):
            critiques[i] = texts[k]
        counts["render_failed"] = render_failed
        return RewardOutput(rewards, counts, {"critique": critiques})
