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
import os
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
from rh_trl.engines.vllm_llm import engine_kind
from rh_trl.formatting import RewardInputError, Sample
from rh_trl.models.loading import load_model, load_tokenizer, padding_id, temporary_folder
from rh_trl.options import deprecated
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
        engine: where critiques are generated. ``"hf"``: transformers in this process. ``"vllm"``: an in-process
            ``vllm.LLM`` of the model's LM (written once to a temporary directory), from the same token ids, so
            greedy critiques are the same. ``"openai"``: an OpenAI-compatible server that serves the model's LM
            (the request continues the open user turn with vLLM's ``continue_final_message``); ``model`` is then
            the server's URL (or replicas' URLs), and the CLoud checkpoint, whose head scores here, is
            ``checkpoint`` (a directory, hub id or ``CLoudModel``), by default ``tokenizer`` (a directory or hub
            id holding both). A critique that fails gives ``None`` (``num_critique_failed``).
        score_engine: where the reward head reads the critiqued conversation: ``"hf"`` (the model in this
            process) or ``"vllm"`` (the LM's final hidden state at the last token from an in-process vLLM pooling
            runner, then the head here; the transformers model is then not kept). Default: ``"vllm"`` with
            ``engine="vllm"``, else ``"hf"``.
        served_model, api_key, max_concurrency, retry, transport: the ``"openai"`` engine (``served_model``: the
            name the server serves the LM under; default: its only model).
        vllm_kwargs: passed to ``vllm.LLM`` (both engines) with ``engine="vllm"`` / ``score_engine="vllm"``.
        batch_size: prompts per local ``generate`` call.
        max_tokens_per_batch, max_batch_size: the ``"hf"`` scoring engine's micro-batch budget.
        chat_template: a Jinja template to use instead of the tokenizer's.
        device, dtype, progress, strict: as for :class:`~rh_trl.ORM`.
        critique_url, critique_model: the former spelling of ``engine="openai"`` (with ``model`` the checkpoint and
            ``critique_model`` the served name); deprecated.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        preamble: str = CLOUD_PREAMBLE,
        max_new_tokens: int = 1024,
        engine: str = "hf",
        score_engine: str | None = None,
        served_model: str | None = None,
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
        vllm_kwargs: dict[str, Any] | None = None,
        progress: bool = False,
        strict: bool = False,
        checkpoint: Any = None,
        critique_url: str | Sequence[str] | None = None,
        critique_model: str | None = None,
    ) -> None:
        if not preamble.strip():
            raise ValueError("preamble must hold some text: the critique turn is found by it")
        engine = engine_kind(engine)
        urls: Any = None
        if critique_url is not None:
            deprecated(
                "CLoud(model, critique_url=URL, critique_model=NAME)",
                "CLoud(URL, checkpoint=model, engine='openai', served_model=NAME)",
            )
            engine, urls, served_model = "openai", critique_url, critique_model or served_model
        elif engine == "openai":
            checkpoint = checkpoint if checkpoint is not None else tokenizer
            if checkpoint is None or not isinstance(checkpoint, str | os.PathLike | CLoudModel):
                raise ValueError(
                    "engine='openai' takes the critique server's URL as model, and the CLoud checkpoint (a directory "
                    "or hub id, as tokenizer= or checkpoint=; or a CLoudModel as checkpoint=): the reward head "
                    "scores here"
                )
            urls, model = model, checkpoint
            if tokenizer is checkpoint and not isinstance(tokenizer, str | os.PathLike):
                tokenizer = None
        score_engine = score_engine or ("vllm" if engine == "vllm" else "hf")
        if score_engine not in ("hf", "vllm"):
            raise ValueError(f"score_engine must be 'hf' or 'vllm', got {score_engine!r}")
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
        self.engine_kind, self.score_engine = engine, score_engine
        self.client: ChatClient | None = None
        self.generator: Any = None
        lm_dir = self.export_lm() if "vllm" in (engine, score_engine) else None
        llm_options = {"dtype": dtype, **(vllm_kwargs or {})}
        if engine == "openai":
            self.client = ChatClient(
                urls,
                served_model,
                api_key=api_key,
                max_tokens=max_new_tokens,
                temperature=0.0,
                extra_body={"continue_final_message": True, "add_generation_prompt": False},
                max_concurrency=max_concurrency,
                retry=retry,
                transport=transport,
            )
        elif engine == "vllm":
            from rh_trl.engines.vllm_generation import VLLMGenerator

            self.generator = VLLMGenerator(
                lm_dir, self.tokenizer, max_new_tokens=max_new_tokens, stop_token_ids=stops, **llm_options
            )
        else:
            self.generator = HFGenerator(
                self.model.lm,
                self.tokenizer,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                stop_token_ids=stops,
                progress=progress,
            )
        self.head = self.model.reward_head
        if score_engine == "vllm":
            from rh_trl.engines.vllm_pooling import VLLMPoolingEngine

            self.engine: Any = VLLMPoolingEngine(lm_dir, task="embed", pooling="last", **llm_options)
            self.head = self.head.float().cpu().eval()
            if engine != "hf":  # nothing runs the transformers model any more
                self.model = None
        else:
            self.engine = HFEngine(
                self.model,
                padding_id(self.tokenizer),
                max_tokens_per_batch,
                max_batch_size,
                progress=progress,
            )

    def export_lm(self) -> str:
        """The model's LM and tokenizer written to a temporary directory (removed at exit), for vLLM to load."""
        folder = temporary_folder("rh_trl-cloud-lm-")
        self.model.lm.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return folder

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
            return texts, {"critique_failed": len(failed), "critique_truncated": truncated, "too_long": 0}
        prefixes = [self.tokenizer(lay.prefix, add_special_tokens=False)["input_ids"] for lay in layouts]
        outputs = self.generator.generate(prefixes)
        truncated = sum(not g.finished and g.reason is None for g in outputs)
        too_long = sum(g.reason == "too_long" for g in outputs)  # no room left in the engine for a critique
        texts = [None if g.reason else g.text.strip() for g in outputs]
        return texts, {"critique_failed": 0, "critique_truncated": truncated, "too_long": too_long}

    def head_values(self, sequences: list[list[int]]) -> tuple[list[float | None], list[str | None]]:
        """The reward head at the end of each critiqued sequence, and per sequence ``None`` or why it got no value
        (``"too_long"``: longer than the vLLM engine takes)."""
        if not sequences:
            return [], []
        if self.score_engine == "hf":
            rows = self.engine.run(sequences, _read_last_reward)
            return [float(row[0]) for row in rows], [None] * len(rows)
        hidden, reasons = self.engine.run(sequences)
        with torch.inference_mode():
            return [None if h is None else float(self.head(h.float())) for h in hidden], reasons

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
            else ([], {"critique_failed": 0, "critique_truncated": 0, "too_long": 0})
        )  # type: ignore[arg-type]
        scored = [k for k, t in enumerate(texts) if t is not None]
        values, reasons = self.head_values([self.score_ids(layouts[k], texts[k]) for k in scored])  # type: ignore[arg-type]
        counts["too_long"] += sum(r == "too_long" for r in reasons)
        rewards: list[float | None] = [None] * n
        critiques: list[str | None] = [None] * n
        for k, value in zip(scored, values, strict=True):
            rewards[todo[k]] = value
        for k, i in enumerate(todo):
            critiques[i] = texts[k]
        counts["render_failed"] = render_failed
        return RewardOutput(rewards, counts, {"critique": critiques})
