"""Which completions in a reward call answer the same prompt.

Pairwise rewards compare a completion with the other completions of its prompt, and reward statistics measure
the spread within each prompt's completions; both take their groups from :func:`prompt_groups`. TRL trainers
lay out a call differently:

* ``GRPOTrainer`` / ``RLOOTrainer``: ``num_generations`` consecutive completions per prompt,
  ``[p1, p1, p2, p2, …]``;
* ``trl.experimental.online_dpo.OnlineDPOTrainer``: the prompts twice, ``[p1 … pn, p1 … pn]``, so prompt ``i``'s
  two completions sit at ``i`` and ``i + n``.

Grouping by prompt identity serves both, wherever the completions sit. A prompt that occurs in two rows of the
same call pools its completions into one group. ``group_size`` overrides the identity grouping with TRL's
positional one (consecutive runs of ``group_size``), checked to hold one prompt each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rh_trl.formatting import RewardInputError


def prompt_key(prompt: Any) -> str:
    """A string that is equal for equal prompts (a string, or a list of messages in any key order)."""
    if isinstance(prompt, str):
        return "s:" + prompt
    return "j:" + json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=repr)


def prompt_groups(prompts: Sequence[Any], group_size: int | None = None) -> list[list[int]]:
    """The indices of each prompt's completions, groups in order of first appearance.

    Without ``group_size`` every set of identical prompts is one group, wherever its members sit. With
    ``group_size`` the groups are consecutive runs of that many completions, and the call must hold whole runs
    of one prompt each (else :class:`~rh_trl.formatting.RewardInputError`). A ``None`` prompt (a sample that
    could not be read) belongs to no group.
    """
    n = len(prompts)
    keys = [None if p is None else prompt_key(p) for p in prompts]
    if group_size is None:
        by_key: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                by_key.setdefault(key, []).append(i)
        return list(by_key.values())
    if group_size < 1 or n % group_size:
        raise RewardInputError(
            f"group_size={group_size} does not divide the batch of {n} completions; expected whole groups of "
            "group_size consecutive completions of one prompt (TRL's num_generations); leave group_size unset "
            "to group completions by their prompt wherever they sit"
        )
    groups = []
    for start in range(0, n, group_size):
        members = [i for i in range(start, start + group_size) if keys[i] is not None]
        if len({keys[i] for i in members}) > 1:
            raise RewardInputError(
                f"completions {start}..{start + group_size - 1} mix different prompts; with "
                f"group_size={group_size} each run of {group_size} consecutive completions must share one "
                "prompt (online DPO scores [p1..pn, p1..pn]: leave group_size unset there)"
            )
        groups.append(members)
    return groups
