"""Draw the benchmarks' plots from their own output: every ``benchmarks/results/<name>.json`` (written by a
benchmark run with ``--json``) becomes ``img/benchmarks/<name>.png``, a bar per path of its speed against the
benchmark's baseline. Run by the ``gen-files`` plugin at every ``mkdocs build``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mkdocs_gen_files  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def plot(result: dict) -> bytes:
    rows = result["rows"]
    labels = [row["path"] for row in rows]
    ratios = [row["ratio"] for row in rows]
    figure, axes = plt.subplots(figsize=(7, 0.55 * len(rows) + 1.2))
    bars = axes.barh(labels[::-1], ratios[::-1], color="#3f51b5")
    axes.bar_label(bars, labels=[f"{r:.1f}x" for r in ratios[::-1]], padding=3)
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel(f"times as fast as: {result['baseline']}")
    axes.set_title(f"{result['benchmark']} ({result['machine']}, {result['date']})", fontsize=10)
    axes.set_xlim(0, max(ratios) * 1.2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


for path in sorted(RESULTS.glob("*.json")):
    with mkdocs_gen_files.open(f"img/benchmarks/{path.stem}.png", "wb") as out:
        out.write(plot(json.loads(path.read_text())))
