"""Draws docs/performance.png from the JSON `forkbox bench --json` writes: per
operation, forkbox's p50 next to each baseline's p50 measured in the same run, on a
log scale. Usage: chart.py BENCH.json OUT.png (needs matplotlib; `make bench` installs
it in its venv)."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "forkbox": "#d62728",
    "unshare": "#7f7f7f",
    "crun": "#1f77b4",
    "bwrap": "#2ca02c",
    "host": "#ff7f0e",
    "cp": "#9467bd",
    "jupyter": "#8c564b",
}


def family(name):
    n = name.lower()
    for key in ("crun", "bwrap", "cp -a", "jupyter", "unshare"):
        if key in n:
            return key.split()[0]
    return "host"


def main():
    data = json.load(open(sys.argv[1]))
    groups = [c for c in data["comparisons"] if c.get("ours_p50") is not None]
    labels, values, colors, yticks, ylabels = [], [], [], [], []
    y = 0.0
    for g in reversed(groups):
        bars = [("forkbox", g["ours_p50"], "forkbox")]
        bars += [(b["name"].replace("`", ""), b["p50"], family(b["name"]))
                 for b in g["baselines"] if b.get("p50")]
        start = y
        for name, v, fam in reversed(bars):
            labels.append((y, name, v))
            values.append((y, v))
            colors.append(COLORS.get(fam, "#333333"))
            y += 1
        yticks.append((start + y - 1) / 2)
        ylabels.append(g["op"].replace("`", ""))
        y += 0.8
    fig, ax = plt.subplots(figsize=(11, 0.32 * y + 1.4), dpi=110)
    ax.barh([p for p, _ in values], [v for _, v in values], color=colors, height=0.8)
    for p, name, v in labels:
        ax.text(v * 1.08, p, f"{name}  {v:.1f} ms" if v < 100 else f"{name}  {v:.0f} ms",
                va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_xlabel("p50, milliseconds (log scale; shorter is faster)")
    top = max(v for _, v in values)
    ax.set_xlim(min(v for _, v in values) / 2, top * 30)
    ax.set_title(data.get("title", "forkbox bench"), fontsize=10)
    ax.grid(axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(sys.argv[2])


if __name__ == "__main__":
    main()
