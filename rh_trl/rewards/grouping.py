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

On several processes a trainer gives each process a share of the call, and GRPO and RLOO spread a prompt's
completions over the processes. :func:`call_groups` then forms the groups of the whole call (every process's share,
in rank order, as one process would see the call) and fetches the completions of the processes that share a group
with this one (:mod:`rh_trl.engines.ranks`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rh_trl.engines.ranks import RankCall, concatenated
from rh_trl.formatting import RewardInputError, Sample


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
    return groups_of_keys([None if p is None else prompt_key(p) for p in prompts], group_size)


def prompt_digest(prompt: Any) -> bytes:
    """A short fingerprint of :func:`prompt_key` (what processes exchange to find their groups)."""
    return hashlib.blake2b(prompt_key(prompt).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def groups_of_keys(keys: Sequence[Hashable | None], group_size: int | None = None) -> list[list[int]]:
    """:func:`prompt_groups` over the prompts' keys (``None``: a sample in no group)."""
    n = len(keys)
    if group_size is None:
        by_key: dict[Hashable, list[int]] = {}
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


@dataclass
class CallGroups:
    """The groups of a reward call as one process sees the whole call.

    Indices are positions in the whole call: every process's share in rank order (on one process, the call's own
    positions). Only the groups with a member on this process are kept, and only their samples are filled in.

    Attributes:
        groups: each group's indices (groups with a member here).
        local: the whole call's index of each of this process's samples, in order.
        samples: the sample at each index of those groups (this process's and its peers').
        ranks: the call's exchange with the other processes (``None`` on one process).
        peers: the other processes that hold members of these groups.
    """

    groups: list[list[int]]
    local: list[int]
    samples: dict[int, Sample | None]
    ranks: RankCall | None = None
    peers: list[int] = field(default_factory=list)

    def local_members(self, group: Sequence[int]) -> list[int]:
        """The members of ``group`` that are this process's samples."""
        first, last = self.local[0], self.local[-1]
        return [i for i in group if first <= i <= last] if self.local else []

    def merge(self, phase: str, values: Mapping[Any, Any]) -> dict[Any, Any]:
        """``values`` computed here joined with those its peers computed for ``phase`` (each process computes the
        part of a result that its own samples lead, e.g. the comparisons its completions open)."""
        merged = dict(values)
        if self.ranks is not None:
            for share in self.ranks.gather(phase, dict(values), self.peers):
                merged.update(share)
        return merged


def call_groups(
    samples: Sequence[Sample | None], ranks: RankCall | None, group_size: int | None
) -> CallGroups:
    """The groups of a call whose share on this process is ``samples`` (see :class:`CallGroups`).

    On several processes every process learns every other's prompt fingerprints, so all of them form the same
    groups (and raise the same error when the whole call does not hold whole groups), then fetches the samples of
    the processes it shares a group with.
    """
    if ranks is None:
        groups = prompt_groups([None if s is None else s.prompt for s in samples], group_size)
        return CallGroups(groups, list(range(len(samples))), dict(enumerate(samples)))
    digests = [None if s is None else prompt_digest(s.prompt) for s in samples]
    keys, offsets = concatenated(ranks.gather("layout", digests))
    start = offsets[ranks.rank]
    local = list(range(start, start + len(samples)))
    groups = [
        g for g in groups_of_keys(keys, group_size) if any(start <= i < start + len(samples) for i in g)
    ]

    def owner(index: int) -> int:
        return bisect.bisect_right(offsets, index) - 1

    peers = sorted({owner(i) for g in groups for i in g} - {ranks.rank})
    shares = ranks.gather("samples", list(samples), peers)
    by_index: dict[int, Sample | None] = dict(zip(local, samples, strict=True))
    for rank, share in zip(peers, shares, strict=True):
        by_index.update(zip(range(offsets[rank], offsets[rank] + len(share)), share, strict=True))
    return CallGroups(groups, local, by_index, ranks, peers)
