"""Logical top-k positions -> physical KV-cache slots through SGLang's
``req_to_token`` table.

SGLang keeps one row of ``req_to_token`` (``[max_reqs, max_context]`` int32)
per request; entry ``p`` of a request's row is the KV slot of its logical
position ``p``, and ``req_pool_indices[r]`` names the row of batch request
``r``. Query row ``t`` belongs to request ``r(t)``:

* ``token_to_req[t]`` when given: extend / prefill, where requests have
  different numbers of tokens (SGLang's ``token_to_batch_idx``);
* otherwise ``t // tokens_per_req``: decode (1) and MTP verification
  (``next_n`` rows per request, request-major).

The jitted helpers here are also what :func:`.topk.topk_indices` uses when it
fuses the mapping into the selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_dtype, check_last_dim_contiguous, check_ndim, check_same_device

_BLOCK = 1024


@triton.jit
def request_slot_row(
    req_to_token_ptr,
    req_pool_indices_ptr,
    token_to_req_ptr,
    row,
    tokens_per_req,
    stride_r2t,
    HAS_TOKEN_TO_REQ: tl.constexpr,
):
    """Pointer to the ``req_to_token`` row of query row ``row``."""
    if HAS_TOKEN_TO_REQ:
        req = tl.load(token_to_req_ptr + row)
    else:
        req = row // tokens_per_req
    return req_to_token_ptr + tl.load(req_pool_indices_ptr + req).to(tl.int64) * stride_r2t


@triton.jit
def positions_to_slots(slot_row_ptr, positions, mask, num_positions):
    """KV slots of ``positions`` (``-1`` where masked off or outside
    ``[0, num_positions)``)."""
    ok = mask & (positions >= 0) & (positions < num_positions)
    return tl.load(slot_row_ptr + positions, mask=ok, other=-1)


@triton.jit
def _topk_to_kv_slots_kernel(
    topk_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    token_to_req_ptr,
    out_ptr,
    k,
    tokens_per_req,
    max_context,
    stride_topk,
    stride_r2t,
    stride_out,
    HAS_TOKEN_TO_REQ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < k
    slot_row = request_slot_row(
        req_to_token_ptr, req_pool_indices_ptr, token_to_req_ptr, row, tokens_per_req, stride_r2t, HAS_TOKEN_TO_REQ
    )
    positions = tl.load(topk_ptr + row.to(tl.int64) * stride_topk + cols, mask=in_row, other=-1)
    slots = positions_to_slots(slot_row, positions, in_row, max_context)
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, slots, mask=in_row)


def validate_slot_mapping(
    num_rows: int,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    token_to_req: torch.Tensor | None,
    tokens_per_req: int,
) -> list[tuple[str, torch.Tensor]]:
    """Check the mapping arguments; returns the tensors for the device check."""
    check_dtype("req_to_token", req_to_token, torch.int32)
    check_ndim("req_to_token", req_to_token, 2, "[max_reqs, max_context]")
    check_last_dim_contiguous("req_to_token", req_to_token)
    check_dtype("req_pool_indices", req_pool_indices, torch.int32, torch.int64)
    check_ndim("req_pool_indices", req_pool_indices, 1, "[num_reqs]")
    tensors = [("req_to_token", req_to_token), ("req_pool_indices", req_pool_indices)]
    if token_to_req is not None:
        check_dtype("token_to_req", token_to_req, torch.int32, torch.int64)
        check_ndim("token_to_req", token_to_req, 1, "[rows]")
        if token_to_req.shape[0] != num_rows:
            raise ValueError(f"token_to_req has {token_to_req.shape[0]} entries but there are {num_rows} rows")
        tensors.append(("token_to_req", token_to_req))
    elif tokens_per_req < 1:
        raise ValueError(f"tokens_per_req must be >= 1, got {tokens_per_req}")
    elif num_rows > req_pool_indices.shape[0] * tokens_per_req:
        raise ValueError(
            f"{num_rows} rows need {triton.cdiv(num_rows, tokens_per_req)} requests at "
            f"{tokens_per_req} per request, but req_pool_indices has {req_pool_indices.shape[0]}"
        )
    return tensors


def topk_to_kv_slots(
    topk: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    *,
    token_to_req: torch.Tensor | None = None,
    tokens_per_req: int = 1,
) -> torch.Tensor:
    """Map logical top-k positions to physical KV slots.

    Args:
        topk: ``[T, k]`` int32 logical positions (``-1`` = none), e.g. from
            :func:`.topk.topk_indices`.
        req_to_token: ``[max_reqs, max_context]`` int32 SGLang table.
        req_pool_indices: ``[num_reqs]`` int32/int64 table row of each request.
        token_to_req: optional ``[T]`` int32/int64 request (index into
            ``req_pool_indices``) of each row; for extend batches.
        tokens_per_req: without ``token_to_req``, row ``t`` belongs to request
            ``t // tokens_per_req`` (1 for decode, ``next_n`` for MTP).

    Returns:
        ``[T, k]`` int32: ``req_to_token[req_pool_indices[r(t)], topk[t, j]]``;
        ``-1`` stays ``-1`` (as does a position ``>= max_context``).
    """
    check_dtype("topk", topk, torch.int32)
    check_ndim("topk", topk, 2, "[rows, k]")
    check_last_dim_contiguous("topk", topk)
    num_rows, k = topk.shape
    tensors = validate_slot_mapping(num_rows, req_to_token, req_pool_indices, token_to_req, tokens_per_req)
    device = check_same_device([("topk", topk), *tensors])
    out = torch.empty(num_rows, k, dtype=torch.int32, device=device)
    if out.numel() == 0:
        return out
    _topk_to_kv_slots_kernel[(num_rows, triton.cdiv(k, _BLOCK))](
        topk,
        req_to_token,
        req_pool_indices,
        token_to_req if token_to_req is not None else req_pool_indices,
        out,
        k,
        tokens_per_req,
        req_to_token.shape[1],
        topk.stride(0),
        req_to_token.stride(0),
        out.stride(0),
        HAS_TOKEN_TO_REQ=token_to_req is not None,
        BLOCK=_BLOCK,
        num_warps=4,
    )
    return out
