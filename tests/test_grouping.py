"""prompt_groups: the completions of each prompt, in GRPO's and online DPO's layouts."""

from __future__ import annotations

import pytest

from rh_trl.formatting import RewardInputError
from rh_trl.rewards.grouping import prompt_groups

P1 = [{"role": "user", "content": "Describe trains."}]
P2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe trains."}]


def test_groups_by_identity_in_both_trainer_layouts():
    assert prompt_groups([P1, P1, P2, P2]) == [[0, 1], [2, 3]]  # GRPO, num_generations=2
    assert prompt_groups([P1, P2, "x", P1, P2, "x"]) == [[0, 3], [1, 4], [2, 5]]  # online DPO, 3 prompts
    same_p1 = [{"content": "Describe trains.", "role": "user"}]  # equal prompt, other key order, other object
    assert prompt_groups([P1, same_p1, None, P1]) == [[0, 1, 3]]  # an unreadable sample is in no group
    assert prompt_groups(["x", [{"role": "user", "content": "x"}]]) == [[0], [1]]  # formats are not merged


def test_explicit_group_size_is_positional_and_checked():
    assert prompt_groups([P1, P1, P1, P1], group_size=2) == [[0, 1], [2, 3]]
    assert prompt_groups([P1, None, P2, P2], group_size=2) == [[0], [2, 3]]
    with pytest.raises(RewardInputError, match="group_size=3 does not divide the batch of 4"):
        prompt_groups([P1] * 4, group_size=3)
    with pytest.raises(RewardInputError, match=r"completions 0\.\.1 mix different prompts.*online DPO"):
        prompt_groups([P1, P2, P1, P2], group_size=2)
