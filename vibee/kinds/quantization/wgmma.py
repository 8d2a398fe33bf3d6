"""The Hopper 4-bit GEMM: y = x @ dequantize(qw).T + bias where Triton's tl.dot cannot overlap the
unpacking with the tensor cores, written in Gluon (Triton's layout-explicit dialect) so that it can.

Why a second GEMM: with the dequantized tile as wgmma's register operand (tl.dot's swap_ab), ptxas
serializes every wgmma of the loop (warning C7515, one `WARPGROUP.DEPBAR` per k16), and with it in
shared memory Triton's pipeliner waits on each MMA before the next unpacking; the 4-bit mm kernel
took 1.2-1.5x bf16's time at 256 rows on an H100. Here the unpacking of tile i runs while the async
wgmma of tile i - 1 is in flight (warpgroup_mma_wait(1) keeps one outstanding).

Why TMA brings every operand (x's tile, the words, a 16-byte chunk of scales and of zero points per
row): the fence.proxy.async before each wgmma is a MEMBAR in SASS that waits for every generic load
still in flight. Fed by cp.async and register loads, each k tile cost ~1.2 us whatever its size
(H100, session 33); fed by TMA, whose copies complete on an mbarrier instead, the kernel took
0.90x bf16's time at 256 rows of the 1B's 16384x2048 weight where the cp.async one took 1.24x.

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
    def _load_tile(x_desc, w_desc, s_desc, z_desc, ring, slot, row_m, row_n, k, live, GROUP: gl.constexpr,
                   HAS_ZEROS: gl.constexpr):
        """TMA copies of k tile k's operands (x's tile, the words, the chunk of scales and zero points
        holding its group) into slot `slot` of the ring (xs, words, scales, zeros, barriers), completing
        on the slot's barrier; none where not live (past the split's last tile)."""
        xs, words_s, scales_s, zeros_s, bars = ring
        chunk: gl.constexpr = s_desc.block_type.shape[1]
        zchunk: gl.constexpr = z_desc.block_type.shape[1]
        nbytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes + s_desc.block_type.nbytes
                                + (z_desc.block_type.nbytes if HAS_ZEROS else 0))
        bar = bars.index(slot)
        mbarrier.expect(bar, nbytes, pred=live)
        tma.async_copy_global_to_shared(x_desc, [row_m, k], bar, xs.index(slot), pred=live)
        tma.async_copy_global_to_shared(w_desc, [row_n, k // 8], bar, words_s.index(slot), pred=live)
        tma.async_copy_global_to_shared(s_desc, [row_n, k // GROUP // chunk * chunk], bar, scales_s.index(slot), pred=live)
        if HAS_ZEROS:
            tma.async_copy_global_to_shared(z_desc, [row_n, k // GROUP // zchunk * zchunk], bar, zeros_s.index(slot), pred=live)

    @gluon.jit
    def _chunk_pick(chunk, g, cols, layout: gl.constexpr):
        """Column g % chunk width of each row of a [rows, width] tile, as fp32 in `layout` (one
        nonzero term per row: exact)."""
        picked = gl.sum(gl.where(cols[None, :] == g % chunk.shape[1], chunk.to(gl.float32), 0.0), axis=1)
        return gl.convert_layout(picked, layout)

    @gluon.jit(do_not_specialize=["M"])  # one compile for every row count (compile_launches runs one each)
    def _w4_wgmma_kernel(x_desc, w_desc, s_desc, z_desc, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_ym, k_per_split,
                         GROUP: gl.constexpr, ZERO_CODE: gl.constexpr, HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr,
                         SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                         STAGES: gl.constexpr, WARPS: gl.constexpr):
        """A [BLOCK_N, BLOCK_M] tile of y.T over one split of k: weight rows fill wgmma's M (64 per
        warpgroup), activation rows its N. Per k tile of 64 or 128 inputs (inside one group: 128 halves
        the loop's waits and barriers per input, for 1.6x the shared memory a stage), TMA brings x's
        tile, the weight rows' 8 words and a chunk of their scales (and zero points) into a ring of
        STAGES slots; the words are unpacked by packed 16-bit arithmetic (unpack.py's nibble pairs:
        (code - zero) * scale rounded once, dequantize()'s value) into one of two shared tiles, and
        wgmma reads both operands from shared memory. SPLIT_K > 1: each split stores an fp32
        partial, and the last program of the tile to finish (a counter per tile, put back to 0) adds
        them up in split order (deterministic) and stores y: no second kernel, no second pass."""
        dtype: gl.constexpr = x_desc.dtype
        IS_BF16: gl.constexpr = dtype == gl.bfloat16
        WORDS: gl.constexpr = BLOCK_K // 8
        CHUNK: gl.constexpr = s_desc.block_type.shape[1]
        ZCHUNK: gl.constexpr = z_desc.block_type.shape[1]
        gl.static_assert(BLOCK_K % GROUP == 0 or GROUP % BLOCK_K == 0, "a k tile lies inside one group")
        pid_n = gl.program_id(0)
        pid_m = gl.program_id(1)
        pid_k = gl.program_id(2)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        w_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        xs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        words_s = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, WORDS], w_desc.layout)
        scales_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, CHUNK], s_desc.layout)
        zeros_s = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, ZCHUNK], z_desc.layout)
        ws = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], w_layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(STAGES):
            mbarrier.init(bars.index(b), count=1)

        # unpacking: a thread holds one word of a row; the scales' chunk is laid out by the same rows
        # (the same layout at 8 words a row, BLOCK_K 64: its pick needs no conversion)
        lw: gl.constexpr = gl.BlockedLayout([1, 1], [32 // WORDS, WORDS], [WARPS, 1], [1, 0])
        ls: gl.constexpr = gl.BlockedLayout([1, 1], [32 // CHUNK, CHUNK], [WARPS, 1], [1, 0])
        lz: gl.constexpr = gl.BlockedLayout([1, ZCHUNK // WORDS], [32 // WORDS, WORDS], [WARPS, 1], [1, 0])
        rows: gl.constexpr = gl.SliceLayout(1, lw)
        cols = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ls))
        zcols = gl.arange(0, ZCHUNK, layout=gl.SliceLayout(0, lz))

        k_begin = pid_k * k_per_split
        n_k = gl.minimum(k_per_split, K - k_begin) // BLOCK_K
        row_n = pid_n * BLOCK_N
        row_m = pid_m * BLOCK_M
        ring = (xs, words_s, scales_s, zeros_s, bars)
        for i in gl.static_range(STAGES - 1):
            _load_tile(x_desc, w_desc, s_desc, z_desc, ring, i, row_m, row_n, k_begin + i * BLOCK_K, i < n_k, GROUP, HAS_ZEROS)
        # every split has a tile (the launch's split); a zero-trip path would set acc outside the wgmma
        # pipeline, and ptxas then serializes every wgmma (its warning C7515)
        gl.assume(n_k > 0)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        for i in range(n_k):
            slot = i % STAGES
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            g = (k_begin + i * BLOCK_K) // GROUP
            scale = _chunk_pick(scales_s.index(slot).load(ls), g, cols, rows)
            scale2 = _pair16(scale, IS_BF16)[:, None] + gl.zeros([BLOCK_N, WORDS], gl.int32, layout=lw)
            if HAS_ZEROS:  # the pair 1.0-step base (128 bf16, 1024 fp16) + zero point
                zero = _chunk_pick(zeros_s.index(slot).load(lz), g, zcols, rows)
                base2 = _pair16(zero + (128.0 if IS_BF16 else 1024.0), IS_BF16)[:, None] + gl.zeros([BLOCK_N, WORDS], gl.int32, layout=lw)
            else:
                BASE: gl.constexpr = ((0x4300 if IS_BF16 else 0x6400) + ZERO_CODE) * 0x10001
                base2 = gl.full([BLOCK_N, WORDS], BASE, gl.int32, layout=lw)
            words = words_s.index(slot).load(lw)
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
            w_buf = ws.index(i % 2)
            w_buf.store(gl.reshape(c, [BLOCK_N, BLOCK_K]))
            hopper.fence_async_shared()
            gl.thread_barrier()
            x_buf = xs.index(slot)
            acc = hopper.warpgroup_mma(w_buf, x_buf.permute((1, 0)), acc, is_async=True)
            acc, _, _ = hopper.warpgroup_mma_wait(num_outstanding=1, deps=[acc, w_buf, x_buf])
            # into tile i - 1's slot: its wgmma is done, and every thread read its words before the barrier
            j = i + STAGES - 1
            _load_tile(x_desc, w_desc, s_desc, z_desc, ring, j % STAGES, row_m, row_n, k_begin + j * BLOCK_K, j < n_k, GROUP,
                       HAS_ZEROS)
        acc = hopper.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
        for b in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(b))

        # y's rows are n-contiguous: threads run along n
        ol: gl.constexpr = gl.BlockedLayout([4, 1], [8, 4], [1, WARPS], [0, 1])
        out = gl.convert_layout(acc, ol)
        on = row_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ol))
        om = row_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ol))
        live = (on < N)[:, None] & (om < M)[None, :]
        if SPLIT_K > 1:
            at = om[None, :] * N + on[:, None]
            gl.store(part_ptr + pid_k * M * N + at, out, mask=live)
            # every thread's partial stored before the counter's release (one thread does the atomic)
            gl.thread_barrier()
            tile = pid_m * gl.num_programs(0) + pid_n
            finished = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if finished == SPLIT_K - 1:
                out = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ol)
                for split in gl.static_range(SPLIT_K):  # .cg: from L2, where the other programs' partials are
                    out += gl.load(part_ptr + split * M * N + at, mask=live, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    out += gl.load(b_ptr + gl.minimum(on, N - 1)).to(gl.float32)[:, None]
                gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], out.to(dtype), mask=live)
                gl.store(count_ptr + tile, 0)
        else:
            if HAS_BIAS:
                out += gl.load(b_ptr + gl.minimum(on, N - 1)).to(gl.float32)[:, None]
            gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], out.to(dtype), mask=live)

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
    zeroed int32 counter per output tile (the kernel leaves them at 0)."""
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
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, STAGES=num_stages, WARPS=num_warps, num_warps=num_warps,
    )
