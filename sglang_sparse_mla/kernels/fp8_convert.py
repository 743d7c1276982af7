"""Float conversions inside Triton kernels that give the same bits on every arch and under the
interpreter: FP8 (e4m3fn) codes to floats, and fp32 rounded to bf16.

SM89 and newer convert float8_e4m3fn in hardware. SM80/86 have no FP8 at all
(Triton refuses the type there), so the emulated path rebuilds the value from
its bits: an e4m3 code ``s eeee mmm`` shifted into an fp16 ``s 0eeee mmm0000000``
is exactly ``value / 2**8`` for normal *and* subnormal codes (both formats have
the same subnormal rule and fp16 has the wider exponent), so the conversion is
two shifts, a bitcast, and a scale of 256 that callers fold into their own
scale factor. The result is exact either way; NaN codes (0x7F/0xFF) never
occur in data quantized with ``amax / 448``.

The interpreter's own fp32 -> bf16 cast truncates; :func:`round_to_bf16` rounds to nearest even
with integer arithmetic on the bits, wherever a kernel must round as the GPU does.
"""

import triton
import triton.language as tl

# What the emulated conversion leaves out: multiply its result by this.
EMULATED_FP8_FACTOR = 256.0


@triton.jit
def fp8_e4m3_to_f32(codes, NATIVE: tl.constexpr):
    """Integer tensor of e4m3fn codes (0..255, any int type) -> float32.

    With ``NATIVE`` the value itself; otherwise ``value / 256`` (see module doc).
    """
    if NATIVE:
        return codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        bits = codes.to(tl.int16)
        half_bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
        return half_bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def round_to_bf16(y):
    """fp32 ``y`` rounded to the nearest bf16 (ties to even), kept in fp32: integer arithmetic on the
    bits, as the interpreter's own fp32 -> bf16 cast truncates."""
    bits = y.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def fp8_e4m3_to_f16(raw, NATIVE: tl.constexpr):
    """uint8 e4m3fn codes -> float16 for fp16 tensor-core dots on SM80.

    With ``NATIVE`` the value itself; otherwise ``value / 256`` (see module doc).
    """
    if NATIVE:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        bits = raw.to(tl.int16)
        half_bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
        return half_bits.to(tl.float16, bitcast=True)
