"""The bar chart ``fastmeta bench`` writes: our speedup over each baseline, per row."""

from __future__ import annotations

from fastmeta.bench import harness

# Inches per bar and between rows: keeps the chart readable however many rows there are.
BAR_HEIGHT_IN = 0.22
ROW_GAP_IN = 0.25


def plot_speedups(rows: list[harness.Row], path: str, *, title: str) -> None:
    """Horizontal bars, log-scaled: speedup = baseline time / fastmeta time, one bar per
    baseline measured in that row (so rows with few baselines stay compact), the 1x line
    drawn, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for r in rows:
        names += [b for b, t in r.baselines.items() if t is not None and b not in names]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {b: colors[i % len(colors)] for i, b in enumerate(names)}
    y, ticks, labels, seen = 0.0, [], [], set()
    bars = 0
    fig_rows = []
    for r in rows:
        present = [(b, r.speedup(b)) for b in names if r.speedup(b) is not None]
        positions = [y + i for i in range(len(present))]
        fig_rows.append((present, positions))
        if present:
            ticks.append(sum(positions) / len(positions))
            labels.append(r.name)
        y += len(present) + ROW_GAP_IN / BAR_HEIGHT_IN
        bars += len(present)
    height = 1.2 + bars * BAR_HEIGHT_IN + len(rows) * ROW_GAP_IN
    fig, ax = plt.subplots(figsize=(10, height))
    for present, positions in fig_rows:
        for (baseline, speedup), pos in zip(present, positions):
            ax.barh(pos, speedup, height=0.85, color=color[baseline],
                    label=f"vs {baseline}" if baseline not in seen else None)
            seen.add(baseline)
            ax.text(speedup * 1.03, pos, f"{speedup:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastmeta (baseline time / fastmeta time, medians; >1 is faster)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
