"""Stores that round like the GPU under Triton's interpreter.

A compiled kernel converts float32 to bfloat16 with round-to-nearest-even (``cvt.rn.bf16.f32``), as
``torch.Tensor.to`` does. Triton's interpreter (``TRITON_INTERPRET=1``, the triton backend on CPU tensors)
truncates instead: ``cast_impl`` calls ``_convert_float`` with no rounding mode for float32 -> bfloat16, and
its "rtne" mode rounds half up without carrying into the exponent (triton 3.9). Truncation is biased toward
zero and up to one bfloat16 ulp off, twice the rounding error of plain PyTorch; a PLMS step that keeps
bf16 model outputs and weights them by up to 59/24 turned that into a 6-ulp error (tests/test_pndm.py).
Under the interpreter, ``to_output`` rounds on the bits instead (integer round-to-nearest-even, as torch's
``c10::round_to_nearest_even``), which also keeps subnormals, whose interpreted cast is wrong; compiled kernels
cast directly.
"""

import triton
import triton.language as tl

try:
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # a Triton without the interpreter module: nothing is interpreted
    _Interpreted = ()


@triton.jit
def _probe():
    pass


# triton.jit reads TRITON_INTERPRET when it decorates: this module's functions run interpreted iff _probe does
INTERPRETED = isinstance(_probe, _Interpreted)
_EMULATE_RNE = tl.constexpr(INTERPRETED)


@triton.jit
def to_output(v, dtype: tl.constexpr):
    """``v`` (float32) as ``dtype`` for a store, rounded to nearest even (see the module docstring)."""
    if _EMULATE_RNE:
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # ties to the even bfloat16; overflow rounds to inf
            # NaN as torch writes it (a payload could carry into the exponent); the bits stored as they are,
            # since the interpreter's cast also garbles subnormals
            bits = tl.where(v != v, 0x7FC0, bits >> 16)
            v = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)  # the cast below is then the identity
    return v.to(dtype)
