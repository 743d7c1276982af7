"""BF16 vs FP8 KV caches, per shape, on the native and the forced SM80 path, from the JSON files
``bench_sparse_mla.py`` writes (one per path, same call).

    python benchmarks/plot_kv_formats.py OUT.png NATIVE.json [FORCED_SM80.json]

Bars per (phase, H, T): ours BF16 (dispatched), ours FP8 (dispatched) and the Triton FP8 kernel
timed beside it (the FP8 kernel before the Gluon one), as time relative to ours BF16.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows):
    """{(phase, H, T): {"bf16": us, "fp8": us, "fp8 triton": us}} for decode and prefill."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "error" in r or r["phase"] not in ("decode", "prefill"):
            continue
        key = (r["phase"], r["heads"], r["tokens"])
        if r["impl"] == "ours":
            table.setdefault(key, {})[r["kv"]] = r["us"]
        elif r["kv"] == "fp8" and r["impl"].startswith("ours[h"):
            table.setdefault(key, {})["fp8 triton"] = r["us"]
    return {k: v for k, v in sorted(table.items()) if "bf16" in v and "fp8" in v}


def main() -> None:
    out, files = sys.argv[1], sys.argv[2:]
    fig, axes = plt.subplots(len(files), 1, figsize=(11, 3.6 * len(files)), squeeze=False)
    for ax, path in zip(axes[:, 0], files, strict=True):
        result = json.load(open(path))
        series = _series(result["rows"])
        labels = [f"{p[0][:3]} H{h} T{t}" for p, h, t in ((k, k[1], k[2]) for k in series)]
        x = range(len(series))
        for offset, (name, color) in enumerate((("bf16", "tab:blue"), ("fp8", "tab:orange"), ("fp8 triton", "tab:gray"))):
            ys = [v.get(name, float("nan")) / v["bf16"] for v in series.values()]
            ax.bar([i + (offset - 1) * 0.27 for i in x], ys, 0.27, label=f"ours {name}", color=color)
        ax.axhline(0.75, color="k", lw=0.8, ls="--", label="FP8 target (0.75x BF16)")
        ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time / ours BF16")
        path_name = "forced SM80 path" if result.get("forced_sm80") else "native path"
        ax.set_title(f"{result['device']}, {path_name}, triton {result['triton']}", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
