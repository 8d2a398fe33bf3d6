"""The Hopper 4-bit GEMM: y = x @ dequantize(qw).T + bias where Triton's tl.dot cannot overlap the
unpacking with the tensor cores, written in Gluon (Triton's layout-explicit dialect) so that it can.

Why a second GEMM: with the dequantized tile as wgmma's register operand (tl.dot's swap_ab), ptxas
serializes every wgmma of the loop (warning C7515, one `WARPGROUP.DEPBAR` per k16), and with it in
shared memory Triton's pipeliner waits on each MMA before the next unpacking; the 4-bit mm kernel
took 1.2-1.5x bf16's time at 256 rows on an H100.

Why TMA brings every operand (x's tile, the words, a 16-byte chunk of scales and of zero points per
row): the fence.proxy.async before each wgmma is a MEMBAR in SASS that waits for every generic load
still in flight. Fed by cp.async and register loads, each k tile cost ~1.2 us whatever its size
(H100, session 33); fed by TMA, whose copies complete on an mbarrier instead, the kernel took
0.90x bf16's time at 256 rows of the 1B's 16384x2048 weight where the cp.async one took 1.24x.

Why warp-specialized: a loader warp issues the TMA copies into a ring of stages, and each warpgroup
of the tile (num_warps / 4 of them, block_n / that many weight rows each) unpacks its own rows and
issues its own wgmmas, waiting only on the ring, not on the other warpgroup. In lock step (one
program-wide barrier a k tile) the two warpgroups of a 128-row tile unpacked at the same time and
the tensor cores idled meanwhile: at 256 rows of the 8B's 14336x4096 weight on an H100 the
lock-step kernel took 59.0 us, this one 54.3 and bf16's matmul 50.2 (session 48).

Static code, copied (from the marker below on) into every generated triton module after unpack.py;
launch.py calls `wgmma_linear` for the "wgmma" launch where `_wgmma_takes` (sm_90, 4-bit codes in
int32 words, 16-bit compute, 64-code tiles inside a group, TMA-aligned rows, uint8 zero points);
elsewhere that launch runs the mm kernel.
"""

import torch
import triton

from vibee.kinds.quantization.unpack import NIBBLES_TO_BF16X2, NIBBLES_TO_F16X2, _half16, _pair16

# ---- copied into generated modules from here ----

try:  # Gluon is Triton's from 3.5; without it the "wgmma" launch runs the mm kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    gluon = None

_SCALE_CHUNK = 8  # scales per row a TMA box brings: 16 bytes, TMA's least row
_ZERO_CHUNK = 16  # uint8 zero points per row a TMA box brings

if gluon is not None:

    @gluon.jit
    def _chunk_pick(chunk, g, cols, layout: gl.constexpr):
        """Column g % chunk width of each row of a [rows, width] tile, as fp32 in `layout` (one
        nonzero term per row: exact)."""
        picked = gl.sum(gl.where(cols[None, :] == g % chunk.shape[1], chunk.to(gl.float32), 0.0), axis=1)
        return gl.convert_layout(picked, layout)

    @gluon.jit
    def _wgmma_loader(x_desc, w_desc, s_desc, z_desc, xs, words_s, scales_s, zeros_s, ready, empty, row_m, row_n, k_begin,
                      n_k, GROUP: gl.constexpr, HAS_ZEROS: gl.constexpr):
        """The loader warp: k tile i's operands (x's tile, the tile's words, the chunk of scales and
        zero points holding its group) by TMA into slot i % stages of the ring once every warpgroup
        has released that slot, completing on the slot's ready barrier."""
        stages: gl.constexpr = xs.shape[0]
        block_k: gl.constexpr = x_desc.block_type.shape[1]
        chunk: gl.constexpr = s_desc.block_type.shape[1]
        zchunk: gl.constexpr = z_desc.block_type.shape[1]
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                                + (z_desc.block_type.nbytes if HAS_ZEROS else 0))
        for i in range(n_k):
            slot = i % stages
            mbarrier.wait(empty.index(slot), ((i // stages) & 1) ^ 1)  # a fresh barrier passes phase 1: the first round
            k = k_begin + i * block_k
            bar = ready.index(slot)
            mbarrier.expect(bar, nbytes)
            tma.async_copy_global_to_shared(x_desc, [row_m, k], bar, xs.index(slot))
            tma.async_copy_global_to_shared(w_desc, [row_n, k // 8], bar, words_s.index(slot))
            tma.async_copy_global_to_shared(s_desc, [row_n, k // GROUP // chunk * chunk], bar, scales_s.index(slot))
            if HAS_ZEROS:
                tma.async_copy_global_to_shared(z_desc, [row_n, k // GROUP // zchunk * zchunk], bar, zeros_s.index(slot))

    @gluon.jit
    def _wgmma_rows(xs, words_s, scales_s, zeros_s, ws, ready, empty, b_ptr, y_ptr, part_ptr, count_ptr, M, N, stride_ym,
                    row_m, row_n, k_begin, n_k, tile, WG: gl.constexpr, GROUP: gl.constexpr, ZERO_CODE: gl.constexpr,
                    HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr):
        """Warpgroup WG: its R weight rows of the tile (wgmma's M, 64 per instruction) against x's
        BLOCK_M rows (its N). Per k tile it unpacks its rows' words by packed 16-bit arithmetic
        (unpack.py's nibble pairs: (code - zero) * scale rounded once, dequantize()'s value) into one
        of its two shared tiles and issues the async wgmma; tile i - 1's wgmma is then waited for and
        its slot released to the loader. SPLIT_K > 1: it stores an fp32 partial, and the last of the
        splits to finish (a counter per tile and warpgroup, put back to 0) adds them up in split order
        (deterministic) and stores y: no second kernel."""
        stages: gl.constexpr = xs.shape[0]
        dtype: gl.constexpr = xs.dtype
        IS_BF16: gl.constexpr = dtype == gl.bfloat16
        BLOCK_M: gl.constexpr = xs.shape[1]
        BLOCK_K: gl.constexpr = xs.shape[2]
        R: gl.constexpr = ws.shape[1]
        WORDS: gl.constexpr = BLOCK_K // 8
        CHUNK: gl.constexpr = scales_s.shape[2]
        ZCHUNK: gl.constexpr = zeros_s.shape[2]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        # unpacking: a thread holds one word of a row; the scales' chunk is laid out by the same rows
        lw: gl.constexpr = gl.BlockedLayout([1, 1], [32 // WORDS, WORDS], [4, 1], [1, 0])
        ls: gl.constexpr = gl.BlockedLayout([1, 1], [32 // CHUNK, CHUNK], [4, 1], [1, 0])
        lz: gl.constexpr = gl.BlockedLayout([1, ZCHUNK // WORDS], [32 // WORDS, WORDS], [4, 1], [1, 0])
        rows: gl.constexpr = gl.SliceLayout(1, lw)
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ls))
        zcols = gl.arange(0, ZCHUNK, layout=gl.SliceLayout(0, lz))

        # every split has a tile (the launch's split); a zero-trip path would set acc outside the wgmma
        # pipeline, and ptxas then serializes every wgmma (its warning C7515)
        gl.assume(n_k > 0)
        acc = gl.zeros([R, BLOCK_M], gl.float32, layout=mma)
        for i in range(n_k):
            slot = i % stages
            mbarrier.wait(ready.index(slot), (i // stages) & 1)
            g = (k_begin + i * BLOCK_K) // GROUP
            scale = _chunk_pick(scales_s.index(slot).slice(WG * R, R).load(ls), g, cols, rows)
            scale2 = _pair16(scale, IS_BF16)[:, None] + gl.zeros([R, WORDS], gl.int32, layout=lw)
            if HAS_ZEROS:  # the pair 1.0-step base (128 bf16, 1024 fp16) + zero point
                zero = _chunk_pick(zeros_s.index(slot).slice(WG * R, R).load(lz), g, zcols, rows)
                base2 = _pair16(zero + (128.0 if IS_BF16 else 1024.0), IS_BF16)[:, None] + gl.zeros([R, WORDS], gl.int32, layout=lw)
            else:
                BASE: gl.constexpr = ((0x4300 if IS_BF16 else 0x6400) + ZERO_CODE) * 0x10001
                base2 = gl.full([R, WORDS], BASE, gl.int32, layout=lw)
            words = words_s.index(slot).slice(WG * R, R).load(lw)
            if IS_BF16:
                p0, p1, p2, p3 = gl.inline_asm_elementwise(NIBBLES_TO_BF16X2, "=r,=r,=r,=r,r,r,r", [words, scale2, base2],
                                                           dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
            else:
                p0, p1, p2, p3 = gl.inline_asm_elementwise(NIBBLES_TO_F16X2, "=r,=r,=r,=r,r,r,r", [words, scale2, base2],
                                                           dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
            # codes (s, s + 4) of a word are pair s: joined back into input order as unpack.py does
            c = gl.join(gl.join(gl.join(_half16(p0, False, IS_BF16), _half16(p0, True, IS_BF16)),
                                gl.join(_half16(p2, False, IS_BF16), _half16(p2, True, IS_BF16))),
                        gl.join(gl.join(_half16(p1, False, IS_BF16), _half16(p1, True, IS_BF16)),
                                gl.join(_half16(p3, False, IS_BF16), _half16(p3, True, IS_BF16))))
            w_buf = ws.index(WG * 2 + i % 2)
            w_buf.store(gl.reshape(c, [R, BLOCK_K]))
            hopper.fence_async_shared()
            gl.thread_barrier()  # this warpgroup's (a named barrier inside a partition)
            x_buf = xs.index(slot)
            acc = hopper.warpgroup_mma(w_buf, x_buf.permute((1, 0)), acc, is_async=True)
            acc, _, _ = hopper.warpgroup_mma_wait(num_outstanding=1, deps=[acc, w_buf, x_buf])
            # tile i - 1's wgmma is done and its words were read before this tile's barrier: its slot is free
            mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1, pred=i > 0)
        acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])

        # stored from the wgmma layout itself: converting it first takes a scratch tile of shared
        # memory as large as the accumulators, per warpgroup
        on = row_n + WG * R + gl.arange(0, R, layout=gl.SliceLayout(1, mma))
        om = row_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        live = (on < N)[:, None] & (om < M)[None, :]
        if SPLIT_K > 1:
            at = om[None, :] * N + on[:, None]
            gl.store(part_ptr + gl.program_id(2) * M * N + at, acc, mask=live)
            # every thread's partial stored before the counter's release (one thread does the atomic)
            gl.thread_barrier()
            counter = count_ptr + tile * (ws.shape[0] // 2) + WG  # ws: two tiles per warpgroup
            finished = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if finished == SPLIT_K - 1:
                # summed 16 weight rows at a time, threads along n: the whole tile's partial addresses at
                # once would take more registers than the warpgroup has
                fl: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [1, 4], [0, 1])
                for r in gl.static_range(0, R, 16):
                    fn = row_n + WG * R + r + gl.arange(0, 16, layout=gl.SliceLayout(1, fl))
                    fm = row_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, fl))
                    flive = (fn < N)[:, None] & (fm < M)[None, :]
                    fat = fm[None, :] * N + fn[:, None]
                    out = gl.zeros([16, BLOCK_M], gl.float32, layout=fl)
                    for split in gl.static_range(SPLIT_K):  # .cg: from L2, where the other programs' partials are
                        out += gl.load(part_ptr + split * M * N + fat, mask=flive, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        out += gl.load(b_ptr + gl.minimum(fn, N - 1)).to(gl.float32)[:, None]
                    gl.store(y_ptr + fm[None, :] * stride_ym + fn[:, None], out.to(dtype), mask=flive)
                gl.store(counter, 0)
        else:
            if HAS_BIAS:
                acc += gl.load(b_ptr + gl.minimum(on, N - 1)).to(gl.float32)[:, None]
            gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], acc.to(dtype), mask=live)

    @gluon.jit(do_not_specialize=["M"])  # one compile for every row count (compile_launches runs one each)
    def _w4_wgmma_kernel(x_desc, w_desc, s_desc, z_desc, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_ym, k_per_split,
                         GROUP: gl.constexpr, ZERO_CODE: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
                         SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                         STAGES: gl.constexpr, WARPS: gl.constexpr, ROWS_REGS: gl.constexpr):
        """A [BLOCK_N, BLOCK_M] tile of y.T over one split of k: WARPS / 4 warpgroups of BLOCK_N / that
        many weight rows each (_wgmma_rows; the first runs in the program's own warps, the second in
        a worker partition) and a loader warp (_wgmma_loader) around a ring of STAGES slots."""
        gl.static_assert(BLOCK_K % GROUP == 0 or GROUP % BLOCK_K == 0, "a k tile lies inside one group")
        gl.static_assert(WARPS == 4 or WARPS == 8, "one or two warpgroups")
        dtype: gl.constexpr = x_desc.dtype
        GROUPS: gl.constexpr = WARPS // 4
        R: gl.constexpr = BLOCK_N // GROUPS
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        w_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        xs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        words_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8], w_desc.layout)
        scales_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, s_desc.block_type.shape[1]], s_desc.layout)
        zeros_s = gl.allocate_shared_memory(gl.uint8, [STAGES if HAS_ZEROS else 1, BLOCK_N, z_desc.block_type.shape[1]],
                                            z_desc.layout)
        ws = gl.allocate_shared_memory(dtype, [2 * GROUPS, R, BLOCK_K], w_layout)  # two unpacked tiles per warpgroup
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(STAGES):
            mbarrier.init(ready.index(b), count=1)
            mbarrier.init(empty.index(b), count=GROUPS)

        k_begin = pid_k * k_per_split
        n_k = gl.minimum(k_per_split, K - k_begin) // BLOCK_K
        row_n = pid_n * BLOCK_N
        row_m = pid_m * BLOCK_M
        tile = pid_m * gl.num_programs(0) + pid_n
        # (a partition and its arguments are spelled out in the call: the language keeps no tuple of them)
        if GROUPS == 2:
            gl.warp_specialize([
                (_wgmma_rows, (xs, words_s, scales_s, zeros_s, ws, ready, empty, b_ptr, y_ptr, part_ptr, count_ptr, M, N,
                               stride_ym, row_m, row_n, k_begin, n_k, tile, gl.constexpr(0), GROUP, ZERO_CODE, HAS_ZEROS,
                               HAS_BIAS, SPLIT_K)),
                (_wgmma_rows, (xs, words_s, scales_s, zeros_s, ws, ready, empty, b_ptr, y_ptr, part_ptr, count_ptr, M, N,
                               stride_ym, row_m, row_n, k_begin, n_k, tile, gl.constexpr(1), GROUP, ZERO_CODE, HAS_ZEROS,
                               HAS_BIAS, SPLIT_K)),
                (_wgmma_loader, (x_desc, w_desc, s_desc, z_desc, xs, words_s, scales_s, zeros_s, ready, empty, row_m, row_n,
                                 k_begin, n_k, GROUP, HAS_ZEROS)),
            ], [4, 1], [ROWS_REGS, 40])  # the loader holds a few scalars
        else:
            gl.warp_specialize([
                (_wgmma_rows, (xs, words_s, scales_s, zeros_s, ws, ready, empty, b_ptr, y_ptr, part_ptr, count_ptr, M, N,
                               stride_ym, row_m, row_n, k_begin, n_k, tile, gl.constexpr(0), GROUP, ZERO_CODE, HAS_ZEROS,
                               HAS_BIAS, SPLIT_K)),
                (_wgmma_loader, (x_desc, w_desc, s_desc, z_desc, xs, words_s, scales_s, zeros_s, ready, empty, row_m, row_n,
                                 k_begin, n_k, GROUP, HAS_ZEROS)),
            ], [1], [40])

    _GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int32: gl.int32, torch.uint8: gl.uint8}


def wgmma_tma_ready(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> bool:
    """Whether TMA can bring these operands: 16-byte aligned bases and rows, a whole chunk of scales
    (and zero points, as uint8) per box, so groups per row a multiple of 8 (16 with zero points)."""
    groups = scales.shape[1]
    tensors = (words, scales) if zeros is None else (words, scales, zeros)
    return (all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)
            and groups % _SCALE_CHUNK == 0 and (zeros is None or zeros.dtype == torch.uint8 and groups % _ZERO_CHUNK == 0))


def _descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor of t's [block] boxes, laid out in shared memory as wgmma (x) or the unpacking reads them."""
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype]))


def wgmma_linear(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, y: torch.Tensor, part: torch.Tensor, counters: torch.Tensor, k_per_split: int, split: int,
                 group_size: int, zero_code: int, block_m: int, block_n: int, block_k: int, num_warps: int,
                 num_stages: int) -> None:
    """y = x @ dequantize(words, scales, zeros).T (+ bias), 4-bit codes of zero_code standing for
    0.0 where there are no zero points; split > 1: through the fp32 partials part[split] and one
    zeroed int32 counter per output tile and warpgroup (num_warps / 4; the kernel leaves them at 0)."""
    m, k = x.shape
    n = words.shape[0]
    if x.data_ptr() % 16:  # TMA's boxes start 16-byte aligned
        x = x.clone()
    z = zeros if zeros is not None else scales.view(torch.uint8)  # a descriptor the kernel never reads: no allocation
    _w4_wgmma_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)](
        _descriptor(x, [block_m, block_k]), _descriptor(words, [block_n, block_k // 8]),
        _descriptor(scales, [block_n, _SCALE_CHUNK]), _descriptor(z, [block_n, _ZERO_CHUNK]),
        bias if bias is not None else scales, y, part, counters, m, n, k, y.stride(0), k_per_split,
        GROUP=group_size, ZERO_CODE=zero_code, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, STAGES=num_stages, WARPS=num_warps, ROWS_REGS=232,
        num_warps=4, maxnreg=_max_registers(num_warps, block_n, block_m),
    )


def _max_registers(num_warps: int, block_n: int, block_m: int) -> int:
    """Registers a thread at launch (the partitions then trade them by setmaxnreg): two warpgroups
    and the loader's are 12 warps, 168 each fills the SM's 64K; one warpgroup whose accumulators take
    at most 64 registers a thread gets 128, so that two programs fit an SM; else 256 (one program)."""
    if num_warps == 8:
        return 168
    return 128 if block_n * block_m // 128 <= 64 else 256
