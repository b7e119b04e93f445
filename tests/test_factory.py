"""Rewards built from config specs."""

from __future__ import annotations

import pytest

from rh_trl import ORM, ModelLoadError
from rh_trl.rewards.factory import build_reward, build_rewards, register_reward_type, reward_class
from rh_trl.testing import tiny_model


def test_build_orm_from_spec_matches_direct_construction():
    rewards, weights = build_rewards(
        [{"type": "orm", "model": "rh_trl:tiny-rm", "name": "spec_rm", "weight": 0.5}]
    )
    model, tokenizer = tiny_model("tiny-rm")
    direct = ORM(model, tokenizer)
    assert isinstance(rewards[0], ORM) and rewards[0].__name__ == "spec_rm" and weights == [0.5]
    prompts, completions = ["Tell a tiny story."], [" A river ran to the sea."]
    assert rewards[0].score(prompts, completions) == pytest.approx(
        direct.score(prompts, completions), abs=1e-6
    )


def test_bad_specs_are_explained():
    with pytest.raises(ValueError, match="unknown reward type 'nope'; known types: .*orm"):
        build_reward({"type": "nope"})
    with pytest.raises(ValueError, match="'type' key"):
        build_reward({"model": "x"})
    with pytest.raises(
        ValueError, match="reward spec .*ORM has no option 'colour'; the options it takes: model,"
    ):
        build_reward({"type": "orm", "model": "rh_trl:tiny-rm", "colour": "red"})
    with pytest.raises(ValueError, match="at least one"):
        build_rewards([])
    with pytest.raises(
        ModelLoadError, match="unknown offline model 'rh_trl:tiny-giant'.*known: .*rh_trl:tiny-rm"
    ):
        build_reward({"type": "orm", "model": "rh_trl:tiny-giant"})


def test_register_reward_type():
    register_reward_type("my_orm", "rh_trl.rewards.orm:ORM")
    assert reward_class("my_orm") is ORM
    with pytest.raises(ValueError, match="module:Class"):
        register_reward_type("bad", "ORM")
