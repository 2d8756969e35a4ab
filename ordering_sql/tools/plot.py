"""``ordering-sql bench --plot``: the workloads on a log scale, with each database's floors.

Needs matplotlib (``pip install 'ordering-sql[bench]'``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ordering_sql.tools.bench import WORKLOADS, BenchReport

__all__ = ["figure", "plot"]


def plot(report: BenchReport, path: Path) -> None:
    """Save ``figure(report)`` to ``path`` (PNG, SVG or PDF, by its suffix)."""
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path)
    plt.close(fig)


def figure(report: BenchReport) -> Any:
    """Bar chart of events/s per workload and backend, with each backend's floors drawn.

    The axis is logarithmic, so the batch workload (W4) and the single-event ones (W1-W3, E0
    and E1) stay readable side by side; each backend's two-statement floor (an in-order event's
    least cost) is a dashed line, its raw INSERT + COMMIT floor a dotted one, in the bars' colour.
    Returns a matplotlib ``Figure``; needs matplotlib (the bench extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r.backend for r in report.results})
    names = [w for w in WORKLOADS if any(r.workload == w for r in report.results)]
    rate = {(r.workload, r.backend): r.events_per_s for r in report.results}
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(backends))
    for b, backend in enumerate(backends):
        xs = [i + b * width for i, w in enumerate(names) if (w, backend) in rate]
        ys = [rate[w, backend] for w in names if (w, backend) in rate]
        bars = ax.bar(xs, ys, width, label=backend)
        ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, padding=2)
        floors = report.floors.get(backend)
        if floors is not None:
            colour = bars.patches[0].get_facecolor() if bars.patches else None
            ax.axhline(floors.two_statement, color=colour, linestyle="--", linewidth=1)
            ax.axhline(floors.raw_insert_commit, color=colour, linestyle=":", linewidth=1)
            ax.annotate(
                f"{backend}: two-statement floor {floors.two_statement:,.0f}/s, "
                f"raw INSERT+COMMIT {floors.raw_insert_commit:,.0f}/s",
                xy=(0.01, 0.97 - 0.05 * b),
                xycoords="axes fraction",
                fontsize=7,
                color=colour,
                va="top",
            )
    ax.set_yscale("log")
    drawn = [r.events_per_s for r in report.results if r.events_per_s > 0] + [
        f.two_statement for f in report.floors.values()
    ]
    if drawn:  # bars start at the power of ten below the smallest value, not mid-decade
        ax.set_ylim(bottom=10 ** math.floor(math.log10(min(drawn))))
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("events/s, median of runs (log scale)")
    ax.set_title("ordering-sql bench: workloads next to the floors of the same database")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
