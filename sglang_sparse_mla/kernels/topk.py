"""Top-k selection over indexer logits, without sorting.

``topk_indices(logits, lengths, k)`` returns, per row, the positions of the
``k`` largest of the row's first ``lengths[t]`` logits (or of the window
starting at ``row_starts[t]``), optionally mapped straight to KV slots.

Algorithm (one program per row, a persistent grid over rows). Floats are
compared as order-preserving uint32 keys. The result is fixed by the
threshold key ``tau`` (the k-th largest): every key above it is selected,
plus the lowest-position keys equal to it until there are ``k``. ``tau`` is
found by a radix select over a candidate set held in registers: 8 rounds,
each a 16-bin histogram of the next 4 key bits of the keys that share the
prefix found so far (the count of keys above that prefix carried along):

* Rows of at most ``CAP`` entries are the candidate set themselves.
* Longer rows are first cut down by two streaming passes. Pass 1 takes the
  maxima of ``CHUNKS >= k`` strided chunks (element ``i`` in chunk
  ``i % CHUNKS``); the k-th largest chunk maximum is a lower bound of ``tau``
  (those ``k`` maxima are ``k`` distinct elements); it is searched to its
  leading 20 bits only, still a lower bound. Pass 2 writes, in
  position order, the positions of the elements at or above that bound to a
  per-program scratch row. For i.i.d. continuous data about
  ``-CHUNKS * ln(1 - k / CHUNKS)`` elements survive (``1.39 k`` with the
  default ``CHUNKS = 2k``), whatever the row length and distribution;
  ``CAP = 2k`` holds them.
* If ties or a pathological distribution leave more than ``CAP``
  candidates, a bitwise search (32 halvings, "is #(keys >= candidate) >=
  k?") counts over the whole row in memory instead (slower, same result).

A last pass over the candidates writes the selected positions in increasing
position order; the row is padded with ``-1`` up to ``k``. The result is
deterministic (no atomics).

Split rows (few long rows, e.g. decode batches of 1-64 requests): one
program per row would leave most SMs idle, so each row's length (not the
logits' width, which in a CUDA-graph batch spans the longest context the
server allows) is cut into ``segments`` equal runs of consecutive positions,
one program each, and the same
``tau`` is found by a radix select whose histograms are built by all of a
row's programs together: four rounds, one per byte of the key (most
significant first), each program adding the 256-bin histogram of the next
byte of its keys that share the bytes found so far to the row's histogram in
global memory (integer atomics: the sums, hence the result, do not depend on
their order); every program finds the bytes so far from the row's
histograms itself. The last round also stores, per segment, the count of
its keys above ``tau``'s leading 24 bits and the suffix sums of its last-byte
histogram, from which a last phase gets, for each segment, how many keys
above ``tau`` and ties precede it: every program then writes its selected
positions at their final place, in the same order and with the same tie rule
as above. On a GPU the five phases are one cooperative launch, the programs
of a row meeting at a grid barrier (an atomic counter) between phases, so
every program of the launch is resident at once (:func:`split_grid` sizes
it); the interpreter, which runs programs one after another, launches each
phase separately. No candidate buffer (nothing to overflow at any row
length), no host synchronization, scratch sized from the shapes (CUDA-graph
capturable). The dispatch rule is :func:`use_split_rows`.

Inputs must be NaN-free. ``+inf`` and ``-inf`` are ordinary values (+inf
largest, -inf smallest): a ``-inf`` inside a row's window is selected when
the row has fewer than ``k`` larger entries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .checks import check_dim, check_dtype, check_last_dim_contiguous, check_ndim, check_same_device
from .device_info import device_info, is_interpreter
from .topk_to_kv_slots import positions_to_slots, request_slot_row, validate_slot_mapping

MAX_K = 2048  # the DSA models' index_topk; larger k needs configs that spill


@dataclass(frozen=True)
class TopKConfig:
    """``chunks`` strided chunks of the bounding pass (also its streaming
    block) and ``cap`` candidates held in registers, both powers of two in
    ``[k, 16384]``; ``num_warps`` / ``num_stages`` of the launch.

    Split rows: ``split_rows`` forces the split-row path on (``True``) or off
    (``False``), ``None`` leaves it to :func:`use_split_rows`;
    ``split_block`` positions a split-row program streams at a time (a power
    of two in ``[32, 8192]``; a row gets at most one program per ``split_block``
    columns of the logits); ``split_programs_per_sm`` the programs per SM the
    grid aims at (:func:`split_grid`), at most :data:`MAX_SPLIT_PROGRAMS_PER_SM`.
    """

    chunks: int
    cap: int
    num_warps: int
    num_stages: int
    split_rows: bool | None = None
    split_block: int = 1024
    split_programs_per_sm: int = 4


def default_config(k: int) -> TopKConfig:
    """The configuration :func:`topk_indices` uses for ``k``."""
    size = max(1024, 2 * triton.next_power_of_2(k))
    return TopKConfig(chunks=size, cap=size, num_warps=8, num_stages=1)


def sweep_configs(k: int) -> list[TopKConfig]:
    """The default configuration followed by the candidates a sweep may time.

    At 16 warps a row of up to 8192 positions fits in registers without
    spills on every target (no bounding passes for decode rows up to 8k);
    16384 spills at 16 warps, and at 32 warps (64 registers a thread) on
    sm86/89 or sm120. The split-row candidates vary the streaming block and
    the programs per SM.
    """
    d = default_config(k)
    split = [
        replace(d, split_rows=True, split_block=block, split_programs_per_sm=per_sm)
        for block, per_sm in ((1024, 4), (2048, 4), (1024, 2))
    ]
    return [d, TopKConfig(d.chunks, d.cap, 16, d.num_stages), TopKConfig(d.chunks, max(d.cap, 8192), 16, d.num_stages)] + split


# Persistent grid: programs per SM (each owns one scratch row when rows are long).
_PROGRAMS_PER_SM = 4
_SPLIT_NUM_WARPS = 4
_RADIX_BINS = 256  # split rows: one key byte per histogram round
_SEGMENT_BLOCK = 256  # split rows: earlier segments' counts summed this many at a time
# Split rows: segments start at multiples of this many positions (aligned vector loads).
_SEGMENT_ALIGN = 16
# Split rows, per row: the four key-byte histograms and the grid-barrier counter (padded to 8).
_SYNC_COLS = tl.constexpr(4 * _RADIX_BINS + 8)
# Split-row programs an SM must hold at once: the launch caps each thread's registers so that
# this many fit the 64K registers of an SM on every arch (the compile tests check that they then
# fit without spills, and in shared memory): otherwise a cooperative launch of them fails.
MAX_SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MAX_REGISTERS = 65536 // (32 * _SPLIT_NUM_WARPS * MAX_SPLIT_PROGRAMS_PER_SM)


def use_split_rows(num_rows: int, num_cols: int, num_sms: int, cfg: TopKConfig) -> bool:
    """Whether :func:`topk_indices` splits rows across programs.

    One program per row keeps at most ``num_rows`` SMs busy, each running the
    row's bounding passes and radix rounds in sequence, so few rows leave most
    of the GPU idle however long they are. Split rows spread each row over
    several programs of one cooperative launch (plus a memset), which pays
    while the rows fit one launch (``num_rows <= split_programs_per_sm *
    num_sms``) and are longer than the candidate capacity (shorter rows are
    selected in registers in one pass). Measured in
    ``benchmarks/results/`` (``bench_indexer.py --sections topk``).
    ``cfg.split_rows`` overrides it.
    """
    if cfg.split_rows is not None:
        return cfg.split_rows
    return num_rows <= cfg.split_programs_per_sm * num_sms and num_cols > cfg.cap


def split_grid(num_rows: int, num_cols: int, num_sms: int, cfg: TopKConfig) -> tuple[int, int]:
    """``(segments, rows_per_launch)`` of the split-row path: programs per row
    (at most one per ``split_block`` columns of the logits) and the rows one
    launch takes (more rows take several launches). A launch is
    ``segments * rows_per_launch <= split_programs_per_sm * num_sms``
    programs, all resident at once, as its grid barriers require.

    Each program takes an equal share of its *row's length* (see
    :func:`_split_rows_kernel`), not of ``num_cols``: a CUDA-graph batch's
    logits are as wide as the longest context the server allows, while the
    rows are usually far shorter."""
    programs = cfg.split_programs_per_sm * num_sms
    rows_per_launch = max(1, min(num_rows, programs))
    per_row = max(1, programs // rows_per_launch)
    return max(1, min(per_row, triton.cdiv(num_cols, cfg.split_block))), rows_per_launch


_EMIT_BLOCK = 1024
# Leading key bits the lower-bound search resolves (sign, exponent, 11 mantissa
# bits; a multiple of the radix select's 4): the last 12 bits would only
# tighten the bound by < 2**-11 of the value, letting through about that
# fraction more candidates.
_BOUND_BITS = tl.constexpr(20)


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 whose unsigned order is the float order.

    Negative floats have all bits flipped, others only the sign bit; no
    non-NaN float maps to 0, which therefore marks "no element".
    """
    bits = x.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) | -2147483648)).to(tl.uint32, bitcast=True)


@triton.jit
def _search_step(ans, step, lo, hi):
    """Next candidate of the in-memory bitwise search and whether it still needs counting.

    The answer lies in ``[lo, hi]``: a candidate ``<= lo`` is known to pass,
    one ``> hi`` to fail.
    """
    cand = ans | step
    return cand, cand <= lo, (cand > lo) & (cand <= hi)


@triton.jit
def _kth_largest_key(keys, valid, k, BITS: tl.constexpr):
    """The k-th largest of the ``valid`` keys of a register tensor, given at
    least ``k`` of them: a most-significant-digit radix select, 4 bits a round.

    Each round bins the keys that share the prefix found so far by their next
    digit (``tl.histogram``; the others go to bin 16) and keeps the largest
    digit with at least ``k`` keys at or above it. With ``BITS < 32`` only the
    leading ``BITS`` bits are found: the result, the k-th largest key with its
    low bits cleared, is a lower bound of it (at least ``k`` keys reach it).
    """
    bins = tl.arange(0, 32)
    is_digit = bins < 16
    ans = tl.zeros([], tl.uint32)
    above = tl.zeros([], tl.int32)  # keys whose resolved prefix is above ans's
    for r in tl.static_range(BITS // 4):
        shift = 28 - 4 * r
        in_window = valid
        if r > 0:
            in_window = valid & ((keys >> (shift + 4)) == (ans >> (shift + 4)))
        digit = tl.where(in_window, ((keys >> shift) & 15).to(tl.int32), 16)
        counts = tl.where(is_digit, tl.histogram(digit, 32), 0)
        at_least = above + tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # keys with digit >= bin
        d = tl.max(tl.where(is_digit & (at_least >= k), bins, 0), 0)
        above += tl.sum(tl.where(bins > d, counts, 0), 0)
        ans = ans | (d.to(tl.uint32) << shift)
    return ans


@triton.jit
def _count_keys_at_least(row_ptr, length, threshold, BLOCK: tl.constexpr):
    """``#(key(row[i]) >= threshold)`` for ``i < length`` (streaming)."""
    count = tl.zeros([], tl.int32)
    for c0 in range(0, length, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < length, other=0.0)
        count += tl.sum(((_ordered_key(x) >= threshold) & (cols < length)).to(tl.int32), 0)
    return count


@triton.jit
def _kth_largest_key_in_row(row_ptr, length, k, lo, hi, BLOCK: tl.constexpr):
    """:func:`_kth_largest_key` counting over the row in memory (fallback)."""
    ans = tl.zeros([], tl.uint32)
    step = tl.full([], 0x80000000, tl.uint32)
    for _ in range(32):
        cand, take, count = _search_step(ans, step, lo, hi)
        if count:
            take = _count_keys_at_least(row_ptr, length, cand, BLOCK) >= k
        ans = tl.where(take, cand, ans)
        step = step >> 1
    return ans


@triton.jit
def _emit(keys, positions, ok, tau, ties_wanted, taken, ties_seen, out_row_ptr, slot_row_ptr, slot_cols, MAP_SLOTS: tl.constexpr):
    """Append the selected entries of one block, in order; returns the updated
    ``(taken, ties_seen)`` counters.

    Selected: key ``> tau``, or ``== tau`` among the first ``ties_wanted``
    ties of the row. ``keys``/``positions``/``ok`` are ``[BLOCK]`` with
    ``BLOCK < 2**15`` (two counts share one prefix sum).
    """
    above = ok & (keys > tau)
    tie = ok & (keys == tau)
    packed = tl.cumsum(above.to(tl.int32) + (tie.to(tl.int32) << 16), 0)
    ties_through = ties_seen + (packed >> 16)
    first_ties = tl.minimum(ties_seen, ties_wanted)
    take = above | (tie & (ties_through <= ties_wanted))
    index = taken + (packed & 0xFFFF) + tl.minimum(ties_through, ties_wanted) - first_ties - 1
    if MAP_SLOTS:
        values = positions_to_slots(slot_row_ptr, positions, take, slot_cols)
    else:
        values = positions
    tl.store(out_row_ptr + index, values, mask=take)
    tie_count = tl.sum(tie.to(tl.int32), 0)
    taken += tl.sum(above.to(tl.int32), 0) + tl.minimum(ties_seen + tie_count, ties_wanted) - first_ties
    return taken, ties_seen + tie_count


@triton.jit
def _source_block(row_ptr, scratch_row, first, count, from_scratch, BLOCK: tl.constexpr):
    """Keys, row positions and validity of candidates ``first .. first + BLOCK``
    of a row's candidate list: the row itself, or the positions in scratch."""
    idx = first + tl.arange(0, BLOCK)
    ok = idx < count
    positions = idx
    if from_scratch:
        positions = tl.load(scratch_row + idx, mask=ok, other=0)
    keys = tl.where(ok, _ordered_key(tl.load(row_ptr + positions, mask=ok, other=0.0)), 0)
    return keys, positions, ok


@triton.jit
def _lower_bound_and_candidates(
    row_ptr, scratch_row, length, k, CHUNKS: tl.constexpr, CAP: tl.constexpr, BOUND_BITS: tl.constexpr
):
    """Two streaming passes over a long row: a lower bound ``lo`` of its k-th
    largest key (the k-th largest maximum of ``CHUNKS`` strided chunks), the
    maximum key ``hi``, and the number of keys ``>= lo``, whose positions (the
    first ``CAP`` of them, in order) go to ``scratch_row``."""
    cols = tl.arange(0, CHUNKS)
    chunk_max = tl.full([CHUNKS], float("-inf"), tl.float32)
    x_next = tl.load(row_ptr + cols, mask=cols < length, other=float("-inf"))
    for c0 in range(0, length, CHUNKS):
        x = x_next
        x_next = tl.load(row_ptr + c0 + CHUNKS + cols, mask=c0 + CHUNKS + cols < length, other=float("-inf"))
        chunk_max = tl.maximum(chunk_max, x)
    chunk_keys = _ordered_key(chunk_max)
    hi = tl.max(chunk_keys, 0)
    lo = _kth_largest_key(chunk_keys, chunk_keys > 0, k, BOUND_BITS)

    tl.debug_barrier()  # the previous row's readers of the scratch row are done
    count = tl.zeros([], tl.int32)
    x_next = tl.load(row_ptr + cols, mask=cols < length, other=float("-inf"))
    for c0 in range(0, length, CHUNKS):
        x = x_next
        x_next = tl.load(row_ptr + c0 + CHUNKS + cols, mask=c0 + CHUNKS + cols < length, other=float("-inf"))
        keep = (c0 + cols < length) & (_ordered_key(x) >= lo)
        slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(scratch_row + slot, c0 + cols, mask=keep & (slot < CAP))
        count += tl.sum(keep.to(tl.int32), 0)
    tl.debug_barrier()  # candidates visible to every thread
    return lo, hi, count


@triton.jit
def _row_window(lengths_ptr, row_starts_ptr, row, num_cols, HAS_ROW_STARTS: tl.constexpr):
    """``(start, length)`` of a row's window, clamped to the ``num_cols`` columns."""
    start = 0
    if HAS_ROW_STARTS:
        start = tl.minimum(tl.maximum(tl.load(row_starts_ptr + row), 0), num_cols)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + row), 0), num_cols - start)
    return start, length


@triton.jit
def _output_rows(
    out_ptr, req_to_token_ptr, req_pool_indices_ptr, token_to_req_ptr, row, tokens_per_req, stride_or, stride_r2t,
    MAP_SLOTS: tl.constexpr, HAS_TOKEN_TO_REQ: tl.constexpr,
):  # fmt: skip
    """``(out_row, slot_row)``: where row ``row``'s selection goes, and (``MAP_SLOTS``) the
    ``req_to_token`` row its positions map through (else ``out_row``, unread)."""
    out_row = out_ptr + tl.cast(row, tl.int64) * stride_or
    slot_row = out_row
    if MAP_SLOTS:
        slot_row = request_slot_row(
            req_to_token_ptr, req_pool_indices_ptr, token_to_req_ptr, row, tokens_per_req, stride_r2t,
            HAS_TOKEN_TO_REQ,
        )
    return out_row, slot_row


@triton.jit
def _topk_kernel(
    logits_ptr,
    lengths_ptr,
    row_starts_ptr,
    out_ptr,
    scratch_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    token_to_req_ptr,
    num_rows,
    num_cols,
    k,
    tokens_per_req,
    slot_cols,
    stride_lr,
    stride_or,
    stride_r2t,
    HAS_ROW_STARTS: tl.constexpr,
    MAP_SLOTS: tl.constexpr,
    HAS_TOKEN_TO_REQ: tl.constexpr,
    CHUNKS: tl.constexpr,
    CAP: tl.constexpr,
    EMIT_BLOCK: tl.constexpr,
):
    scratch_row = scratch_ptr + tl.program_id(0).to(tl.int64) * CAP
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        start, length = _row_window(lengths_ptr, row_starts_ptr, row, num_cols, HAS_ROW_STARTS)
        row_ptr = logits_ptr + row64 * stride_lr + start
        out_row, slot_row = _output_rows(
            out_ptr, req_to_token_ptr, req_pool_indices_ptr, token_to_req_ptr, row, tokens_per_req, stride_or,
            stride_r2t, MAP_SLOTS, HAS_TOKEN_TO_REQ,
        )

        # Candidates: the row itself, or (long rows) the keys >= a lower bound.
        lo = tl.zeros([], tl.uint32)
        hi = tl.zeros([], tl.uint32)
        count = length
        if length > CAP:
            lo, hi, count = _lower_bound_and_candidates(row_ptr, scratch_row, length, k, CHUNKS, CAP, _BOUND_BITS)
        in_registers = count <= CAP
        from_scratch = in_registers & (length > CAP)
        # tau: the k-th largest key (0 when the row has fewer than k entries).
        tau = tl.zeros([], tl.uint32)
        ties_wanted = k
        if in_registers:
            keys, _, ok = _source_block(row_ptr, scratch_row, 0, count, from_scratch, CAP)
            if count >= k:
                tau = _kth_largest_key(keys, ok, k, 32)
            ties_wanted = k - tl.sum((keys > tau).to(tl.int32), 0)
        else:
            # More candidates than registers (heavy ties): count over the row.
            tau = _kth_largest_key_in_row(row_ptr, length, k, lo, hi, CHUNKS)
            ties_wanted = k - _count_keys_at_least(row_ptr, length, tau + 1, CHUNKS)

        num_source = tl.where(in_registers, count, length)
        taken = tl.zeros([], tl.int32)
        ties_seen = tl.zeros([], tl.int32)
        for c0 in range(0, num_source, EMIT_BLOCK):
            keys, positions, ok = _source_block(row_ptr, scratch_row, c0, num_source, from_scratch, EMIT_BLOCK)
            taken, ties_seen = _emit(
                keys, positions, ok, tau, ties_wanted, taken, ties_seen, out_row, slot_row, slot_cols, MAP_SLOTS
            )
        for c0 in range(taken, k, EMIT_BLOCK):
            cols = c0 + tl.arange(0, EMIT_BLOCK)
            tl.store(out_row + cols, tl.full([EMIT_BLOCK], -1, tl.int32), mask=cols < k)


@triton.jit
def _radix_digit(hist_ptr, need):
    """One radix round from a row's 256-bin histogram of a key byte: the
    largest byte ``d`` with at least ``need`` keys at or above it, and the
    ``need`` left among the keys equal to ``d`` (``need`` minus those above)."""
    bins = tl.arange(0, 256)
    counts = tl.load(hist_ptr + bins, cache_modifier=".cg")  # other SMs' atomics: skip L1
    at_least = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
    d = tl.max(tl.where(at_least >= need, bins, 0), 0)
    return d, need - tl.sum(tl.where(bins > d, counts, 0), 0)


@triton.jit
def _split_threshold(hist_row, k, rounds):
    """The leading ``rounds`` bytes of ``tau`` (right-aligned) and the keys
    still wanted among those sharing them, from the row's first ``rounds``
    histograms; after 4 rounds ``tau`` itself and the ties it takes."""
    prefix = tl.zeros([], tl.uint32)
    need = k
    for r in range(rounds):
        d, need = _radix_digit(hist_row + r * 256, need)
        prefix = (prefix << 8) | d.to(tl.uint32)
    return prefix, need


@triton.jit
def _row_barrier(counter_ptr, target):
    """Grid barrier among the programs of one row: counts this program in at
    ``counter_ptr`` and waits until ``target`` have arrived. Only valid when
    they are all resident at once (a cooperative launch guarantees it)."""
    tl.debug_barrier()  # this program's histogram and count writes precede the arrival
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _split_histogram_round(row_ptr, hist_row, seg_row, first, end, prefix, rnd, BLOCK: tl.constexpr):
    """Round ``rnd`` (0-3) of the split-row radix select for one segment
    ``[first, end)``: adds the histogram of key byte ``rnd`` of its keys whose
    leading ``rnd`` bytes are ``prefix`` (``tau``'s) to the row's histogram ``rnd``. Round 3
    also stores the segment's counts at ``seg_row``:
    ``[suffix sums of that histogram (256) | keys above tau's leading 24 bits]``.

    A block with many matching keys is binned in registers (``tl.histogram``,
    whose cost grows with the block, matched or not); one with at most
    ``BLOCK // 32`` (the usual case after round 0 or 1, where only keys near
    ``tau`` match) adds its keys one by one with integer atomics (to the row's
    histogram, or in round 3 to the segment's own counts, zeroed first), so
    that no more than one key in 32 of a row ever lands on one address that way.
    """
    bins = tl.arange(0, 256)
    counts = tl.zeros([256], tl.int32)
    above = tl.zeros([BLOCK], tl.int32)
    if rnd == 3:
        scatter_row = seg_row
        tl.store(seg_row + bins, counts)
        tl.debug_barrier()  # zeroed before any thread adds to it
    else:
        scatter_row = hist_row + rnd * 256
    for c0 in range(first, end, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < end
        keys = _ordered_key(tl.load(row_ptr + cols, mask=ok, other=0.0))
        lead = (keys >> (31 - 8 * rnd)) >> 1  # the leading rnd bytes (0 in round 0)
        match = ok & (lead == prefix)
        above += (ok & (lead > prefix)).to(tl.int32)
        digit = tl.where(match, (keys >> (24 - 8 * rnd)) & 255, 0).to(tl.int32)
        matched = tl.sum(match.to(tl.int32), 0)
        if matched > BLOCK // 32:
            # Unmatched lanes counted in bin 0, then taken out again.
            counts += tl.histogram(digit, 256) - tl.where(bins == 0, BLOCK - matched, 0)
        elif matched > 0:
            tl.atomic_add(scatter_row + digit, tl.full([BLOCK], 1, tl.int32), mask=match, sem="relaxed")
    if rnd == 3:
        tl.debug_barrier()  # every thread's atomics are done
        counts += tl.load(seg_row + bins, cache_modifier=".cg")
    tl.atomic_add(hist_row + rnd * 256 + bins, counts, mask=counts > 0, sem="relaxed")
    if rnd == 3:
        tl.debug_barrier()  # read before overwritten
        tl.store(seg_row + bins, tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts)
        tl.store(seg_row + 256, tl.sum(above, 0))


@triton.jit
def _split_emit_segment(
    row_ptr, seg_rows, out_row, slot_row, seg, first, end, length, k, tau, ties_wanted, slot_cols,
    MAP_SLOTS: tl.constexpr, BLOCK: tl.constexpr, SEGMENT_BLOCK: tl.constexpr,
):  # fmt: skip
    """Last split-row phase for one segment: its selected positions at their
    place in the row's output (the keys above ``tau`` and the first
    ``ties_wanted`` keys equal to it, counting those of earlier segments from
    their stored counts at ``seg_rows``), and (segment 0) the ``-1`` padding.
    A row of at most ``k`` entries takes them all (``tau`` unused)."""
    taken = tl.minimum(first, length)
    ties_seen = tl.zeros([], tl.int32)
    if length <= k:
        tau = tl.zeros([], tl.uint32)  # every valid key is above it
        ties_wanted = k
    else:
        last = (tau & 255).to(tl.int32)
        above = tl.zeros([], tl.int32)
        for s0 in range(0, seg, SEGMENT_BLOCK):
            earlier = s0 + tl.arange(0, SEGMENT_BLOCK)
            m = earlier < seg
            counts_row = seg_rows + earlier * 257
            at_tau = tl.load(counts_row + last, mask=m, other=0, cache_modifier=".cg")
            over_tau = tl.load(counts_row + last + 1, mask=m & (last < 255), other=0, cache_modifier=".cg")
            above += tl.sum(tl.load(counts_row + 256, mask=m, other=0, cache_modifier=".cg") + over_tau, 0)
            ties_seen += tl.sum(at_tau - over_tau, 0)
        taken = above + tl.minimum(ties_seen, ties_wanted)
    end = tl.where(taken < k, end, first)  # the row is full before this segment
    for c0 in range(first, end, BLOCK):
        positions = c0 + tl.arange(0, BLOCK)
        ok = positions < end
        keys = tl.where(ok, _ordered_key(tl.load(row_ptr + positions, mask=ok, other=0.0)), 0)
        taken, ties_seen = _emit(
            keys, positions, ok, tau, ties_wanted, taken, ties_seen, out_row, slot_row, slot_cols, MAP_SLOTS
        )
    if seg == 0:
        for c0 in range(tl.minimum(length, k), k, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            tl.store(out_row + cols, tl.full([BLOCK], -1, tl.int32), mask=cols < k)


@triton.jit
def _split_rows_kernel(
    logits_ptr,
    lengths_ptr,
    row_starts_ptr,
    out_ptr,
    sync_ptr,
    seg_counts_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    token_to_req_ptr,
    row0,
    num_cols,
    k,
    segments,
    tokens_per_req,
    slot_cols,
    stride_lr,
    stride_or,
    stride_r2t,
    FIRST_PHASE: tl.constexpr,
    LAST_PHASE: tl.constexpr,
    HAS_ROW_STARTS: tl.constexpr,
    MAP_SLOTS: tl.constexpr,
    HAS_TOKEN_TO_REQ: tl.constexpr,
    BLOCK: tl.constexpr,
    SEGMENT_BLOCK: tl.constexpr,
    SEGMENT_ALIGN: tl.constexpr,
):
    """Split-row top-k, program ``(segment, row - row0)``: phases
    ``FIRST_PHASE .. LAST_PHASE`` (0-3 the histogram rounds, 4 the emit) for
    one segment of one row. With several phases, the programs of a row meet
    at a grid barrier (:func:`_row_barrier`) between them: the launch must be
    cooperative. ``sync_ptr`` holds per row ``[4 histograms of 256 | barrier
    counter]`` (``_SYNC_COLS`` wide, zero before the first phase); rows with
    at most ``k`` entries (all selected) skip the rounds. The row's length is
    cut into ``segments`` equal shares (rounded up to ``SEGMENT_ALIGN``
    positions): programs past the end of a short row only join the barriers."""
    seg = tl.program_id(0)
    row = row0 + tl.program_id(1)
    row64 = tl.cast(row, tl.int64)
    start, length = _row_window(lengths_ptr, row_starts_ptr, row, num_cols, HAS_ROW_STARTS)
    row_ptr = logits_ptr + row64 * stride_lr + start
    hist_row = sync_ptr + row64 * _SYNC_COLS
    seg_rows = seg_counts_ptr + row64 * segments * 257
    segment = tl.cdiv(tl.cdiv(length, segments), SEGMENT_ALIGN) * SEGMENT_ALIGN
    first = seg * segment
    end = tl.minimum(first + segment, length)
    # tau's bytes resolved so far and the keys still wanted among those sharing them.
    prefix, need = _split_threshold(hist_row, k, FIRST_PHASE)
    for phase in tl.static_range(FIRST_PHASE, LAST_PHASE + 1):
        if length > k:
            if phase > FIRST_PHASE:
                if segments > 1:
                    _row_barrier(hist_row + 4 * 256, (phase - FIRST_PHASE) * segments)
                else:
                    tl.debug_barrier()  # this program's own atomics are done
                d, need = _radix_digit(hist_row + (phase - 1) * 256, need)
                prefix = (prefix << 8) | d.to(tl.uint32)
            if phase < 4:
                _split_histogram_round(row_ptr, hist_row, seg_rows + seg * 257, first, end, prefix, phase, BLOCK)
        if phase == 4:
            out_row, slot_row = _output_rows(
                out_ptr, req_to_token_ptr, req_pool_indices_ptr, token_to_req_ptr, row, tokens_per_req, stride_or,
                stride_r2t, MAP_SLOTS, HAS_TOKEN_TO_REQ,
            )
            _split_emit_segment(
                row_ptr, seg_rows, out_row, slot_row, seg, first, end, length, k, prefix, need, slot_cols,
                MAP_SLOTS, BLOCK, SEGMENT_BLOCK,
            )  # fmt: skip


def _validate(logits, lengths, k, row_starts, out):
    check_dtype("logits", logits, torch.float32)
    check_ndim("logits", logits, 2, "[rows, columns]")
    check_last_dim_contiguous("logits", logits)
    num_rows = logits.shape[0]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    check_dtype("lengths", lengths, torch.int32)
    check_ndim("lengths", lengths, 1, "[rows]")
    check_dim("lengths", lengths, 0, num_rows, "rows")
    check_last_dim_contiguous("lengths", lengths)
    tensors = [("logits", logits), ("lengths", lengths)]
    if row_starts is not None:
        check_dtype("row_starts", row_starts, torch.int32)
        check_ndim("row_starts", row_starts, 1, "[rows]")
        check_dim("row_starts", row_starts, 0, num_rows, "rows")
        check_last_dim_contiguous("row_starts", row_starts)
        tensors.append(("row_starts", row_starts))
    if out is not None:
        check_dtype("out", out, torch.int32)
        check_ndim("out", out, 2, "[rows, k]")
        check_dim("out", out, 0, num_rows, "rows")
        check_dim("out", out, 1, k, "k")
        check_last_dim_contiguous("out", out)
        tensors.append(("out", out))
    return tensors


def _check_config(cfg: TopKConfig, k: int) -> None:
    for name, low, high in (("chunks", k, 16384), ("cap", k, 16384), ("split_block", 32, 8192)):
        value = getattr(cfg, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"config.{name} must be a power of two, got {value}")
        if not low <= value <= high:
            raise ValueError(f"config.{name} must be in [{low}, {high}], got {value}")
    if not 1 <= cfg.split_programs_per_sm <= MAX_SPLIT_PROGRAMS_PER_SM:
        raise ValueError(
            f"config.split_programs_per_sm must be in [1, {MAX_SPLIT_PROGRAMS_PER_SM}] (programs resident at once), "
            f"got {cfg.split_programs_per_sm}"
        )


def topk_indices(
    logits: torch.Tensor,
    lengths: torch.Tensor,
    k: int = 2048,
    *,
    row_starts: torch.Tensor | None = None,
    req_to_token: torch.Tensor | None = None,
    req_pool_indices: torch.Tensor | None = None,
    token_to_req: torch.Tensor | None = None,
    tokens_per_req: int = 1,
    out: torch.Tensor | None = None,
    config: TopKConfig | None = None,
) -> torch.Tensor:
    """Positions of the ``k`` largest logits of each row (unsorted), ``-1``-padded.

    Args:
        logits: ``[T, N]`` float32, unit column stride (row stride free), NaN-free.
        lengths: ``[T]`` int32: row ``t`` considers columns
            ``row_starts[t] + i`` for ``0 <= i < lengths[t]`` (clamped to ``N``).
        k: how many to select, ``1 <= k <=`` :data:`MAX_K`.
        row_starts: optional ``[T]`` int32 window starts (default 0), e.g. the
            ragged prefill ``ks``; returned positions are relative to them.
        req_to_token, req_pool_indices, token_to_req, tokens_per_req: when
            ``req_to_token`` is given, the selected positions are mapped to
            KV slots in the same kernel, exactly as
            :func:`.topk_to_kv_slots.topk_to_kv_slots` would map them.
        out: optional ``[T, k]`` int32 destination, fully overwritten.
        config: override of :func:`default_config` (benchmarks and tests),
            e.g. ``split_rows`` to force or forbid the split-row path.

    Returns:
        ``[T, k]`` int32: the ``min(k, lengths[t])`` selected positions (or
        slots) of row ``t`` in increasing position order, then ``-1``. Among
        equal values at the threshold the lower positions win.
    """
    tensors = _validate(logits, lengths, k, row_starts, out)
    num_rows, num_cols = logits.shape
    map_slots = req_to_token is not None
    if map_slots:
        if req_pool_indices is None:
            raise ValueError("req_pool_indices is required with req_to_token")
        tensors += validate_slot_mapping(num_rows, req_to_token, req_pool_indices, token_to_req, tokens_per_req)
    elif req_pool_indices is not None or token_to_req is not None:
        raise ValueError("req_pool_indices / token_to_req are only used with req_to_token")
    device = check_same_device(tensors)
    if out is None:
        out = torch.empty(num_rows, k, dtype=torch.int32, device=device)
    if num_rows == 0:
        return out

    cfg = config or default_config(k)
    _check_config(cfg, k)
    num_sms = device_info(device).num_sms
    starts = row_starts if row_starts is not None else lengths
    slot_tables = (
        req_to_token if map_slots else out,
        req_pool_indices if map_slots else lengths,
        token_to_req if token_to_req is not None else lengths,
    )
    slot_cols = req_to_token.shape[1] if map_slots else 0
    stride_r2t = req_to_token.stride(0) if map_slots else 0
    flags = dict(HAS_ROW_STARTS=row_starts is not None, MAP_SLOTS=map_slots, HAS_TOKEN_TO_REQ=token_to_req is not None)
    if use_split_rows(num_rows, num_cols, num_sms, cfg):
        segments, rows_per_launch = split_grid(num_rows, num_cols, num_sms, cfg)
        sync = torch.zeros(num_rows, _SYNC_COLS.value, dtype=torch.int32, device=device)
        seg_counts = torch.empty(num_rows, segments, _RADIX_BINS + 1, dtype=torch.int32, device=device)
        if is_interpreter():  # programs run one after another: a launch a phase
            phases, launch = [(p, p) for p in range(5)], {}
        else:  # one cooperative launch, grid barriers between the phases
            phases, launch = [(0, 4)], {"launch_cooperative_grid": True, "maxnreg": SPLIT_MAX_REGISTERS}
        for row0 in range(0, num_rows, rows_per_launch):
            grid = (segments, min(rows_per_launch, num_rows - row0))
            for first_phase, last_phase in phases:
                _split_rows_kernel[grid](
                    logits, lengths, starts, out, sync, seg_counts, *slot_tables, row0, num_cols, k,
                    segments, tokens_per_req, slot_cols, logits.stride(0), out.stride(0), stride_r2t,
                    FIRST_PHASE=first_phase, LAST_PHASE=last_phase, BLOCK=cfg.split_block,
                    SEGMENT_BLOCK=_SEGMENT_BLOCK, SEGMENT_ALIGN=_SEGMENT_ALIGN, num_warps=_SPLIT_NUM_WARPS,
                    **launch, **flags,
                )  # fmt: skip
        return out

    programs = min(num_rows, _PROGRAMS_PER_SM * num_sms)
    scratch = torch.empty(programs, cfg.cap, dtype=torch.int32, device=device) if num_cols > cfg.cap else out
    _topk_kernel[(programs,)](
        logits,
        lengths,
        starts,
        out,
        scratch,
        *slot_tables,
        num_rows,
        num_cols,
        k,
        tokens_per_req,
        slot_cols,
        logits.stride(0),
        out.stride(0),
        stride_r2t,
        CHUNKS=cfg.chunks,
        CAP=cfg.cap,
        EMIT_BLOCK=_EMIT_BLOCK,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **flags,
    )
    return out
