"""Top-k 2048 times per shape, from the JSON that ``bench_indexer.py --sections topk`` writes.

    python benchmarks/plot_topk.py OUT.png TOPK.json [LABEL=OTHER_TOPK.json ...]

Bars per (rows x positions, of a width when the logits are wider), in microseconds on a log scale: ours as dispatched, ours with one
program a row, ``torch.topk`` and sgl-kernel's ``fast_topk_v2`` where it ran; each extra file adds
its dispatched time under LABEL (another state of the code timed on the same GPU).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = (("ours", "ours (dispatched)"), ("ours_per_row", "ours, one program a row"),
          ("torch_topk", "torch.topk"), ("sgl_kernel_topk", "sgl-kernel fast_topk_v2"))  # fmt: skip


def _times(path: str) -> dict[tuple[int, int, int], dict[str, float]]:
    """{(rows, length, width): {series key: us}} of the default-config records (no sweep rows);
    files from before rows had their own length count them as long as the logits are wide."""
    table: dict[tuple[int, int, int], dict[str, float]] = {}
    for r in json.load(open(path))["records"]:
        if r.get("section") != "topk" or r.get("config") != "default":
            continue
        times = {key: 1000 * r[key]["ms"] for key, _ in SERIES if r.get(key) and r[key].get("ms")}
        table[(r["rows"], r.get("length", r["cols"]), r["cols"])] = times
    return table


def _label(rows: int, length: int, width: int) -> str:
    label = f"{rows} x {length / 1024:.3g}K"
    return label if width == length else f"{label} of {width // 1024}K"


def main() -> None:
    out, first, extra = sys.argv[1], sys.argv[2], [a.split("=", 1) for a in sys.argv[3:]]
    table = _times(first)
    shapes = sorted(table)
    labels = [(key, name) for key, name in SERIES if any(key in table[s] for s in shapes)]
    others = [(label, _times(path)) for label, path in extra]
    bars = len(labels) + len(others)
    width = 0.8 / bars
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, (key, name) in enumerate(labels):
        ax.bar([x + i * width for x in range(len(shapes))], [table[s].get(key, 0) for s in shapes], width, label=name)
    for j, (label, other) in enumerate(others, start=len(labels)):
        ax.bar([x + j * width for x in range(len(shapes))], [other.get(s, {}).get("ours", 0) for s in shapes], width,
               label=label)  # fmt: skip
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
    ax.set_xticklabels([_label(*shape) for shape in shapes], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs (CUDA-graph median)")
    env = json.load(open(first)).get("env", {})
    ax.set_title(f"top-k 2048, {env.get('gpu', '?')}, triton {env.get('triton', '?')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
