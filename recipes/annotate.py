"""Best-of-N / preference annotation (the ``annotate`` command as a script); see ``rh_trl.cli.annotate``.

    python recipes/annotate.py --config configs/annotate/tiny.yaml
    python recipes/annotate.py data.jsonl --output-dir out/ --reward '{"type": "orm", "model": "..."}'

Killed and restarted with the same arguments, it continues after the last finished chunk.
"""

from __future__ import annotations

import logging

from rh_trl.cli.annotate import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
