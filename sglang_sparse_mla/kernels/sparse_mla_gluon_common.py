"""What the Gluon sparse MLA kernels (:mod:`.sparse_mla_sm80`, :mod:`.sparse_mla_sm90_ws`) share:
a program's token and range of top-k entries, the online-softmax step of a key tile, the
log-sum-exp store in the format :func:`.sparse_mla._merge_splits_kernel` reads, and the CTA-wide
barrier under the name of the running Triton."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_LN2 = gl.constexpr(0.6931471805599453)
# A CTA-wide barrier: ``gl.barrier`` in Triton 3.8, ``gl.thread_barrier`` in 3.6.
cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def program_keys(idx_ptr, ends_ptr, topk, keys_per_split, stride_it, BLOCK_H: gl.constexpr,
                 SKIP_INVALID_TAIL: gl.constexpr):  # fmt: skip
    """Grid ``(tokens, head blocks, splits)``: this program's token ``t`` (int64), split, first
    head, entries ``[start, end)`` of the token's top-k row (its split, cut at the row's valid
    end with ``SKIP_INVALID_TAIL``) and that row's pointer."""
    t = gl.program_id(0).to(gl.int64)
    split = gl.program_id(2)
    head0 = gl.program_id(1) * BLOCK_H
    start = split * keys_per_split
    end = gl.minimum(start + keys_per_split, topk)
    if SKIP_INVALID_TAIL:
        end = gl.minimum(end, gl.load(ends_ptr + t))
    return t, split, head0, start, end, idx_ptr + t * stride_it


@gluon.jit
def online_softmax_step(s, valid, m_i, l_i, qk_scale_log2):
    """One key tile's scores ``s`` ``[BLOCK_H, BLOCK_N]`` (keys where ``valid`` is false are
    masked to ``-inf``) into the running max ``m_i`` and sum ``l_i`` (log2 domain). Returns
    ``(p, alpha, m_i, l_i)``: the tile's unnormalized probabilities and the factor that rescales
    what was accumulated before it; a head with no valid key so far keeps ``p = 0``, ``alpha = 1``."""
    s = gl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    m_base = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_base)
    p = gl.exp2(s - m_base[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def store_lse(lse_ptr, t, split, heads, num_heads, m_i, l_i, stride_lt, stride_lh, stride_ls,
              SPLIT_OUTPUT: gl.constexpr):  # fmt: skip
    """Log-sum-exp of heads ``heads`` (running max ``m_i`` and sum ``l_i``, log2 domain):
    a split's partial keeps log2 for the merge, the final one is the natural log; a head
    without keys gets ``-inf``."""
    has_keys = l_i > 0.0
    lse_log2 = gl.where(has_keys, m_i + gl.log2(gl.where(has_keys, l_i, 1.0)), float("-inf"))
    if SPLIT_OUTPUT:
        gl.store(lse_ptr + t * stride_lt + split * stride_ls + heads * stride_lh, lse_log2, mask=heads < num_heads)
    else:
        gl.store(lse_ptr + t * stride_lt + heads * stride_lh, lse_log2 * _LN2, mask=heads < num_heads)
