"""Throughput, per-request decode rate and TTFT of an end-to-end run, one bar per configuration and concurrency.

    python benchmarks/e2e/plot_e2e.py DIR

reads DIR/summary.json (written by run_e2e.py) and writes DIR/throughput.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (
    ("throughput_output_tok_per_s", "output tokens/s, prefill included (higher is better)"),
    ("decode_tok_per_s_per_request_p50", "decode tokens/s per request, p50 (higher is better)"),
    ("ttft_p50_ms", "TTFT p50, ms (lower is better)"),
)


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(17, 4.2))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        table = summary.get(key, {})
        configs = list(table)
        levels = sorted({c for values in table.values() for c in values}, key=int)
        width = 0.8 / max(1, len(configs))
        for i, config in enumerate(configs):
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(levels))]
            ax.bar(xs, [table[config].get(c, 0.0) for c in levels], width, label=config)
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.set_title(label)
        ax.legend(fontsize=8)
    meta = summary.get("meta", {})
    shape = f"{meta.get('shape', 'small')} shape" + (f", {meta['layers']} layers" if "layers" in meta else "")
    fig.suptitle(f"tiny {meta.get('arch', '?')} model ({shape}) served by SGLang on {meta.get('gpu', '?')}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = Path(sys.argv[1])
    plot(json.loads((folder / "summary.json").read_text()), folder / "throughput.png")


if __name__ == "__main__":
    main()
