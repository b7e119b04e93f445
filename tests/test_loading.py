"""Loading reward models from paths, with errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from rh_trl import ORM, ModelLoadError
from rh_trl.testing import tiny_reward_model

from .conftest import TEXT_COMPLETIONS, TEXT_PROMPTS


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ORM(str(tmp_path / "no-such-model"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        ORM(str(tmp_path))


def test_unknown_hub_id_offline():
    with pytest.raises(ModelLoadError, match="offline mode"):
        ORM("some-org/not-a-real-reward-model")


def test_round_trip_from_directory(tmp_path, chatml_tok):
    model = tiny_reward_model(chatml_tok, seed=7)
    model.save_pretrained(tmp_path)
    chatml_tok.save_pretrained(tmp_path)
    in_memory = ORM(model, chatml_tok).score(TEXT_PROMPTS, TEXT_COMPLETIONS)
    loaded = ORM(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.__name__.startswith(f"orm_{tmp_path.name}")
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert (
        max(abs(a - b) for a, b in zip(loaded.score(TEXT_PROMPTS, TEXT_COMPLETIONS), in_memory, strict=True))
        <= 1e-5
    )


def test_dtype_option(chatml_tok):
    orm = ORM(tiny_reward_model(chatml_tok, seed=8), chatml_tok, dtype="bfloat16")
    assert next(orm.model.parameters()).dtype == torch.bfloat16
    assert all(isinstance(s, float) for s in orm.score(TEXT_PROMPTS, TEXT_COMPLETIONS))
    with pytest.raises(ValueError, match="unknown dtype"):
        ORM(tiny_reward_model(chatml_tok), chatml_tok, dtype="float13")


def test_device_and_device_map_conflict(chatml_tok):
    with pytest.raises(ValueError, match="not both"):
        ORM(tiny_reward_model(chatml_tok), chatml_tok, device="cpu", device_map="auto")
