"""What ``recipes/train_cloud.py`` trains a Critique-out-Loud reward model with: preference pairs with one critique
per side, the sequences rendered exactly as :class:`rh_trl.CLoud` generates and scores them, the joint objective
(Bradley-Terry on the head plus the critique LM loss) with its model and trainer, and the head's rewards with the
dataset's own critiques (the oracle accuracy)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.utils import ModelOutput

from rh_trl.data.preferences import (
    FORMATS,
    PreferenceDataError,
    detect_format,
    read_records,
    to_pair,
)
from rh_trl.rewards.cloud import CLOUD_PREAMBLE, CLoud, CLoudModel, CritiqueLayout

logger = logging.getLogger("rh_trl.train_cloud")

#: the bundled critique pairs (``rh_trl/data/cloud_critiques.jsonl``), for CI
BUILTIN_DATA = "rh_trl:cloud-critiques"
#: the label of tokens without loss
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# Data: preference pairs with one critique per side
# ----------------------------------------------------------------------------------------------------------------


def _critique_text(value: Any, row: int, column: str) -> str:
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]
    if not isinstance(value, str):
        raise PreferenceDataError(
            f"row {row}: '{column}' must be a string (or a list of strings), got {type(value).__name__}"
        )
    if not value.strip():
        raise PreferenceDataError(f"row {row}: '{column}' is empty; expected the critique's text")
    return value.strip()


def read_critique_pairs(
    source: str | Path | Sequence[dict[str, Any]],
    fmt: str = "auto",
    critique_columns: tuple[str, str] = ("chosen_critique", "rejected_critique"),
    require_critiques: bool = True,
    skip_invalid: bool = False,
) -> list[dict[str, Any]]:
    """Pairs ``{"prompt", "chosen", "rejected"}`` (conversations, see :func:`rh_trl.data.preferences.to_pair`) with
    ``chosen_critique``/``rejected_critique`` strings, from a file, ``rh_trl:cloud-critiques`` or rows.

    A row without the critique columns is an error when ``require_critiques``; otherwise its pair has no
    critiques. With ``skip_invalid`` unreadable rows are left out and counted in a warning.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown preference format '{fmt}'; expected one of {FORMATS}")
    if isinstance(source, str) and source == BUILTIN_DATA:
        text = resources.files("rh_trl.data").joinpath("cloud_critiques.jsonl").read_text()
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif isinstance(source, str | Path):
        records = read_records(source)
    else:
        records = list(source)
    where = source if isinstance(source, str | Path) else "the given rows"
    if not records:
        raise PreferenceDataError(
            f"no rows in {where}; expected rows {{prompt, chosen, rejected, "
            f"{critique_columns[0]}, {critique_columns[1]}}}"
        )
    pairs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for i, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise PreferenceDataError(f"row {i}: expected a JSON object, got {type(record).__name__}")
            pair = to_pair(record, detect_format(record) if fmt in ("auto", "rlhflow") else fmt, i)
            missing = [c for c in critique_columns if c not in record or record[c] is None]
            if missing and require_critiques:
                raise PreferenceDataError(
                    f"row {i}: missing critique column(s) {missing} (columns: {sorted(record)}); critique SFT and "
                    f"joint training on dataset critiques need '{critique_columns[0]}' and "
                    f"'{critique_columns[1]}' (set chosen_critique_column / rejected_critique_column for other names)"
                )
            if not missing:
                for side, column in zip(("chosen", "rejected"), critique_columns, strict=True):
                    pair[f"{side}_critique"] = _critique_text(record[column], i, column)
        except PreferenceDataError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        pairs.append(pair)
    if skipped:
        logger.warning(
            "left out %d of %d rows that could not be read (first: %s)",
            len(skipped),
            len(records),
            skipped[0],
        )
    if not pairs:
        raise PreferenceDataError(f"no pairs left in {where}: all {len(records)} rows were invalid")
    return pairs


def has_critiques(pair: dict[str, Any]) -> bool:
    return "chosen_critique" in pair and "rejected_critique" in pair


def jsonl_row(pair: dict[str, Any]) -> dict[str, Any]:
    """A pair as a row of the input format (the conversations as TRL conversational messages)."""
    keys = ("prompt", "chosen", "rejected", "chosen_critique", "rejected_critique", "subset", "margin")
    return {k: pair[k] for k in keys if k in pair} | {
        k: v for k, v in pair.items() if k.startswith("oracle_")
    }


# ----------------------------------------------------------------------------------------------------------------
# Sequences, rendered as rh_trl.CLoud renders them
# ----------------------------------------------------------------------------------------------------------------


class CritiqueRenderer:
    """``rh_trl.CLoud``'s own rendering — its ``conversation``, ``layout`` and ``score_ids`` methods — on a tokenizer
    alone, so that training sequences are built by the very code that scores them."""

    conversation = CLoud.conversation
    layout = CLoud.layout
    score_ids = CLoud.score_ids

    def __init__(
        self, tokenizer: Any, preamble: str = CLOUD_PREAMBLE, chat_template: str | None = None
    ) -> None:
        if not preamble.strip():
            raise ValueError("preamble must hold some text: the critique turn is found by it")
        self.tokenizer = tokenizer
        self.preamble = preamble
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise ValueError(
                "the tokenizer has no chat template; pass chat_template: '…' (CLoud renders with it)"
            )

    def prefix_ids(self, layout: CritiqueLayout) -> list[int]:
        """The tokens ``rh_trl.CLoud`` generates a critique from."""
        return list(self.tokenizer(layout.prefix, add_special_tokens=False)["input_ids"])

    def generation_sequence(self, prompt: Any, response: Any, critique: str) -> tuple[list[int], int]:
        """The generation prefix, the critique's tokens and the end-of-turn token, with the index of the first
        critique token: what critique SFT trains on."""
        layout = self.layout(prompt, response)
        prefix = self.prefix_ids(layout)
        critique_ids = list(self.tokenizer(critique, add_special_tokens=False)["input_ids"])
        return prefix + critique_ids + [layout.end_of_turn_id], len(prefix)

    def scoring_sequence(self, prompt: Any, response: Any, critique: str) -> tuple[list[int], int]:
        """The sequence ``rh_trl.CLoud`` scores (ending with the end-of-turn token its head reads), with the index
        of the first token that is not part of the generation prefix (the critique's first token)."""
        layout = self.layout(prompt, response)
        ids = self.score_ids(layout, critique)
        prefix = self.prefix_ids(layout)
        start = 0
        while start < min(len(prefix), len(ids) - 1) and prefix[start] == ids[start]:
            start += 1
        return ids, start


def fit_to_length(
    ids: list[int], label_start: int, max_length: int | None, bos_id: int | None
) -> tuple[list[int], int, bool] | None:
    """Cut tokens from the left (after a leading BOS) until ``ids`` fits ``max_length``. Returns the ids, the new
    index of the first labelled token and whether anything was cut; ``None`` when the labelled tokens and the one
    before them do not fit on their own."""
    if max_length is None or len(ids) <= max_length:
        return ids, label_start, False
    keep = 1 if bos_id is not None and ids[0] == bos_id else 0
    excess = len(ids) - max_length
    if keep + excess > label_start - 1:
        return None
    return ids[:keep] + ids[keep + excess :], label_start - excess, True


def labelled(ids: list[int], label_start: int) -> list[int]:
    return [IGNORE] * label_start + ids[label_start:]


def sft_rows(
    pairs: Sequence[dict[str, Any]], renderer: CritiqueRenderer, max_length: int | None
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Critique-SFT rows ``{"input_ids", "labels"}``, one per pair side, loss on the critique + end-of-turn."""
    rows: list[dict[str, list[int]]] = []
    counts = {"sequences": 0, "truncated": 0, "too_long": 0}
    bos = getattr(renderer.tokenizer, "bos_token_id", None)
    for i, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            try:
                ids, start = renderer.generation_sequence(
                    pair["prompt"], pair[side], pair[f"{side}_critique"]
                )
            except Exception as err:
                raise PreferenceDataError(f"pair {i}, {side}: could not be rendered: {err}") from err
            fitted = fit_to_length(ids, start, max_length, bos)
            if fitted is None:
                counts["too_long"] += 1
                continue
            ids, start, cut = fitted
            counts["truncated"] += cut
            rows.append({"input_ids": ids, "labels": labelled(ids, start)})
    counts["sequences"] = len(rows)
    _check_rows(rows, counts, max_length, "critique SFT sequences")
    return rows, counts


def joint_rows(
    pairs: Sequence[dict[str, Any]], renderer: CritiqueRenderer, max_length: int | None
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Joint-stage rows ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`` in CLoud's
    scoring layout; labels on the critique + end-of-turn tokens. A pair with a side too long is left out."""
    rows: list[dict[str, list[int]]] = []
    counts = {"pairs": 0, "truncated": 0, "too_long": 0}
    bos = getattr(renderer.tokenizer, "bos_token_id", None)
    for i, pair in enumerate(pairs):
        row: dict[str, list[int]] = {}
        for side in ("chosen", "rejected"):
            try:
                ids, start = renderer.scoring_sequence(pair["prompt"], pair[side], pair[f"{side}_critique"])
            except Exception as err:
                raise PreferenceDataError(f"pair {i}, {side}: could not be rendered: {err}") from err
            fitted = fit_to_length(ids, start, max_length, bos)
            if fitted is None:
                break
            ids, start, cut = fitted
            counts["truncated"] += cut
            row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labelled(ids, start)
        if len(row) < 4:
            counts["too_long"] += 1
            continue
        rows.append(row)
    counts["pairs"] = len(rows)
    _check_rows(rows, counts, max_length, "joint-training pairs")
    return rows, counts


def _check_rows(rows: list, counts: dict[str, int], max_length: int | None, what: str) -> None:
    if counts["too_long"]:
        logger.warning(
            "left out %d of the %s: the critique alone is longer than truncation_length=%s tokens",
            counts["too_long"],
            what,
            max_length,
        )
    if not rows:
        raise PreferenceDataError(
            f"no {what} left to train on ({counts['too_long']} too long for truncation_length={max_length})"
        )


@dataclass
class PairCollator:
    """Right-pads a batch of joint rows into one ``[2 × pairs, length]`` batch: the chosen sides, then the rejected."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        longest = max(len(s) for s in seqs)
        batch = {
            "input_ids": torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(seqs), longest), dtype=torch.long),
            "labels": torch.full((len(seqs), longest), IGNORE, dtype=torch.long),
        }
        for k, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
            batch["input_ids"][k, : len(s)] = torch.tensor(s, dtype=torch.long)
            batch["attention_mask"][k, : len(s)] = 1
            batch["labels"][k, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------------------------
# The joint objective
# ----------------------------------------------------------------------------------------------------------------


def cloud_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    lm_loss: torch.Tensor | None,
    lm_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CLoud's joint loss: ``mean(−log σ(r_chosen − r_rejected)) + lm_weight × lm_loss``.

    Returns the loss and its parts ``{"bt_loss", "lm_loss"}``. ``lm_loss`` may be ``None`` only when ``lm_weight``
    is 0.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen and rejected rewards differ in shape ({tuple(chosen_rewards.shape)} vs "
            f"{tuple(rejected_rewards.shape)}); expected one reward per pair on each side"
        )
    bt_loss = -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()
    parts = {"bt_loss": bt_loss}
    if lm_loss is None:
        if lm_weight != 0:
            raise ValueError(f"lm_weight={lm_weight} needs an LM loss; got None (no critique labels?)")
        return bt_loss, parts
    parts["lm_loss"] = lm_loss
    return bt_loss + lm_weight * lm_loss, parts


@dataclass
class JointOutput(ModelOutput):
    """``rewards``: the head at each sequence's last token, ``[batch]``; ``lm_loss``: mean cross-entropy over the
    labelled tokens of the whole batch."""

    rewards: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None


class CLoudJointModel(CLoudModel):
    """A :class:`~rh_trl.rewards.cloud.CLoudModel` (same weights and config) whose forward returns what the joint
    stage trains on: the reward at each right-padded sequence's last token and the LM loss on ``labels``.

    The LM loss projects only the hidden states that predict a labelled token (no full-vocabulary logits for the
    prompt and response).
    """

    supports_gradient_checkpointing = True

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> JointOutput:
        kwargs.setdefault("use_cache", False)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        last = attention_mask.sum(dim=1) - 1
        rewards = self.reward_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        lm_loss = None
        if labels is not None:
            targets = labels[:, 1:]
            keep = targets != IGNORE
            logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            cap = getattr(self.lm.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lm_loss = F.cross_entropy(logits, targets[keep])
        return JointOutput(rewards=rewards, lm_loss=lm_loss)


class CLoudJointTrainer(Trainer):
    """A ``Trainer`` for :class:`CLoudJointModel` on :class:`PairCollator` batches with :func:`cloud_loss`; logs
    ``bt_loss``, ``lm_loss``, ``accuracy`` (chosen reward above rejected) and ``margin``."""

    loss_is_scaled_for_ga = False  # cloud_loss is a per-micro-batch mean

    def __init__(self, *args: Any, lm_weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lm_weight = lm_weight
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"]
        )
        n = inputs["input_ids"].shape[0] // 2
        chosen, rejected = outputs.rewards[:n], outputs.rewards[n:]
        loss, parts = cloud_loss(chosen, rejected, outputs.lm_loss, self.lm_weight)
        margin = (chosen - rejected).detach().float()
        values = {
            **{k: v.detach().float() for k, v in parts.items()},
            "accuracy": (margin > 0).float().mean(),
            "margin": margin.mean(),
        }
        mode = "train" if model.training else "eval"
        stacked = torch.stack([value.reshape(()) for value in values.values()])
        means = self.accelerator.gather(stacked[None]).mean(0).tolist()  # one collective, one sync
        for key, mean in zip(values, means, strict=True):
            self._metrics[mode][key].append(mean)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)


# ----------------------------------------------------------------------------------------------------------------
# Held-out accuracy with the dataset's critiques
# ----------------------------------------------------------------------------------------------------------------


def _last_token_reward(outputs: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    last = attention_mask.sum(dim=1) - 1
    return outputs.rewards[torch.arange(input_ids.shape[0], device=input_ids.device), last].unsqueeze(-1)


def oracle_critique_rewards(
    reward: CLoud, pairs: Sequence[dict[str, Any]]
) -> tuple[list[float], list[float]]:
    """The head's rewards for both sides of each pair with the dataset's critiques in place of generated ones."""
    sequences = [
        reward.score_ids(reward.layout(p["prompt"], p[side]), p[f"{side}_critique"])
        for side in ("chosen", "rejected")
        for p in pairs
    ]
    values = [float(row[0]) for row in reward.engine.run(sequences, _last_token_reward)]
    return values[: len(pairs)], values[len(pairs) :]
