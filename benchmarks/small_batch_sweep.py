"""Top-k and sparse MLA at decode batch sizes: every tile config and split count.

    PYTHONPATH=. OUT=DIR python benchmarks/small_batch_sweep.py      (CUDA GPU)

Top-k 2048 over rows of 2K-128K random logits at 1-128 rows (default and
candidate configs, ragged lengths, fused slot mapping, ``torch.topk`` beside);
sparse MLA decode at 128 heads, top-k 2048 sorted slots inside each token's own
8192-slot context, 1-32 tokens, every candidate config x split count. Times are
medians of CUDA-graph replays over 8-16 input sets; ``DIR/probe.json`` holds
them in microseconds.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import time_launches

from sglang_sparse_mla.kernels import SparseMLAConfig, sparse_mla_forward, topk_indices
from sglang_sparse_mla.kernels.topk import TopKConfig

out = {}


def rec(name, ms):
    out[name] = ms * 1000
    print(f"{name:70s} {ms * 1000:8.1f} us", flush=True)


K = 2048
for rows in (1, 8, 32, 128):
    for cols in (2048, 4096, 8192, 32768, 131072):
        sets = [
            dict(
                l=torch.randn(rows, cols, device="cuda"), n=torch.full((rows,), cols, dtype=torch.int32, device="cuda")
            )
            for _ in range(8)
        ]
        cfgs = [None]
        if cols == 8192 and rows in (1, 32):
            cfgs += [
                TopKConfig(4096, 4096, 16, 1),
                TopKConfig(4096, 4096, 4, 1),
                TopKConfig(8192, 8192, 16, 1),
                TopKConfig(4096, 8192, 16, 1),
            ]
        for cfg in cfgs:
            try:
                t = time_launches([lambda s=s, cfg=cfg: topk_indices(s["l"], s["n"], K, config=cfg) for s in sets])
                rec(f"topk rows={rows} cols={cols} cfg={cfg}", t.ms)
            except Exception as e:
                print("ERR", rows, cols, cfg, e)
        if cols in (8192,) and rows <= 32:
            sets2 = [
                dict(
                    l=torch.randn(rows, cols, device="cuda"),
                    n=torch.randint(cols // 2, cols, (rows,), dtype=torch.int32, device="cuda"),
                )
                for _ in range(8)
            ]
            t = time_launches([lambda s=s: topk_indices(s["l"], s["n"], K) for s in sets2])
            rec(f"topk rows={rows} cols={cols} ragged lengths", t.ms)
            r2t = torch.arange(rows * cols, device="cuda", dtype=torch.int32).view(rows, cols)
            rpi = torch.arange(rows, device="cuda", dtype=torch.int32)
            t = time_launches(
                [
                    lambda s=s, r2t=r2t, rpi=rpi: topk_indices(
                        s["l"], s["n"], K, req_to_token=r2t, req_pool_indices=rpi
                    )
                    for s in sets
                ]
            )
            rec(f"topk rows={rows} cols={cols} map_slots", t.ms)
        width = min(K, cols)
        t = time_launches([lambda s=s, n=width: torch.topk(s["l"], n, dim=-1) for s in sets])
        rec(f"torch.topk rows={rows} cols={cols}", t.ms)
        del sets

CTX = 8192
H = 128
kv = torch.randn(32 * CTX * 4, 576, device="cuda").bfloat16()
for T in (1, 2, 4, 8, 32):
    sets = []
    for i in range(16):
        q = torch.randn(T, H, 576, device="cuda").bfloat16()
        base = (torch.arange(T, device="cuda") * CTX + i * 32 * CTX % kv.shape[0]) % kv.shape[0]
        idx = torch.stack([torch.randperm(CTX, device="cuda")[:K] for _ in range(T)]).sort(-1).values + base[:, None]
        sets.append((q, idx.int()))
    for cfg in (
        None,
        (64, 64, 8, 3),
        (64, 64, 8, 2),
        (64, 32, 8, 2),
        (64, 32, 4, 2),
        (32, 64, 8, 2),
        (32, 32, 4, 2),
        (16, 32, 4, 2),
        (16, 64, 4, 2),
    ):
        c = SparseMLAConfig(*cfg) if cfg else None
        for splits in (None, 1, 4, 8, 16, 32):
            try:
                t = time_launches(
                    [
                        lambda q=q, i=i, s=splits, c=c: sparse_mla_forward(q, kv, i, 0.04, num_kv_splits=s, config=c)
                        for q, i in sets
                    ]
                )
                rec(f"mla T={T} cfg={cfg} splits={splits}", t.ms)
            except Exception as e:
                print("ERR", T, cfg, splits, str(e)[:100])
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w"), indent=1)
