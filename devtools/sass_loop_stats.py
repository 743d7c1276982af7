"""What a kernel's hot loop costs, read from its SASS, without a GPU.

    python devtools/sass_loop_stats.py [--candidates] REGEX [REGEX ...]

Compiles the compile-check jobs of ``tests/kernels/test_sparse_mla_compile.py`` whose labels
match any REGEX (e.g. ``'sm80-fp8-.*block_h=16.*-split'``; ``--list`` prints the labels) exactly
as CI compiles them (``--candidates`` adds the split launches of ``bench_sparse_mla.py
--sweep-gluon``'s candidates on every arch, labelled ``smCC-KV-candidate-LABEL``), and prints for
each its registers and shared memory and, for its longest loop (the widest backward branch in the
SASS), the instructions one iteration issues per thread: the total, CTA barriers, tensor-core
MMAs, and the most frequent opcodes. Static counts, not timings: a change that cuts a loop's
instructions or barriers is worth timing on a GPU; one that adds them needs a reason.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "kernels"), str(ROOT / "benchmarks")]

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction of the (single-kernel) SASS text."""
    found = []
    for line in sass.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            found.append((int(m.group(1), 16), m.group(2), m.group(4)))
    return found


def longest_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the widest backward branch's span (target .. branch), or ``[]``."""
    best = (0, 0)
    for address, opcode, operands in code:
        target = re.match(r"(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", operands)
        if opcode == "BRA" and target and target.group(1):
            start = int(target.group(1), 16)
            if start < address and address - start > best[1] - best[0]:
                best = (start, address)
    return [ins for ins in code if best[0] <= ins[0] <= best[1]] if best[1] else []


def loop_stats(sass: str) -> dict:
    loop = longest_loop(instructions(sass))
    ops = Counter(opcode for _, opcode, _ in loop)
    return dict(instructions=len(loop), barriers=ops["BAR"], mma=ops["HMMA"] + ops["HGMMA"], top=ops.most_common(10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", help="regular expressions over the compile-check labels")
    parser.add_argument("--list", action="store_true", help="print the labels and stop")
    parser.add_argument("--candidates", action="store_true", help="also the Gluon sweep's candidate configs")
    args = parser.parse_args()

    from target_compile import SHARED_MEMORY_LIMIT, job_sass
    from test_sparse_mla_compile import CASES, sparse_mla_job

    jobs = [(label, job) for label, _, job in CASES]
    if args.candidates:
        from bench_sparse_mla import config_label, gluon_sweep_candidates

        for capability in SHARED_MEMORY_LIMIT:
            for (kv, _), configs in gluon_sweep_candidates().items():
                for config in configs:
                    label = f"sm{capability}-{kv}-candidate-{config_label(config)}"
                    jobs.append((label, sparse_mla_job(capability, kv == "fp8", config, True, False)))
    if args.list:
        print("\n".join(label for label, _ in jobs))
        return
    chosen = [(label, job) for label, job in jobs if any(re.search(p, label) for p in args.patterns)]
    if not chosen:
        parser.error("no compile-check label matches; see --list")
    for label, job in chosen:
        sass, registers, shared = job_sass(job)
        stats = loop_stats(sass)
        print(f"{label}\n  {registers} registers, {shared} B shared; loop: "
              f"{stats['instructions']} instructions, {stats['barriers']} barriers, {stats['mma']} MMAs; "
              + " ".join(f"{op} {n}" for op, n in stats["top"]))  # fmt: skip


if __name__ == "__main__":
    main()
