"""Where one row's top-k selection spends its time, by phase, in SM clock cycles.

    PYTHONPATH=. python benchmarks/topk_phase_cycles.py      (CUDA GPU)

Loads a copy of ``sglang_sparse_mla/kernels/topk.py`` with ``%clock64`` reads
inserted between the phases (bound + candidate filter, with the chunk-maxima
pass and the lower-bound search inside it; the threshold search; the emit
pass), runs it on one row of random logits per width and prints the cycle
counts and whether the selection equals ``torch.topk``'s. The insertion points
are matched as text: the script fails loudly when the kernel changes shape.
"""

import importlib.util
import os
import sys
import tempfile

import torch

import sglang_sparse_mla.kernels.topk as topk_mod


def patch(text: str, old: str, new: str) -> str:
    if old not in text:
        raise SystemExit(f"topk.py changed: cannot find {old!r}; update this script")
    return text.replace(old, new)


src = open(topk_mod.__file__).read()
src = patch(src, "from .", "from sglang_sparse_mla.kernels.")
src = patch(src, "    EMIT_BLOCK: tl.constexpr,\n):", "    EMIT_BLOCK: tl.constexpr,\n    dbg_ptr,\n):")
src = patch(
    src,
    "        row64 = tl.cast(row, tl.int64)\n",
    "        row64 = tl.cast(row, tl.int64)\n        tl.store(dbg_ptr + row * 8 + 0, _clk())\n",
)
src = patch(
    src,
    "        in_registers = count <= CAP\n",
    "        tl.store(dbg_ptr + row * 8 + 1, _clk())\n        in_registers = count <= CAP\n",
)
src = patch(
    src,
    "        num_source = tl.where(in_registers, count, length)\n",
    "        tl.store(dbg_ptr + row * 8 + 2, _clk())\n        num_source = tl.where(in_registers, count, length)\n",
)
src = patch(
    src,
    "        for c0 in range(taken, k, EMIT_BLOCK):\n",
    "        tl.store(dbg_ptr + row * 8 + 3, _clk())\n"
    "        tl.store(dbg_ptr + row * 8 + 4, count)\n"
    "        for c0 in range(taken, k, EMIT_BLOCK):\n",
)
src = patch(
    src,
    "    tl.debug_barrier()  # the previous row",
    "    tl.store(dbg_ptr + 5, _clk())\n    tl.debug_barrier()  # the previous row",
)
src = patch(
    src,
    "CAP: tl.constexpr, BOUND_BITS: tl.constexpr\n):",
    "CAP: tl.constexpr, BOUND_BITS: tl.constexpr, dbg_ptr\n):",
)
src = patch(
    src,
    "_lower_bound_and_candidates(row_ptr, scratch_row, length, k, CHUNKS, CAP, _BOUND_BITS)",
    "_lower_bound_and_candidates(row_ptr, scratch_row, length, k, CHUNKS, CAP, _BOUND_BITS, dbg_ptr)",
)
src = patch(
    src,
    "    chunk_keys = _ordered_key(chunk_max)\n",
    "    chunk_keys = _ordered_key(chunk_max)\n    tl.store(dbg_ptr + 6, _clk())\n",
)
src = patch(
    src,
    "@triton.jit\ndef _ordered_key",
    """@triton.jit
def _clk():
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _ordered_key""",
)
path = os.path.join(tempfile.mkdtemp(), "topk_probe.py")
with open(path, "w") as f:
    f.write(src)
spec = importlib.util.spec_from_file_location("topk_probe", path)
mod = importlib.util.module_from_spec(spec)
sys.modules["topk_probe"] = mod
spec.loader.exec_module(mod)

for cols, cfg in [
    (2048, None),
    (4096, None),
    (8192, None),
    (8192, mod.TopKConfig(8192, 8192, 16, 1)),
    (32768, None),
    (131072, None),
]:
    cfg = cfg or mod.default_config(2048)
    logits = torch.randn(1, cols, device="cuda")
    lengths = torch.full((1,), cols, dtype=torch.int32, device="cuda")
    out = torch.empty(1, 2048, dtype=torch.int32, device="cuda")
    scratch = torch.empty(1, cfg.cap, dtype=torch.int32, device="cuda")
    dbg = torch.zeros(16, dtype=torch.int64, device="cuda")
    for _ in range(3):
        mod._topk_kernel[(1,)](
            logits,
            lengths,
            lengths,
            out,
            scratch,
            out,
            lengths,
            lengths,
            1,
            cols,
            2048,
            1,
            0,
            logits.stride(0),
            out.stride(0),
            0,
            HAS_ROW_STARTS=False,
            MAP_SLOTS=False,
            HAS_TOKEN_TO_REQ=False,
            CHUNKS=cfg.chunks,
            CAP=cfg.cap,
            EMIT_BLOCK=1024,
            dbg_ptr=dbg,
            num_warps=cfg.num_warps,
            num_stages=1,
        )
    torch.cuda.synchronize()
    d = dbg.tolist()
    ref = torch.topk(logits, 2048).indices.sort().values
    ok = torch.equal(out.sort().values.long(), ref) if cols >= 2048 else None
    print(
        f"cols={cols:6d} {cfg}: bound+filter {d[1] - d[0]:7d} cyc "
        f"(pass1 {d[6] - d[0] if d[6] else 0}, search lo {d[5] - d[6] if d[6] else 0}), "
        f"search tau {d[2] - d[1]:7d}, emit {d[3] - d[2]:7d}, candidates {d[4]}, total {d[3] - d[0]} cyc ok={ok}"
    )
