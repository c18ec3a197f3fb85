"""Draws results.png from results.json (tc-loadgen's output).

Usage: plot.py <dir with results.json>
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(directory: str) -> None:
    out = Path(directory)
    report = json.loads((out / "results.json").read_text())
    scenarios = {s["id"]: s for s in report["scenarios"]}
    panels = []
    if 1 in scenarios:
        panels.append(("1: one publisher → one subscriber\nmessages/s delivered", scenarios[1]["rows"], "delivered_per_s"))
    for sid in (2, 3):
        if sid in scenarios:
            panels.append((f"{sid}: {scenarios[sid]['name']}\nevents/s delivered", scenarios[sid]["rows"], "delivered_per_s"))
    if 2 in scenarios:
        panels.append(("2: fan-out, p99 latency (ms)", scenarios[2]["rows"], "p99_ms"))
    if 4 in scenarios:
        panels.append(("4: across instances, latency (ms)", scenarios[4]["rows"], None))
    if 5 in scenarios:
        panels.append(("5: idle websocket\nKiB per connection", scenarios[5]["rows"], "kib_per_connection"))
    if 10 in scenarios:
        panels.append(("10: fan-out below saturation\nCPU ms per 1,000 deliveries", scenarios[10]["rows"], "cpu_ms_per_1000"))
    if 7 in scenarios:
        panels.append(("7: webhooks, deliveries/s\nvs the receiver under wrk", scenarios[7]["rows"][:2], "delivered_per_s"))
    if 6 in scenarios:
        soak(scenarios[6], out)
    if not panels:
        if 6 not in scenarios:
            sys.exit("no scenarios in results.json")
        return
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, grid = plt.subplots(nrows, cols, figsize=(4.6 * cols, 4.0 * nrows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (title, rows, key) in zip(axes, panels):
        if key is None:
            row = rows[0]
            labels = ["p50", "p99", "p99.9"]
            values = [row["p50_ms"], row["p99_ms"], row["p999_ms"]]
            colors = ["#2b6cb0"] * 3
            ax.axhline(5, color="#c53030", linestyle="--", linewidth=1, label="target p99 < 5 ms")
            ax.legend(fontsize=8)
        else:
            labels = [r["system"].replace(", ", "\n").replace(" + ", "\n+ ") for r in rows]
            values = [r.get(key) or 0 for r in rows]
            colors = ["#2b6cb0" if r["system"].startswith("tensorcost") else "#a0aec0" for r in rows]
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"tensorcost-events vs peers ({report['size']} size, {report['machine']['cpus']} CPUs, one run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=110)


def soak(scenario: dict, out: Path) -> None:
    """soak.png: RSS and open descriptors over the soak run."""
    rows = scenario["rows"]
    seconds = [int(r["system"].removeprefix("t=").removesuffix("s")) for r in rows]
    rss = [r["rss_mib"] for r in rows]
    fds = [int((r.get("note") or "0").split(" ")[0]) for r in rows]
    fig, left = plt.subplots(figsize=(7, 3.6))
    left.plot(seconds, rss, color="#2b6cb0", marker=".", label="RSS (MiB)")
    left.set_xlabel("seconds")
    left.set_ylabel("RSS (MiB)", color="#2b6cb0")
    left.set_ylim(bottom=0)
    right = left.twinx()
    right.plot(seconds, fds, color="#c05621", marker=".", label="open descriptors")
    right.set_ylabel("open descriptors", color="#c05621")
    right.set_ylim(bottom=0)
    left.set_title(f"6: soak, {scenario['shape']}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/full")
