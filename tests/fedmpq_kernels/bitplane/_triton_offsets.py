"""A Triton kernel that stores where each momentum plane starts (the interpreter resolves a
kernel's names in its module's globals, so it cannot be defined inside the test)."""
import triton
import triton.language as tl

from fedmpq_kernels.bitplane.triton import _plane_offset


@triton.jit
def plane_offsets(out_ptr, n, N: tl.constexpr):
    for i in tl.static_range(N):
        tl.store(out_ptr + i, _plane_offset(n, i))
