"""The Hopper 4-bit GEMM: y = x @ dequantize(qw).T + bias where Triton's tl.dot cannot overlap the
unpacking with the tensor cores, written in Gluon (Triton's layout-explicit dialect) so that it can.

Why a second GEMM: with the dequantized tile as wgmma's register operand (tl.dot's swap_ab), ptxas
serializes every wgmma of the loop (warning C7515, one `WARPGROUP.DEPBAR` per k16), and with it in
shared memory Triton's pipeliner waits on each MMA before the next unpacking; the 4-bit mm kernel
took 1.2-1.5x bf16's time at 256 rows on an H100. Here the unpacking of tile i runs while the async
wgmma of tile i - 1 is in flight (warpgroup_mma_wait(1) keeps one outstanding).

Static code, copied (from the marker below on) into every generated triton module; launch.py calls
it for the "wgmma" launch where `_wgmma_takes` (sm_90, 4-bit codes in int32 words, 16-bit compute,
groups of whole tiles, whole zero points); elsewhere that launch runs the mm kernel.
"""

# ---- copied into generated modules from here ----

try:  # Gluon is Triton's from 3.5; without it the "wgmma" launch runs the mm kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
except ImportError:  # pragma: no cover - older Triton
    gluon = None

if gluon is not None:

    @gluon.jit
    def _w4_wgmma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr,
                         M, N, K, stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, k_per_split,
                         GROUP: gl.constexpr, OFFSET: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, PARTIALS: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                         STAGES: gl.constexpr, WARPS: gl.constexpr):
        """A [BLOCK_N, BLOCK_M] tile of y.T over one split of k: weight rows fill wgmma's M (64 per
        warpgroup), activation rows its N. Per k tile of BLOCK_K inputs (one scale per row: a group
        holds whole tiles): x's tile arrives by cp.async in a ring of STAGES; the tile's int32 words
        (loaded a tile ahead into registers) are unpacked as 2^23 + code in a float's bits, less
        OFFSET (2^23 + the code standing for 0) and the zero point, times the scale, rounded once to x's dtype (dequantize()'s value), and
        stored to one of two shared tiles; wgmma reads both operands from shared memory."""
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        WORDS: gl.constexpr = BLOCK_K // 8
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        xs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], smem)
        ws = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], smem)
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        words_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], plain)

        # x's tile: 16-byte vectors along k
        xl: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [WARPS, 1], [1, 0])
        rm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, xl))
        rkx = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, xl))
        k_begin = pid_k * k_per_split
        n_k = gl.minimum(k_per_split, K - k_begin) // BLOCK_K
        x_tile = x_ptr + gl.minimum(rm, M - 1)[:, None] * stride_xm + (k_begin + rkx)[None, :]
        x_live = gl.broadcast((rm < M)[:, None], x_tile)[0]

        # the words' tile, copied in 16-byte vectors (4 words) like x's
        cl: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (WORDS // 4), WORDS // 4], [WARPS, 1], [1, 0])
        rnc = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, cl)), N - 1)
        w_tile = qw_ptr + rnc[:, None] * stride_qn + (k_begin // 8 + gl.arange(0, WORDS, layout=gl.SliceLayout(0, cl)))[None, :]

        # unpacking: one word per thread and element, its 8 codes along a third dimension
        l3: gl.constexpr = gl.BlockedLayout([1, 1, 8], [32 // WORDS, WORDS, 1], [WARPS, 1, 1], [2, 1, 0])
        lw: gl.constexpr = gl.SliceLayout(2, l3)
        rn_safe = gl.minimum(pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, lw)), N - 1)
        shifts = (gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, l3))) * 4).to(gl.uint32)
        s_rows = s_ptr + rn_safe * stride_sn
        z_rows = z_ptr + rn_safe * stride_zn

        for i in gl.static_range(STAGES - 1):
            cp.async_copy_global_to_shared(xs.index(i), x_tile + i * BLOCK_K, mask=x_live & (i < n_k))
            cp.async_copy_global_to_shared(words_s.index(i), w_tile + i * WORDS)
            cp.commit_group()
        # scales (and zeros) two tiles ahead in registers; the words STAGES - 1 ahead in shared memory
        scale = gl.load(s_rows + k_begin // GROUP)
        scale_next = gl.load(s_rows + (k_begin + BLOCK_K * (1 < n_k)) // GROUP)
        zero = scale
        zero_next = scale
        if HAS_ZEROS:
            zero = gl.load(z_rows + k_begin // GROUP)
            zero_next = gl.load(z_rows + (k_begin + BLOCK_K * (1 < n_k)) // GROUP)
        # every split has a tile (the launch's split); a zero-trip path would set acc outside the wgmma
        # pipeline, and ptxas then serializes every wgmma (its warning C7515)
        gl.assume(n_k > 0)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        for i in range(n_k):
            g_after = (k_begin + ((i + 2) % n_k) * BLOCK_K) // GROUP
            scale_after = gl.load(s_rows + g_after)
            zero_after = zero
            if HAS_ZEROS:
                offset = OFFSET + zero.to(gl.float32)
                zero_after = gl.load(z_rows + g_after)
            else:
                offset = gl.full([BLOCK_N], OFFSET, gl.float32, layout=gl.SliceLayout(1, lw))
            cp.wait_group(STAGES - 2)  # this thread's copies of tile i are in; the barrier: everyone's
            gl.thread_barrier()
            words = words_s.index(i % STAGES).load(lw)
            bits = ((words.to(gl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
            w = (bits.to(gl.float32, bitcast=True) - offset[:, None, None]) * scale.to(gl.float32)[:, None, None]
            w_buf = ws.index(i % 2)
            w_buf.store(gl.reshape(w.to(dtype), [BLOCK_N, BLOCK_K]))
            hopper.fence_async_shared()
            gl.thread_barrier()
            x_buf = xs.index(i % STAGES)
            acc = hopper.warpgroup_mma(w_buf, x_buf.permute((1, 0)), acc, is_async=True)
            acc, _, _ = hopper.warpgroup_mma_wait(num_outstanding=1, deps=[acc, w_buf, x_buf])
            j = i + STAGES - 1  # into the slot of tile i - 1, whose MMA the wait saw finish
            cp.async_copy_global_to_shared(xs.index(j % STAGES), x_tile + j * BLOCK_K, mask=x_live & (j < n_k))
            cp.async_copy_global_to_shared(words_s.index(j % STAGES), w_tile + (j % n_k) * WORDS)
            cp.commit_group()
            scale = scale_next
            scale_next = scale_after
            zero = zero_next
            zero_next = zero_after
        acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        cp.wait_group(0)

        # y's rows are n-contiguous: threads run along n
        ol: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, WARPS], [0, 1])
        out = gl.convert_layout(acc, ol)
        on = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ol))
        om = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ol))
        live = (on < N)[:, None] & (om < M)[None, :]
        if PARTIALS:
            gl.store(part_ptr + pid_k * M * N + om[None, :] * N + on[:, None], out, mask=live)
        else:
            if HAS_BIAS:
                out += gl.load(b_ptr + gl.minimum(on, N - 1)).to(gl.float32)[:, None]
            gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], out.to(dtype), mask=live)
