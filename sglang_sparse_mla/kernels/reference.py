"""Float64 torch references for every kernel in this package.

They define the semantics the Triton kernels are tested against: plain,
readable torch in float64 on whatever device the inputs are on, processed in
chunks of rows so that the large test shapes fit in memory.
"""

from __future__ import annotations

import torch

from .index_format import INDEX_SCALE_BYTES, IndexNorm, IndexRope, hadamard_signs
from .kv_cache_layout import D_LATENT, as_slot_rows, dequantize_kv_fp8


def kv_rows_float64(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[num_slots, 576]`` float64 values the attention kernels compute with.

    FP8 rows are dequantized (code * scale in float32) and rounded to bf16,
    the precision of a BF16 cache, as the kernels do.
    """
    rows = as_slot_rows(kv_cache)
    if rows.is_fp8:
        return dequantize_kv_fp8(rows.latent).bfloat16().double()
    return rows.latent.double()


def sparse_mla_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = D_LATENT,
    chunk: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention in float64.

    Returns ``out [T, H, d_v]`` and ``lse [T, H]`` (natural log), both float64;
    rows with no valid index give zeros and ``-inf``.
    """
    kv = kv_rows_float64(kv_cache)
    num_slots = kv.shape[0]
    num_tokens, num_heads, _ = q.shape
    out = torch.zeros(num_tokens, num_heads, d_v, dtype=torch.float64, device=q.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"), dtype=torch.float64, device=q.device)
    for t0 in range(0, num_tokens, chunk):
        idx = indices[t0 : t0 + chunk].long()
        valid = (idx >= 0) & (idx < num_slots)
        k = kv[torch.where(valid, idx, 0)]  # [t, topk, 576]
        scores = torch.einsum("thd,tkd->thk", q[t0 : t0 + chunk].double(), k) * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        has_keys = valid.any(dim=-1)[:, None].expand_as(row_lse)
        probs = torch.where(
            has_keys[..., None], torch.exp(scores - row_lse[..., None]), torch.zeros_like(scores)
        )
        out[t0 : t0 + chunk] = torch.einsum("thk,tkd->thd", probs, k[..., :d_v])
        lse[t0 : t0 + chunk] = torch.where(has_keys, row_lse, float("-inf"))
    return out, lse


# ---------------------------------------------------------------------------
# Lightning indexer: MQA logits, top-k selection, KV-slot mapping.
# ---------------------------------------------------------------------------


def _weighted_relu_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_h weights[t, h] * relu(q[t, h] . k[n])`` in float64, ``[T, N]``."""
    scores = torch.einsum("thd,nd->thn", q.double(), k.double()).clamp_min_(0)
    return torch.einsum("thn,th->tn", scores, weights.double())


def _rows_per_chunk(num_heads: int, num_keys: int, budget: int = 1 << 26) -> int:
    return max(1, budget // max(1, num_heads * num_keys))


def mqa_logits_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
) -> torch.Tensor:
    """Ragged-prefill indexer logits in float64 (see ``fp8_mqa_logits``).

    ``q`` ``[T, H, D]`` and ``k`` ``[N, D]`` FP8, ``k_scale`` ``[N]``, ``weights``
    ``[T, H]``, ``ks``/``ke`` ``[T]``. Returns ``[T, N]`` float64: the scores for
    ``ks[t] <= n < ke[t]``, ``-inf`` elsewhere.
    """
    num_tokens, num_heads, _ = q.shape
    num_keys = k.shape[0]
    out = torch.full((num_tokens, num_keys), float("-inf"), dtype=torch.float64, device=q.device)
    cols = torch.arange(num_keys, device=q.device)
    step = _rows_per_chunk(num_heads, num_keys)
    for t0 in range(0, num_tokens, step):
        t1 = min(t0 + step, num_tokens)
        logits = _weighted_relu_logits(q[t0:t1], k, weights[t0:t1]) * k_scale.double()[None, :]
        valid = (cols[None, :] >= ks[t0:t1, None].long()) & (cols[None, :] < ke[t0:t1, None].long())
        out[t0:t1] = torch.where(valid, logits, out[t0:t1])
    return out


def index_k_cache_rows(kv_cache: torch.Tensor, block_table_row: torch.Tensor, num_positions: int):
    """The FP8 keys ``[P, D]`` and float32 scales ``[P]`` of logical positions
    ``0 .. P-1`` of one request in SGLang's paged DSA index-K layout
    (``[num_blocks, block_size, 1, D + 4]`` uint8: per block, the
    ``block_size * D`` key bytes, then ``block_size`` float32 scales)."""
    num_blocks, block_size, _, row_bytes = kv_cache.shape
    head_dim = row_bytes - INDEX_SCALE_BYTES
    flat = kv_cache.reshape(num_blocks, block_size * row_bytes)
    keys = flat[:, : block_size * head_dim].reshape(num_blocks, block_size, head_dim)
    scales = flat[:, block_size * head_dim :].contiguous().view(torch.float32)
    pos = torch.arange(num_positions, device=kv_cache.device)
    blocks = block_table_row.long()[pos // block_size]
    rows = pos % block_size
    return keys[blocks, rows].view(torch.float8_e4m3fn), scales[blocks, rows]


def paged_mqa_logits_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context_len: int,
) -> torch.Tensor:
    """Paged decode indexer logits in float64 (see ``fp8_paged_mqa_logits``).

    Returns ``[B * next_n, max_context_len]`` float64: row ``b * next_n + j``
    scores positions ``p < context_lens[b] - next_n + j + 1``, ``-inf`` elsewhere.
    """
    batch, next_n, _, _ = q.shape
    block_size = kv_cache.shape[1]
    out = torch.full((batch * next_n, max_context_len), float("-inf"), dtype=torch.float64, device=q.device)
    cap = min(max_context_len, block_table.shape[1] * block_size)
    for b in range(batch):
        context = int(context_lens[b])
        width = max(0, min(context, cap))
        if width == 0:
            continue
        keys, scales = index_k_cache_rows(kv_cache, block_table[b], width)
        rows = slice(b * next_n, (b + 1) * next_n)
        logits = _weighted_relu_logits(q[b], keys, weights[rows]) * scales.double()[None, :]
        for j in range(next_n):
            visible = max(0, min(context - next_n + j + 1, width))
            out[b * next_n + j, :visible] = logits[j, :visible]
    return out


def topk_indices_reference(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    row_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k positions per row, ``[T, k]`` int32 (see ``topk_indices``).

    Row ``t`` ranks columns ``row_starts[t] + i`` for ``0 <= i < lengths[t]``
    by value (descending; among equal values the lower position first) and
    returns the first ``min(k, lengths[t])`` offsets ``i`` in that order,
    padded with ``-1``.
    """
    num_rows, num_cols = logits.shape
    starts = torch.zeros_like(lengths) if row_starts is None else row_starts
    out = torch.full((num_rows, k), -1, dtype=torch.int32, device=logits.device)
    cols = torch.arange(num_cols, device=logits.device)
    rel = cols[None, :] - starts[:, None].long()
    inside = (rel >= 0) & (rel < lengths[:, None].long())
    # Stable sorts: by value (descending), then window members first.
    order = torch.sort(logits.double(), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort((~inside).gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    taken = min(k, num_cols)
    picked = (order[:, :taken] - starts[:, None].long()).to(torch.int32)
    counts = inside.sum(dim=1, keepdim=True)
    picked = torch.where(torch.arange(taken, device=logits.device)[None, :] < counts, picked, -1)
    out[:, :taken] = picked
    return out


def topk_to_kv_slots_reference(
    topk: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    token_to_req: torch.Tensor | None = None,
    tokens_per_req: int = 1,
) -> torch.Tensor:
    """``req_to_token[req_pool_indices[r(t)], topk[t, j]]`` with ``-1`` kept,
    ``r(t) = token_to_req[t]`` or ``t // tokens_per_req`` (see ``topk_to_kv_slots``)."""
    num_rows = topk.shape[0]
    if token_to_req is None:
        token_to_req = torch.arange(num_rows, device=topk.device) // tokens_per_req
    pool_rows = req_pool_indices.long()[token_to_req.long()]
    valid = topk >= 0
    slots = req_to_token[pool_rows[:, None], torch.where(valid, topk, 0).long()]
    return torch.where(valid, slots, -1).to(torch.int32)


def index_fp8_quant_reference(
    x: torch.Tensor,
    *,
    rotate: bool,
    scale_format: str,
    rope: IndexRope | None = None,
    norm: IndexNorm | None = None,
    round_bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [..., 128] float8_e4m3fn, scales [...] float32)`` of bf16 index rows ``x [T, 128]`` or
    ``[T, H, 128]``.

    The rotation is the fp64 product with the orthonormal Walsh-Hadamard
    matrix, rounded to bf16. ``norm`` and ``rope`` (see
    :mod:`.index_fp8_quant`) are applied in fp64, then rounded to bf16 where
    ``round_bf16`` (keys). The scale and codes follow SGLang's formats, whose
    fp32 operations are part of the definition (so computed in fp32):
    ``"ue8m0"``: ``max(amax, 1e-4) * (1 / 448)`` raised to the next power of
    two, codes of the (exact) quotients; ``"fp32"``: ``max(amax, 1e-4) / 448``,
    codes of ``x * (1 / scale)``, ``x`` rounded to fp32 first. Codes are
    clamped to +-448 and rounded to e4m3 by torch.
    """
    values = x.double()
    if rotate:
        dim = x.shape[-1]
        values = (values @ hadamard_signs(dim, torch.float64, x.device) * dim**-0.5).bfloat16().double()
    if norm is not None:
        mean = values.mean(dim=-1, keepdim=True)
        variance = (values - mean).square().mean(dim=-1, keepdim=True)
        values = (values - mean) / (variance + norm.eps).sqrt() * norm.weight.double() + norm.bias.double()
    if rope is not None:
        pairs = rope.cos_sin_cache.shape[1] // 2
        angles = rope.cos_sin_cache[rope.positions.long()].double()
        cos, sin = angles[:, :pairs], angles[:, pairs:]
        if values.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        even, odd = values[..., 0 : 2 * pairs : 2], values[..., 1 : 2 * pairs : 2]
        values = values.clone()
        values[..., 0 : 2 * pairs : 2], values[..., 1 : 2 * pairs : 2] = even * cos - odd * sin, even * sin + odd * cos
    if round_bf16:
        values = values.bfloat16().double()
    amax = values.float().abs().amax(dim=-1).clamp_min(1e-4)
    if scale_format == "ue8m0":  # the next power of two, exactly (CUDA's float64 log2 of 2**-3 is not -3)
        scales = amax * torch.tensor(1.0 / 448.0, dtype=torch.float32)
        mantissa, exponent = torch.frexp(scales)
        scales = torch.where(mantissa == 0.5, scales, torch.ldexp(torch.ones_like(scales), exponent))
        scaled = values.float() / scales.unsqueeze(-1)
    elif scale_format == "fp32":  # tensor / tensor: CUDA divides a tensor by a scalar as a reciprocal product
        scales = amax / torch.full_like(amax, 448.0)
        scaled = values.float() * (torch.ones_like(scales) / scales).unsqueeze(-1)
    else:
        raise ValueError(f"unknown scale_format {scale_format!r}")
    return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scales
