"""The bar chart ``fastmeta bench`` writes: our speedup over each baseline, per row."""

from __future__ import annotations

from fastmeta.bench import harness


def plot_speedups(rows: list[harness.Row], path: str, *, title: str) -> None:
    """Horizontal grouped bars, log-scaled: speedup = baseline time / fastmeta time, with the
    1x line drawn; each bar is labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines: list[str] = []
    for r in rows:
        for b in r.baselines:
            if b not in baselines and r.baselines[b] is not None:
                baselines.append(b)
    height = 0.8 / max(1, len(baselines))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.55 * len(rows) * max(1, len(baselines)) * 0.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, baseline in enumerate(baselines):
        ys, xs = [], []
        for i, r in enumerate(rows):
            s = r.speedup(baseline)
            if s is not None:
                ys.append(i + (k - (len(baselines) - 1) / 2) * height)
                xs.append(s)
        bars = ax.barh(ys, xs, height=height * 0.95, label=f"vs {baseline}",
                       color=colors[k % len(colors)])
        for bar, x in zip(bars, xs):
            ax.text(x * 1.02, bar.get_y() + bar.get_height() / 2, f"{x:.2f}x", va="center",
                    fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r.name for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastmeta (baseline time / fastmeta time, median; >1 is faster)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
