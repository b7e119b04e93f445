"""Accuracy of a reward on chosen/rejected pairs — the same command as ``rh-trl eval`` (see
``rh_trl/cli/eval.py`` for every option).

    python recipes/eval_rm.py --model outputs/bt-minilm-hh --data ../shared/data/hh-rlhf-harmless/pairs.jsonl.gz \
        --split held-out --eval-fraction 0.2 --chat-template plain --max-length 128 --skip-invalid
    python recipes/eval_rm.py --baseline shorter --data ../shared/data/llmbar
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rh_trl.cli.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
