"""Runs that survive being killed: outputs appended block by block, and a state file that records, after each
finished block, the rows done and the outputs' sizes (used by ``rh-trl annotate`` and ``rh-trl score --ray``).

A restarted run cuts each output back to its recorded size (dropping a block that was half written when the run
died) and continues after the recorded rows, so it writes exactly what an uninterrupted run writes. A restart
with other settings is refused with an error naming what changed, never mixed into the old output.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("rh_trl")

STATE_FILE = "state.json"


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every setting that differs (missing ones shown as ``<unset>``)."""
    unset = "<unset>"
    return [
        f"{key}: {old.get(key, unset)!r} -> {new.get(key, unset)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, unset) != new.get(key, unset)
    ]


def write_state(directory: Path, state: Mapping[str, Any]) -> None:
    """Replace the state file atomically (write a temporary file, fsync, rename)."""
    tmp = directory / (STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)


class Progress:
    """The state of a resumable run in ``directory``: its ``settings``, the rows done, the sizes of its
    ``outputs`` (files in ``directory``) after the last finished block, and any counters the run keeps.

    Opening it checks the settings against a stored state (a mismatch is a ValueError naming the changes and
    ending with ``restart_hint``) and cuts the outputs back to their recorded sizes."""

    def __init__(
        self,
        directory: str | os.PathLike,
        settings: Mapping[str, Any],
        outputs: Sequence[str],
        restart_hint: str = "Delete it to start over.",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        expected = json.loads(json.dumps(settings))  # as stored: written as JSON (tuples became lists)
        path = self.directory / STATE_FILE
        fresh = {"rows_done": 0, "sizes": {name: 0 for name in outputs}, "settings": expected}
        self.state: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else fresh
        if self.state["settings"] != expected:
            changes = "; ".join(settings_changes(self.state["settings"], expected))
            raise ValueError(
                f"{self.directory} holds a run with other settings, so it cannot be resumed: {changes}. "
                f"{restart_hint}"
            )
        for name in outputs:  # drop whatever a killed run appended after its last finished block
            file = self.directory / name
            file.touch()
            with open(file, "r+b") as f:
                f.truncate(self.state["sizes"][name])
        if self.rows_done:
            logger.info("resuming %s after %d rows", self.directory, self.rows_done)

    @property
    def rows_done(self) -> int:
        return int(self.state["rows_done"])

    def commit(self, rows: int, appended: Mapping[str, bytes], **fields: Any) -> None:
        """Append a finished block's bytes to the outputs and flush them, then record the block (and
        ``fields``, e.g. counters) in the state file."""
        for name, data in appended.items():
            with open(self.directory / name, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self.state["rows_done"] += rows
        self.state["sizes"] = {name: (self.directory / name).stat().st_size for name in self.state["sizes"]}
        self.state.update(fields)
        write_state(self.directory, self.state)
