"""`c + scale * h @ b^T` for a low-rank product (rank <= 128), as one pass over c.

LoRA adds a rank-r product to a (tokens x features) tensor twice per layer: in the forward the
up-projection (`base_out + s * h B^T`), in the backward the LoRA share of the input gradient
(`grad_x + grad_h A`). As a matmul that is K = r (16-48 at the usual ranks), and cuBLAS runs it
with tiles made for deep K: on the H100 those `addmm`s moved about a quarter of the memory
bandwidth and, with the copy of c PyTorch makes first, took 21 % of the FP8-backward step
(benchmarks/NOTES.md). The Triton kernel reads each tile of c once, does the one `tl.dot` over r
in registers and writes the tile once: on an H200 the 351 calls of a 7B step take 12.5 ms, and
the step runs 5.6 % (bf16) to 7.6 % (FP8 grad-input) faster than with `addmm`.

`add_low_rank` is a custom op, so torch.compile keeps it whole (Inductor would hand an `addmm`
back to cuBLAS); with Triton installed it is a `triton_op`, which Inductor launches from its
compiled graph like its own kernels. On CPU, or without Triton, it is `torch.addmm`.
"""

from __future__ import annotations

import functools

import torch

MAX_RANK = 128  # h and b tiles are held whole in registers


def _define_op():
    """`vlmtune::add_low_rank`: a Triton op where Triton is installed (Inductor then launches the kernel
    from its compiled graph, without the Python dispatch of an opaque op), a plain custom op otherwise."""
    try:
        import triton  # noqa: F401
        from torch.library import triton_op, wrap_triton
    except ImportError:
        define, launch = functools.partial(torch.library.custom_op, mutates_args=()), None
    else:
        define, launch = functools.partial(triton_op, mutates_args=()), wrap_triton

    @define("vlmtune::add_low_rank")
    def add_low_rank(c: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """c (M x N, any strides) + scale * h (M x r) @ b (N x r)^T, accumulated in fp32, as a new contiguous
        tensor of `out_dtype` (c's by default)."""
        if c.is_cuda and launch is not None and h.shape[1] <= MAX_RANK:
            return _launch(launch, c, h, b, scale, out_dtype=out_dtype)
        return addmm_low_rank(c, h, b, scale, out_dtype)

    if launch is None:
        add_low_rank.register_fake(lambda c, h, b, scale, out_dtype=None: c.new_empty(c.shape, dtype=out_dtype or c.dtype))
    return add_low_rank


def addmm_low_rank(c: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same sum through `torch.addmm` (cuBLAS on GPU: what the benchmark compares the kernel against),
    in `out_dtype` whatever autocast would pick (it is called under autocast)."""
    dtype = out_dtype or c.dtype
    with torch.autocast(c.device.type, enabled=False):
        return torch.addmm(c.to(dtype), h.to(dtype), b.t().to(dtype), alpha=scale)


def _build_kernel(interpret: bool = False):
    """The Triton kernel, autotuned over tile shapes (one fixed tile under Triton's CPU interpreter), or None."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(
        c_ptr, h_ptr, b_ptr, out_ptr, M, N, R, scale, M_BUCKET,
        stride_cm, stride_cn, stride_hm, stride_hr, stride_bn, stride_br, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        blocks_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        rows = (pid // blocks_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < R
        rows64, cols64, ranks64 = rows.to(tl.int64), cols.to(tl.int64), ranks.to(tl.int64)  # M x N can pass 2^31
        h = tl.load(h_ptr + rows64[:, None] * stride_hm + ranks64[None, :] * stride_hr, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        b_t = tl.load(b_ptr + cols64[None, :] * stride_bn + ranks64[:, None] * stride_br, mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        c = tl.load(c_ptr + rows64[:, None] * stride_cm + cols64[None, :] * stride_cn, mask=tile_ok, other=0.0)
        result = c.to(tl.float32) + scale * tl.dot(h, b_t)
        tl.store(out_ptr + rows64[:, None] * stride_om + cols64[None, :], result.to(out_ptr.dtype.element_ty), mask=tile_ok)

    if interpret:
        return _FixedTile(kernel)
    # Memory-bound: the tile shape sets how many bytes each program has in flight.
    configs = [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps)
        for block_m, block_n, warps in [(64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 256, 8)]
    ]
    # Keyed on M's power-of-two bucket, not M: token counts change with every batch of variable-length
    # samples, and a key on M benchmarked every candidate tile again for each new count (the tiny
    # default's LoRA ran at 13.7 steps/s against 17.4 without the kernel on an H200).
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "BLOCK_R"])(kernel)


class _FixedTile:
    """A kernel launched with one tile shape (Triton's CPU interpreter cannot time an autotuner's candidates)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, BLOCK_M=32, BLOCK_N=64, **kwargs)


def _launch(launch, c: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float, kernel=None, out_dtype=None) -> torch.Tensor:
    import triton

    rows, cols = c.shape
    rank = h.shape[1]
    out = torch.empty((rows, cols), dtype=out_dtype or c.dtype, device=c.device)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)  # noqa: E731
    launch(kernel or _KERNEL)[grid](
        c, h, b, out, rows, cols, rank, scale, triton.next_power_of_2(rows),
        c.stride(0), c.stride(1), h.stride(0), h.stride(1), b.stride(0), b.stride(1), out.stride(0),
        BLOCK_R=max(16, triton.next_power_of_2(rank)),  # tl.dot needs K >= 16
    )
    return out


_KERNEL = _build_kernel()
add_low_rank = _define_op()
