"""Markdown tables and a plot from one GPU run's result files.

    python benchmarks/report.py benchmarks/results/<run>/

reads ``sparse_mla.json`` and ``indexer.json`` there, prints the
performance tables of docs/performance.md and writes ``summary.png`` beside them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows_by(rows, phase, kv):
    table = {}
    for r in rows:
        if r["phase"] == phase and r["kv"] == kv and "error" not in r:
            table.setdefault((r["heads"], r["tokens"]), {})[r["impl"]] = r
    return table


def sparse_mla_tables(result) -> str:
    c = result["ceilings"]
    lines = [
        f"Sparse MLA, {result['device']}, torch {result['torch']}, triton {result['triton']}, "
        f"SGLang {result['sglang']}; top-k 2048, 2^20-slot cache; ceilings measured in the same run: "
        f"copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s.",
        "",
        "| phase | H | T | ours BF16 µs | SGLang Triton µs | FlashMLA µs | torch µs | ours FP8 µs "
        "| ours BF16 TFLOP/s | ours BF16 GB/s (% copy) | vs SGLang Triton | vs FlashMLA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in ("decode", "prefill"):
        bf16 = _rows_by(result["rows"], phase, "bf16")
        fp8 = _rows_by(result["rows"], phase, "fp8")
        for (heads, tokens), impls in sorted(bf16.items()):
            ours = impls.get("ours")
            if ours is None:
                continue
            sgl, flash = impls.get("sglang-triton"), impls.get("flashmla")
            torch_ = impls.get("torch-gather")
            f8 = fp8.get((heads, tokens), {}).get("ours")
            cell = lambda r: f"{r['us']:.1f}" if r else "–"  # noqa: E731
            ratio = lambda r, o=ours: f"{r['us'] / o['us']:.2f}×" if r else "–"  # noqa: E731
            lines.append(
                f"| {phase} | {heads} | {tokens} | {ours['us']:.1f} | {cell(sgl)} | {cell(flash)} | {cell(torch_)} "
                f"| {cell(f8)} | {ours['tflops']:.0f} | {ours['gbs']:.0f} ({ours['pct_bw']:.0f}%) "
                f"| {ratio(sgl)} | {ratio(flash)} |"
            )
    return "\n".join(lines)


def indexer_tables(result) -> str:
    env, c = result["env"], result["ceilings"]
    lines = [
        f"Indexer, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, SGLang {env['sglang']}; "
        f"ceilings: copy {c['copy_gbs']:.0f} GB/s, FP8 matmul {c['mma_tflops']:.0f} TFLOP/s.",
        "",
        "| kernel | shape | ours µs | ours TFLOP/s or GB/s | baseline | baseline µs | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in result["records"]:
        ours = rec.get("ours") or {}
        if not ours.get("ms"):
            continue
        section = rec["section"]
        if section == "paged":
            shape = f"B={rec['batch']} ctx={rec['context']} next_n={rec['next_n']}"
            rate = f"{ours['tflops']:.0f} TFLOP/s, {ours['gbs']:.0f} GB/s"
            baselines = [("sglang_torch", "SGLang torch fallback")]
        elif section == "prefill":
            shape = f"T={rec['tokens']} N={rec['keys']}"
            rate = f"{ours['tflops']:.0f} TFLOP/s"
            baselines = [("sglang_torch", "SGLang torch fallback"), ("deepgemm", "DeepGEMM fp8_mqa_logits")]
        else:
            shape = f"{rec['rows']}×{rec['cols']}, k={rec['k']}"
            rate = f"{ours['gbs']:.0f} GB/s"
            baselines = [("torch_topk", "torch.topk")]
        for base_key, base_name in baselines:
            if base_key not in rec and base_key == "deepgemm":
                continue  # runs before this baseline was timed
            base = rec.get(base_key) or {}
            if base.get("ms"):
                base_cell, speed = f"{base['ms'] * 1e3:.1f}", f"{base['ms'] / ours['ms']:.1f}×"
            else:
                base_cell, speed = "not measured", "–"
            lines.append(
                f"| {section} | {shape} | {ours['ms'] * 1e3:.1f} | {rate} | {base_name} | {base_cell} | {speed} |"
            )
    return "\n".join(lines)


def plot(result_dir: Path, sparse, indexer) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, heads in zip(axes[:2], (16, 128)):
        for impl, kv, style in (("ours", "bf16", "o-"), ("ours", "fp8", "s--"), ("sglang-triton", "bf16", "^-"), ("torch-gather", "bf16", "x:")):
            pts = sorted(
                (r["tokens"], r["us"])
                for r in sparse["rows"]
                if r["phase"] == "decode" and r["heads"] == heads and r["kv"] == kv and r["impl"] == impl and "error" not in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{impl} {kv.upper()}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("decode batch (tokens)")
        ax.set_ylabel("µs per call")
        ax.set_title(f"sparse MLA decode, H={heads}, top-k 2048")
        ax.legend(fontsize=8)
    labels, ours, base = [], [], []
    for rec in indexer["records"]:
        baseline = rec.get("sglang_torch") or rec.get("torch_topk") or {}
        if rec.get("ours", {}).get("ms") and baseline.get("ms"):
            tag = f"{rec['section']} {rec.get('keys') or rec.get('cols')}"
            labels.append(tag)
            ours.append(rec["ours"]["ms"] * 1e3)
            base.append(baseline["ms"] * 1e3)
    xs = range(len(labels))
    axes[2].bar([x - 0.2 for x in xs], base, 0.4, label="baseline")
    axes[2].bar([x + 0.2 for x in xs], ours, 0.4, label="ours")
    axes[2].set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("µs per call")
    axes[2].set_title("indexer vs baselines")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{sparse['device']} (torch {sparse['torch']}, triton {sparse['triton']})")
    fig.tight_layout()
    fig.savefig(result_dir / "summary.png", dpi=110)


def main() -> None:
    result_dir = Path(sys.argv[1])
    sparse = json.loads((result_dir / "sparse_mla.json").read_text())
    indexer = json.loads((result_dir / "indexer.json").read_text())
    print(sparse_mla_tables(sparse))
    print()
    print(indexer_tables(indexer))
    plot(result_dir, sparse, indexer)


if __name__ == "__main__":
    main()
