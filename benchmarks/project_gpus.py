"""Projected kernel times on GPUs we cannot borrow (A100, RTX 4090, DGX Spark), from a measured run.

    python benchmarks/project_gpus.py OUT_DIR SPARSE_MLA.json [INDEXER.json]

Inputs are the JSON files of ``bench_sparse_mla.py`` and ``bench_indexer.py`` from one call on the
forced SM80 path (``SGLANG_SPARSE_MLA_FORCE_SM80=1``: the code those GPUs run) with the ceilings
that call measured. Each kernel keeps, on the target, the fraction of its roofline it reached on
the measured GPU:

    roofline(gpu) = max(bytes / memory_ceiling(gpu), flops / mma_ceiling(gpu))
    efficiency    = roofline(measured gpu) / measured time
    projected     = roofline(target) / efficiency

* Memory ceiling: what the run measured for this kind of read (random gathers of the cache's
  row size for sparse MLA decode, a device copy for the paged logits), scaled by the ratio of
  the target's datasheet bandwidth to the measured GPU's.
* MMA ceiling: the SM80-class ``mma_v2`` ceiling on the measured GPU; on the targets, which
  have no wgmma, their datasheet dense BF16 (FP32-accumulate) tensor rate times the fraction
  of its datasheet rate that cuBLAS reached on the measured GPU (``bf16_tflops``; the FP8
  ``_scaled_mm`` ceiling of the indexer run is not used).
* Prefill's "bytes" are logical (tokens share rows through the L2), so prefill is projected by
  its FLOPs alone; decode rows below 32 tokens and the top-k are latency-bound (launch,
  barriers, SM count), which no roofline captures: they are not projected.

Everything written is labelled "projected": no such GPU ran it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Datasheet figures: memory GB/s, dense BF16 tensor TFLOP/s with FP32 accumulate.
DATASHEETS = {
    "NVIDIA H100 80GB HBM3": (3350.0, 989.4),  # H100 SXM5 datasheet
    "NVIDIA H200": (4800.0, 989.4),  # H200 SXM datasheet
}
TARGETS = {
    "A100 80GB SXM (SM80)": (2039.0, 312.0, "A100 datasheet"),
    "RTX 4090 (SM89)": (1008.0, 165.2, "Ada whitepaper, BF16 with FP32 accumulate"),
    # GB10's BF16 rate is not published: 1 PFLOP FP4 with sparsity divided by 16, the ratio of the
    # RTX 5090's published FP4-sparse to BF16-dense FP32-accumulate rates (3352 / 209.5).
    "DGX Spark GB10 (SM121)": (273.0, 62.5, "273 GB/s datasheet; BF16 derived, not published"),
}
MIN_DECODE_TOKENS = 32


def _datasheet(device: str) -> tuple[float, float]:
    for name, sheet in DATASHEETS.items():
        if device.startswith(name):
            return sheet
    raise SystemExit(f"no datasheet figures for the measured GPU {device!r}: add it to DATASHEETS")


def _project(us: float, bytes_moved: float, flops: float, memory: float, mma: float, targets) -> dict:
    """``{target: projected us}`` for a kernel of ``us`` on the measured GPU (ceilings in GB/s and
    TFLOP/s; ``targets``: ``{name: (memory ceiling, mma ceiling)}``)."""
    roofline = max(bytes_moved / (memory * 1e3), flops / (mma * 1e6))
    efficiency = roofline / us
    out = {"efficiency": efficiency}
    for name, (t_memory, t_mma) in targets.items():
        out[name] = max(bytes_moved / (t_memory * 1e3), flops / (t_mma * 1e6)) / efficiency
    return out


def sparse_mla_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    if not data.get("forced_sm80"):
        raise SystemExit(f"{path}: not a forced SM80 run (SGLANG_SPARSE_MLA_FORCE_SM80=1)")
    bandwidth, tensor = _datasheet(data["device"])
    ceilings = data["ceilings"]
    cublas_share = ceilings["bf16_tflops"] / tensor
    rows = []
    for r in data["rows"]:
        if r["impl"] != "ours" or (r["phase"] == "decode" and r["tokens"] < MIN_DECODE_TOKENS):
            continue
        row_bytes = "1152" if r["kv"] == "bf16" else "656"
        gather = ceilings["gather_gbs"][row_bytes]
        prefill = r["phase"] != "decode"
        targets = {
            name: (float("inf") if prefill else bw * gather / bandwidth, tc * cublas_share)
            for name, (bw, tc, _) in TARGETS.items()
        }
        us = r["us"]
        moved = 0.0 if prefill else r["gbs"] * us * 1e3  # GB/s * us = kB
        flops = r["tflops"] * us * 1e6  # TFLOP/s * us = MFLOP
        projected = _project(us, moved, flops, gather, ceilings["mma_v2_tflops"], targets)
        label = f"sparse MLA {r['phase']} {r['kv']} H={r['heads']} T={r['tokens']}"
        rows.append({"kernel": label, "measured_us": us, **projected})
    return rows


def paged_logits_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    env, ceilings = data["env"], data["ceilings"]
    if env.get("native_fp8_path", True):
        raise SystemExit(f"{path}: not a forced SM80 run (native_fp8_path is set)")
    bandwidth, _ = _datasheet(env["gpu"])
    targets = {name: (bw * ceilings["copy_gbs"] / bandwidth, tc) for name, (bw, tc, _) in TARGETS.items()}
    rows = []
    for r in data["records"]:
        if r.get("section") != "paged" or r.get("config") != "default" or r["batch"] < 32 or not r["ours"].get("ms"):
            continue
        ours = r["ours"]
        us = ours["ms"] * 1e3
        projected = _project(us, ours["gbs"] * us * 1e3, ours["tflops"] * us * 1e6, ceilings["copy_gbs"],
                             ceilings["mma_v2_tflops"], targets)  # fmt: skip
        label = f"paged logits B={r['batch']} ctx={r['context']} width={r['width']}"
        rows.append({"kernel": label, "measured_us": us, **projected})
    return rows


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    sources = [Path(p) for p in sys.argv[2:]]
    rows = sparse_mla_rows(sources[0]) + (paged_logits_rows(sources[1]) if len(sources) > 1 else [])
    measured = json.loads(sources[0].read_text())["device"]
    names = list(TARGETS)
    lines = [
        f"Projected µs (not measured): each kernel at the share of its roofline it reached on the {measured}",
        "(forced SM80 path); see benchmarks/project_gpus.py for the model and the datasheet figures.",
        "",
        "| kernel | measured µs | roofline share | " + " | ".join(f"{n}, projected µs" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cells = " | ".join(f"{r[n]:.0f}" for n in names)
        lines.append(f"| {r['kernel']} | {r['measured_us']:.1f} | {100 * r['efficiency']:.0f}% | {cells} |")
    lines += ["", "Targets: " + "; ".join(f"{n}: {bw:g} GB/s, {tc:g} TFLOP/s ({src})" for n, (bw, tc, src) in TARGETS.items())]
    (out / "projection.md").write_text("\n".join(lines) + "\n")
    meta = {"measured_gpu": measured, "sources": [str(p) for p in sources], "targets": TARGETS}
    (out / "projection.json").write_text(json.dumps({"projected": True, **meta, "rows": rows}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    width = 0.8 / (len(names) + 1)
    xs = range(len(rows))
    ax.bar([x - 0.4 + width / 2 for x in xs], [r["measured_us"] for r in rows], width, label=f"{measured} (measured)")
    for i, n in enumerate(names, start=1):
        ax.bar([x - 0.4 + width / 2 + i * width for x in xs], [r[n] for r in rows], width, label=f"{n} (projected)")
    ax.set_xticks(list(xs), [r["kernel"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.set_title("forced SM80 path: measured, and projected to other GPUs (not measured)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "projection.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
