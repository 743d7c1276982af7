"""Sparse MLA with Ampere-class instructions (SM80 and up), in Gluon.

The kernel :func:`.sparse_mla.sparse_mla_forward` launches for FP8 caches on
every GPU from SM80 on where Triton has Gluon (see :mod:`.sparse_mla_configs`);
same grid, arguments and results as the Triton kernels there. It exists
because Triton's own pipeliner cannot express what an FP8 cache needs: the
dequantization of each row must happen once, into a tile that both products
read. Triton's layout passes instead rebuild the bf16 values in registers
once per MMA operand layout (K for ``QK^T``, V for ``PV``) from bytes it does
not pipeline, which made the FP8 kernel slower than BF16 although it reads
43% fewer bytes. Here everything is explicit:

* the row gathers are ``cp.async`` copies into a ring of ``STAGES`` stages,
  ``STAGES - 1`` tiles ahead of the one being computed (one commit group a
  tile; invalid entries are zero-filled rows);
* FP8: each ``BLOCK_N``-row tile's 512 codes a row are read from the ring as
  32-bit words, dequantized once (``code * scale`` rounded to bf16, as the
  Triton kernel rounds them; with ``WORD_DEQUANT`` the codes are rebuilt two
  a word with integer masks, the same bits in fewer instructions) and stored
  to one bf16 tile in shared memory.
  The tile holds byte planes: plane ``b`` holds latent columns ``4j + b``,
  the queries are stored in the same column order and each plane's output
  goes back to its columns, so no byte is shuffled. BF16: the ring's tiles
  (natural column blocks ``128 b + j``) are the operands themselves;
* ``QK^T`` (latent planes and rope) and ``PV`` run as ``mma_v2`` (bf16 in,
  fp32 accumulate) with their operands loaded from shared memory by
  ``ldmatrix``; the online softmax runs in registers.

Invalid entries (negative, out of range, past the split or the row's valid
tail) are masked to ``-inf``; a row with none gives ``out = 0``,
``lse = -inf``. Results: a normalized fp32 partial with its log2-sum-exp per
split, merged by :func:`.sparse_mla._merge_splits_kernel`, or the final
output, exactly as the Triton kernels write them.

Gluon has no interpreter: CPU CI compiles this kernel for every supported
arch (shared memory, spills); it runs in the GPU tests only.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .fp8_convert import fp8_e4m3_to_f32
from .kv_cache_layout import FP8_ROPE_OFFSET, FP8_SCALE_OFFSET
from .sparse_mla_gluon_common import cta_barrier, online_softmax_step, program_keys, store_lse

# ``async_load`` in Triton 3.8; 3.6 names it ``async_copy_global_to_shared`` (3.8 keeps the alias).
_async_load = async_copy.async_copy_global_to_shared
# Column of an FP8 row's first scale word (int32 view) and first rope value (bf16 view).
_SCALE_COL = gl.constexpr(FP8_SCALE_OFFSET // 4)
_ROPE_COL = gl.constexpr(FP8_ROPE_OFFSET // 2)
# Columns of a query block / key tile per ``QK^T`` product: fewer operand registers live at once.
_QK_CHUNK = gl.constexpr(64)


@gluon.jit
def _tile_slots(idx_row, n0, end, num_slots, layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Entries ``n0 .. n0 + BLOCK_N`` of a top-k row in ``layout`` (1-D):
    ``(int64 slot, valid)``; entries past ``end``, negative or out of range are invalid (slot 0)."""
    offs = n0 + gl.arange(0, BLOCK_N, layout)
    slot = gl.load(idx_row + offs, mask=offs < end, other=-1)
    valid = (slot >= 0) & (slot < num_slots)
    return gl.where(valid, slot, 0).to(gl.int64), valid


@gluon.jit
def _issue_rope(rope_ptr, idx_row, n0, end, num_slots, stride_rope, kr_stage, BLOCK_N: gl.constexpr):
    """``cp.async`` the rope ``[BLOCK_N, 64]`` of tile ``n0``'s rows into ``kr_stage`` (16-byte copies,
    one thread a copy)."""
    nw: gl.constexpr = gl.num_warps()
    rope_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])
    slot, valid = _tile_slots(idx_row, n0, end, num_slots, gl.SliceLayout(1, rope_l), BLOCK_N)
    rope_rows = rope_ptr + (slot * (stride_rope // 8)) * 8  # 16-byte aligned rows: 16-byte copies
    rope_ptrs = rope_rows[:, None] + gl.arange(0, 64, gl.SliceLayout(0, rope_l))[None, :]
    _async_load(kr_stage, rope_ptrs, mask=gl.broadcast(valid[:, None], rope_ptrs)[0])


@gluon.jit
def _issue_fp8_codes(kv_ptr, idx_row, n0, end, num_slots, stride_kv, words_stage, scale_stage, BLOCK_N: gl.constexpr):
    """``cp.async`` tile ``n0``'s FP8 rows: the 128 code words ``[BLOCK_N, 4, 32]`` into ``words_stage``
    and the 4 scale words of each row into ``scale_stage``."""
    nw: gl.constexpr = gl.num_warps()
    words_l: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [nw, 1, 1], [2, 1, 0])
    rows_l: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, words_l))
    slot, valid = _tile_slots(idx_row, n0, end, num_slots, rows_l, BLOCK_N)
    group = gl.arange(0, 4, gl.SliceLayout(0, gl.SliceLayout(2, words_l)))
    word = gl.arange(0, 32, gl.SliceLayout(0, gl.SliceLayout(1, words_l)))
    row_ptrs = kv_ptr + (slot * (stride_kv // 4)) * 4  # rows are 16-byte aligned: 16-byte copies
    word_ptrs = row_ptrs[:, None, None] + (group * 32)[None, :, None] + word[None, None, :]
    _async_load(words_stage, word_ptrs, mask=gl.broadcast(valid[:, None, None], word_ptrs)[0])
    scale_l: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [nw, 1], [1, 0])
    slot, valid = _tile_slots(idx_row, n0, end, num_slots, gl.SliceLayout(1, scale_l), BLOCK_N)
    scale_ptrs = (kv_ptr + (slot * (stride_kv // 4)) * 4 + _SCALE_COL)[:, None] + gl.arange(0, 4, gl.SliceLayout(0, scale_l))[None, :]
    _async_load(scale_stage, scale_ptrs, mask=gl.broadcast(valid[:, None], scale_ptrs)[0])


@gluon.jit
def _issue_tile(kv_ptr, rope_ptr, idx_row, n0, end, num_slots, stride_kv, stride_rope, stage,
                kv_ring, scale_ring, kr_ring, KV_FP8: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """``cp.async`` the rows of tile ``n0`` into ring stage ``stage`` (16-byte copies, one
    thread a copy: no replicated issue). FP8: the 128 code words ``[BLOCK_N, 4, 32]`` and the
    4 scale words of each row; BF16: the latent ``[4, BLOCK_N, 128]``; both: the rope."""
    _issue_rope(rope_ptr, idx_row, n0, end, num_slots, stride_rope, kr_ring.index(stage), BLOCK_N)
    if KV_FP8:
        _issue_fp8_codes(kv_ptr, idx_row, n0, end, num_slots, stride_kv, kv_ring.index(stage), scale_ring.index(stage),
                         BLOCK_N)  # fmt: skip
    else:
        nw: gl.constexpr = gl.num_warps()
        latent_l: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [nw, 1], [1, 0])
        slot, valid = _tile_slots(idx_row, n0, end, num_slots, gl.SliceLayout(1, latent_l), BLOCK_N)
        row_ptrs = kv_ptr + slot * stride_kv
        cols = gl.arange(0, 128, gl.SliceLayout(0, latent_l))
        for b in gl.static_range(4):
            ptrs = row_ptrs[:, None] + (b * 128 + cols)[None, :]
            _async_load(kv_ring.index(stage * 4 + b), ptrs, mask=gl.broadcast(valid[:, None], ptrs)[0])


# The bits of two e4m3 codes, bytes 0 and 2 (or 1 and 3) of a word, placed as two fp16 values
# ``s 0eeee mmm0000000`` (see :mod:`.fp8_convert`): the sign bits and the exponent-mantissa bits.
_F16_SIGNS = gl.constexpr(-0x7FFF8000)  # 0x80008000 as int32
_F16_MAGNITUDES = gl.constexpr(0x3F803F80)


@gluon.jit
def _f16_pair_to_f32(pairs):
    """int32 words holding two fp16 values -> ``(low half, high half)`` as float32."""
    low = pairs.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    high = (pairs >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    return low, high


@gluon.jit
def _dequantize_tile_bytes(words_smem, scale_smem, planes, FP8_NATIVE: gl.constexpr, FP8_FACTOR: gl.constexpr,
                           BLOCK_N: gl.constexpr):  # fmt: skip
    """As :func:`_dequantize_tile` into ``planes[0:4]``, one code at a time (the dispatched path until
    the word-at-a-time rebuild has run on a GPU)."""
    words, scale = _load_codes(words_smem, scale_smem, FP8_FACTOR)
    for b in gl.static_range(4):
        values = fp8_e4m3_to_f32((words >> (8 * b)) & 0xFF, FP8_NATIVE) * scale
        planes.index(b).store(gl.reshape(values.to(gl.bfloat16), [BLOCK_N, 128]))


@gluon.jit
def _load_codes(words_smem, scale_smem, FACTOR: gl.constexpr):
    """One ring stage's code words ``[BLOCK_N, 4, 32]`` (word ``32 g + w`` in scale group ``g``) and
    their groups' scales times ``FACTOR``, ``[BLOCK_N, 4, 1]``."""
    nw: gl.constexpr = gl.num_warps()
    words_l: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [nw, 1, 1], [2, 1, 0])
    scale = scale_smem.load(gl.SliceLayout(2, words_l)).to(gl.float32, bitcast=True) * FACTOR
    return words_smem.load(words_l), scale[:, :, None]


@gluon.jit
def _rebuild_pair(words, scale, HALF: gl.constexpr):
    """Bytes 0 and 2 (``HALF`` 0) or 1 and 3 (``HALF`` 1) of every code word as bf16 ``code * scale``,
    each rounded once: ``(low byte's, high byte's)``.

    ``scale``: :func:`_load_codes`'s with ``FACTOR`` 256. Masks and shifts turn the two bytes into an
    fp16 pair holding ``value / 256`` exactly, on every arch (no FP8 conversion instruction), which
    the scale times 256 takes back in fp32: the same bits as converting each code on its own
    (:func:`_dequantize_tile_bytes`), in about 4.4 instructions a value instead of 7.2 (sm80 SASS of
    the 16-head tile). The two codes that are NaN in e4m3fn (0x7F,
    0xFF; quantization with ``amax / 448`` never writes them) give +-480 here."""
    if HALF == 0:
        pairs = ((words << 8) & _F16_SIGNS) | ((words << 7) & _F16_MAGNITUDES)
    else:
        pairs = (words & _F16_SIGNS) | ((words >> 1) & _F16_MAGNITUDES)
    low, high = _f16_pair_to_f32(pairs)
    return (low * scale).to(gl.bfloat16), (high * scale).to(gl.bfloat16)


@gluon.jit
def _dequantize_tile(words_smem, scale_smem, planes, p0, BLOCK_N: gl.constexpr):
    """One ring stage's code words and scales (:func:`_load_codes`) -> four bf16 planes
    ``[BLOCK_N, 128]``, ``planes[p0 + b]`` (plane ``b``: byte ``b`` of every word, i.e. latent
    column ``4 j + b``), two codes of a word at a time (:func:`_rebuild_pair`)."""
    words, scale = _load_codes(words_smem, scale_smem, 256.0)
    for half in gl.static_range(2):  # bytes 0 and 2 of every word, then bytes 1 and 3
        low, high = _rebuild_pair(words, scale, half)
        planes.index(p0 + half).store(gl.reshape(low, [BLOCK_N, 128]))
        planes.index(p0 + half + 2).store(gl.reshape(high, [BLOCK_N, 128]))


@gluon.jit
def _qk_block(q_block, k_block, dot_a: gl.constexpr, dot_b: gl.constexpr, acc):
    """``acc + Q K^T`` over one 128-column block of the query (``[BLOCK_H, 128]``) and of the
    key tile (``[BLOCK_N, 128]``), both in shared memory, in chunks of ``_QK_CHUNK`` columns."""
    for c in gl.static_range(0, 128, _QK_CHUNK):  # fewer operand registers live at a time
        acc = mma_v2(q_block.slice(c, _QK_CHUNK, dim=1).load(dot_a),
                     k_block.slice(c, _QK_CHUNK, dim=1).permute((1, 0)).load(dot_b), acc)  # fmt: skip
    return acc


@gluon.jit
def _pv(p, v_smem, acc, alpha, dot_b: gl.constexpr):
    """``acc * alpha + P V`` for one 128-column block of V (``[BLOCK_N, 128]`` in shared memory)."""
    return mma_v2(p, v_smem.load(dot_b), acc * alpha[:, None])


@gluon.jit
def _store_block(out_rows, acc, inv_l, cols, head_ok):
    ptrs = out_rows + cols[None, :]
    gl.store(ptrs, (acc * inv_l[:, None]).to(out_rows.dtype.element_ty), mask=gl.broadcast(head_ok, ptrs)[0])


@gluon.jit
def sparse_mla_sm80_kernel(
    q_ptr, qr_ptr, kv_ptr, rope_ptr, idx_ptr, ends_ptr, out_ptr, lse_ptr,
    num_heads, num_slots, topk, keys_per_split, qk_scale_log2,
    stride_qt, stride_qh, stride_qrt, stride_qrh, stride_kv, stride_rope, stride_it,
    stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_ls,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WARPS_M: gl.constexpr,
    KV_FP8: gl.constexpr, FP8_NATIVE: gl.constexpr, FP8_FACTOR: gl.constexpr, WORD_DEQUANT: gl.constexpr,
    DEQUANT_AHEAD: gl.constexpr,
    SPLIT_OUTPUT: gl.constexpr, SKIP_INVALID_TAIL: gl.constexpr,
):  # fmt: skip
    """Grid ``(tokens, head blocks, splits)``. ``kv_ptr``: FP8, the rows as int32 words
    (``stride_kv`` in words, a multiple of 4: 16-byte aligned rows); BF16, the latent rows
    (bf16). ``rope_ptr``: the rows as bf16 (FP8: the rope starts at column 264; BF16: 512),
    ``stride_rope`` in bf16 values. ``WARPS_M`` of the warps split the ``BLOCK_H`` heads
    (16 each), the others the keys of ``QK^T`` and the columns of ``PV``. Other arguments
    as :func:`.sparse_mla._sparse_mla_bf16_kernel`."""
    gl.static_assert(not DEQUANT_AHEAD or (KV_FP8 and WORD_DEQUANT and STAGES >= 3),
                     "DEQUANT_AHEAD: FP8, WORD_DEQUANT and a ring of 3+")  # fmt: skip
    nw: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_M, nw // WARPS_M],
                                                  instr_shape=[16, 8])  # fmt: skip
    dot_a: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    dot_b: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    keys_l: gl.constexpr = gl.SliceLayout(0, mma)

    t, split, head0, start, end, idx_row = program_keys(idx_ptr, ends_ptr, topk, keys_per_split, stride_it, BLOCK_H,
                                                        SKIP_INVALID_TAIL)  # fmt: skip
    num_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)
    rope_ptr += _ROPE_COL if KV_FP8 else 512

    block_128: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 128], gl.bfloat16)
    block_64: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 64], gl.bfloat16)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [4, BLOCK_H, 128],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_H, 128], gl.bfloat16))  # fmt: skip
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, 64],
                                        gl.NVMMASharedLayout.get_default_for([BLOCK_H, 64], gl.bfloat16))  # fmt: skip
    kr_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, 64], block_64)
    if KV_FP8:
        kv_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4, 32],
                                            gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))  # fmt: skip
        scale_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, 4], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        planes = gl.allocate_shared_memory(gl.bfloat16, [8 if DEQUANT_AHEAD else 4, BLOCK_N, 128], block_128)
    else:
        kv_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES * 4, BLOCK_N, 128], block_128)
        scale_ring = kv_ring
        planes = kv_ring

    # The query, in the tile's column order (FP8 plane b: columns 4j + b; BF16 block b: 128b + j).
    q_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])
    heads = head0 + gl.arange(0, BLOCK_H, gl.SliceLayout(1, q_l))
    head_ok = (heads < num_heads)[:, None]
    j = gl.arange(0, 128, gl.SliceLayout(0, q_l))
    q_rows = q_ptr + t * stride_qt + heads.to(gl.int64)[:, None] * stride_qh
    for b in gl.static_range(4):
        ptrs = q_rows + (4 * j + b if KV_FP8 else 128 * b + j)[None, :]
        q_smem.index(b).store(gl.load(ptrs, mask=gl.broadcast(head_ok, ptrs)[0], other=0.0))
    qr_ptrs = (qr_ptr + t * stride_qrt + heads.to(gl.int64)[:, None] * stride_qrh) + gl.arange(0, 64, gl.SliceLayout(0, q_l))[None, :]
    qr_smem.store(gl.load(qr_ptrs, mask=gl.broadcast(head_ok, qr_ptrs)[0], other=0.0))

    for first in gl.static_range(STAGES - 1):
        if first < num_tiles:
            _issue_tile(kv_ptr, rope_ptr, idx_row, start + first * BLOCK_N, end, num_slots, stride_kv, stride_rope, first,
                        kv_ring, scale_ring, kr_ring, KV_FP8, BLOCK_N)  # fmt: skip
        async_copy.commit_group()
    if DEQUANT_AHEAD:  # tile 0 now; each iteration dequantizes the next tile while computing its own
        async_copy.wait_group(STAGES - 2)
        cta_barrier()
        _dequantize_tile(kv_ring.index(0), scale_ring.index(0), planes, 0, BLOCK_N)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, rows_l)
    l_i = gl.zeros([BLOCK_H], gl.float32, rows_l)
    acc0 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
    acc1 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
    acc2 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
    acc3 = gl.zeros([BLOCK_H, 128], gl.float32, mma)
    for i in range(num_tiles):
        stage = i % STAGES
        n0 = start + i * BLOCK_N
        # This thread's copies of tile i (ahead: i + 1) have landed.
        async_copy.wait_group(STAGES - 3 if DEQUANT_AHEAD else STAGES - 2)
        cta_barrier()  # everyone's, and every warp is done with tile i - 1 (its stage is refilled next)
        ahead = i + STAGES - 1
        if ahead < num_tiles:
            _issue_tile(kv_ptr, rope_ptr, idx_row, start + ahead * BLOCK_N, end, num_slots, stride_kv, stride_rope,
                        ahead % STAGES, kv_ring, scale_ring, kr_ring, KV_FP8, BLOCK_N)  # fmt: skip
        async_copy.commit_group()
        if KV_FP8 and DEQUANT_AHEAD:  # dequantized by the previous iteration (or before the loop)
            tile = planes
            t0 = (i % 2) * 4
        elif KV_FP8:
            if WORD_DEQUANT:
                _dequantize_tile(kv_ring.index(stage), scale_ring.index(stage), planes, 0, BLOCK_N)
            else:
                _dequantize_tile_bytes(kv_ring.index(stage), scale_ring.index(stage), planes, FP8_NATIVE, FP8_FACTOR,
                                       BLOCK_N)  # fmt: skip
            cta_barrier()  # the whole bf16 tile before any warp reads it
            tile = planes
            t0 = 0
        else:
            tile = kv_ring
            t0 = stage * 4

        s = mma_v2(qr_smem.load(dot_a), kr_ring.index(stage).permute((1, 0)).load(dot_b),
                   gl.zeros([BLOCK_H, BLOCK_N], gl.float32, mma))  # fmt: skip
        if WORD_DEQUANT:  # four independent accumulators: chains of at most 12 dependent MMAs, not 36
            zeros = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, mma)
            s0 = _qk_block(q_smem.index(0), tile.index(t0), dot_a, dot_b, s)
            s1 = _qk_block(q_smem.index(1), tile.index(t0 + 1), dot_a, dot_b, zeros)
            s2 = _qk_block(q_smem.index(2), tile.index(t0 + 2), dot_a, dot_b, zeros)
            s3 = _qk_block(q_smem.index(3), tile.index(t0 + 3), dot_a, dot_b, zeros)
            s = (s0 + s1) + (s2 + s3)
        else:
            for b in gl.static_range(4):
                s = _qk_block(q_smem.index(b), tile.index(t0 + b), dot_a, dot_b, s)
        if KV_FP8 and DEQUANT_AHEAD:
            # Tile i + 1 into the other half of the planes, between the products (no barrier in
            # between: the scheduler interleaves the two). Past the last tile it rebuilds a stale
            # stage that nothing reads, which keeps the loop body one block.
            _dequantize_tile(kv_ring.index((i + 1) % STAGES), scale_ring.index((i + 1) % STAGES), planes,
                             ((i + 1) % 2) * 4, BLOCK_N)  # fmt: skip
        _, valid = _tile_slots(idx_row, n0, end, num_slots, keys_l, BLOCK_N)
        p, alpha, m_i, l_i = online_softmax_step(s, valid, m_i, l_i, qk_scale_log2)
        p = gl.convert_layout(p.to(gl.bfloat16), dot_a)
        acc0 = _pv(p, tile.index(t0 + 0), acc0, alpha, dot_b)
        acc1 = _pv(p, tile.index(t0 + 1), acc1, alpha, dot_b)
        acc2 = _pv(p, tile.index(t0 + 2), acc2, alpha, dot_b)
        acc3 = _pv(p, tile.index(t0 + 3), acc3, alpha, dot_b)
    async_copy.wait_group(0)

    out_heads = head0 + gl.arange(0, BLOCK_H, rows_l)
    store_lse(lse_ptr, t, split, out_heads, num_heads, m_i, l_i, stride_lt, stride_lh, stride_ls, SPLIT_OUTPUT)
    has_keys = l_i > 0.0
    inv_l = gl.where(has_keys, 1.0 / gl.where(has_keys, l_i, 1.0), 0.0)
    out_rows = out_ptr + t * stride_ot + split * stride_os + out_heads.to(gl.int64)[:, None] * stride_oh
    out_ok = (out_heads < num_heads)[:, None]
    jo = gl.arange(0, 128, keys_l)
    _store_block(out_rows, acc0, inv_l, 4 * jo + 0 if KV_FP8 else jo, out_ok)
    _store_block(out_rows, acc1, inv_l, 4 * jo + 1 if KV_FP8 else 128 + jo, out_ok)
    _store_block(out_rows, acc2, inv_l, 4 * jo + 2 if KV_FP8 else 256 + jo, out_ok)
    _store_block(out_rows, acc3, inv_l, 4 * jo + 3 if KV_FP8 else 384 + jo, out_ok)
