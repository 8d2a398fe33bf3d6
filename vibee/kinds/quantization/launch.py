"""Launching the quantized matmul kernels (kernels.py): the kernels' view of a QuantizedWeight, the
launch for a product's shape from a table of tiles by activation rows M, and the launch itself.

Static code, copied (from the marker below on) into every generated triton module after the
torch module's QuantizedWeight and the kernels; the tile table comes from the spec (config
`tiles`), rendered by the template as TILES and passed in here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import triton

import torch.nn.functional as F

from vibee.kinds.quantization.gemv import _qgemv_kernel, rope_takes
from vibee.kinds.quantization.kernels import _dequant_kernel, _qmm_kernel, _qmm_slices_kernel
from vibee.kinds.quantization.rope_epilogue import RopeTarget, rope_arguments
from vibee.kinds.quantization.wgmma import gluon, wgmma_linear, wgmma_tma_ready


class QuantizedWeight(Protocol):
    """What the launch reads of the generated module's QuantizedWeight (which the copy uses)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, int]
    bits: int
    group_size: int


# ---- copied into generated modules from here ----

_MAGIC = 0x4B000000  # bits of 2^23 in fp32; | u gives 2^23 + u for 0 <= u < 2^23
_MAGIC_F = 8388608.0  # 2^23


@dataclass(frozen=True)
class LaunchTile:
    """One row of the spec's tile table (config `tiles`): the launch for products whose activation
    has at most max_m rows (None: any) and whose weight has at least min_n output rows; the first
    row that matches is taken."""

    kernel: str  # "gemv" (M == 1, FMA), "mm" or "slices" (tl.dot), "wgmma" (Hopper, Gluon), "dense"
    max_m: int | None
    min_n: int
    block_m: int
    block_n: int
    min_block_n: int  # block_n halves down to this while the grid has fewer programs than SMs
    block_k: int  # the largest tile of codes along k; halved (to 32) until it divides the row
    num_warps: int
    num_stages: int
    programs_per_sm: int  # split-K brings the grid near this many programs per SM; 0: no split
    swap_ab: bool = False  # "mm": y.T = w @ x.T, the weight tile as tl.dot's first operand
    join_codes: bool = False  # "mm", "dense": codes unpacked by joining positions (else one 3-D tensor)
    gpu: str | None = None  # a row for GPUs whose name holds this (None: any device)


@dataclass(frozen=True)
class KernelConfig:
    """One launch of the quantized matmul: which kernel and its tile, split and warps."""

    kernel: str  # "gemv" (M == 1, FMA), "mm" (tl.dot), "slices" (4-bit, tl.dot by code position), "wgmma" (wgmma.py) or "dense"
    block_m: int
    block_n: int
    block_k: int  # codes along the input dimension per iteration
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # "mm": output tiles grouped along M for L2 reuse
    join_codes: bool = False  # "mm": codes unpacked by joining positions (else one 3-D tensor)
    swap_ab: bool = False  # "mm": y.T = w @ x.T, the weight tile as tl.dot's first operand
    packed16: bool | None = None  # 4-bit codes unpacked by packed 16-bit arithmetic (not "wgmma"); None: wherever it runs


@dataclass(frozen=True)
class _Format:
    """How a QuantizedWeight's codes are stored, as the kernels read them."""

    code_bits: int  # 4 or 8
    magic: int  # xor'ed into a code: 2^23 + u (+ 128 for two's-complement bytes) as fp32 bits
    offset: float  # 2^23 + the code that stands for 0.0 (+ the zero point, when there are zero points)
    group_size: int
    words: torch.Tensor  # qweight viewed as int32 words: [out, in * code_bits / 32]


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    """CUDA device index's properties, asked once (launches ask on every call)."""
    return torch.cuda.get_device_properties(index)


def _device_properties(device: torch.device):
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any number (it only steers the split)
    return _device_properties(device).multi_processor_count


def _device_name(device: torch.device) -> str:
    """The CUDA device's name (a tile row's gpu is matched against it); empty off a GPU, where no
    row for a GPU applies."""
    return _device_properties(device).name if device.type == "cuda" else ""


def _capability(device: torch.device) -> tuple[int, int]:
    properties = _device_properties(device)
    return properties.major, properties.minor


def _format(qw: QuantizedWeight) -> _Format:
    """The kernels' view of qw, or ValueError when its storage is not one the kernels read."""
    out_features, in_features = qw.shape
    q = qw.qweight
    if qw.bits == 4:
        if q.dtype not in (torch.int32, torch.uint8):
            raise ValueError(f"4-bit codes are packed into int32 or uint8 words, got {q.dtype}")
        per_unit = 8 if q.dtype == torch.int32 else 2
        if tuple(q.shape) != (out_features, in_features // per_unit) or in_features % 8:
            raise ValueError(f"4-bit qweight {tuple(q.shape)} ({q.dtype}) does not hold a {out_features}x{in_features} weight in whole 32-bit words")
        magic, offset = _MAGIC, 8.0 if qw.zeros is None else 0.0  # symmetric codes are stored + 8
    elif qw.bits == 8:
        if q.dtype not in (torch.int8, torch.uint8):
            raise ValueError(f"8-bit codes are int8 or uint8, got {q.dtype}")
        if tuple(q.shape) != (out_features, in_features) or in_features % 4:
            raise ValueError(f"8-bit qweight {tuple(q.shape)} does not hold a {out_features}x{in_features} weight in whole 32-bit words")
        signed = q.dtype == torch.int8
        magic, offset = (_MAGIC | 0x80, 128.0) if signed else (_MAGIC, 0.0)
    else:
        raise ValueError(f"the kernels read 4- or 8-bit codes, got {qw.bits}")
    if in_features % qw.group_size or qw.scales.shape != (out_features, in_features // qw.group_size):
        raise ValueError(f"scales {tuple(qw.scales.shape)} do not give one scale per {qw.group_size} of {in_features} inputs")
    if q.dtype != torch.int32 or not q.is_contiguous():
        q = q.contiguous().view(torch.int32)
    return _Format(qw.bits, magic, _MAGIC_F + offset, qw.group_size, q)


def _block_k(in_features: int, largest: int, smallest: int = 32) -> int:
    """The largest power-of-two tile of codes from smallest to largest that divides the row (no
    masks along k); rows with no such divisor take `smallest` and masked loads."""
    block = largest
    while block > smallest and in_features % block:
        block //= 2
    return block


def _slices_take(fmt: _Format, dtype: torch.dtype, zeros: torch.Tensor | None, in_features: int) -> bool:
    """Whether the slices kernel reads this weight: 4-bit codes, 16-bit compute (its dots are not
    fp32-exact), whole zero points (if any) and at least one 128-code tile per row (tl.dot's 16
    words per code position)."""
    return (fmt.code_bits == 4 and dtype in (torch.bfloat16, torch.float16) and in_features >= 128
            and (zeros is None or not zeros.is_floating_point()))


def _wgmma_takes(fmt: _Format, dtype: torch.dtype, scales: torch.Tensor, zeros: torch.Tensor | None, in_features: int,
                 block_k: int, device: torch.device) -> bool:
    """Whether wgmma.py's kernel reads this weight here: Gluon, an sm_90 GPU (wgmma is Hopper's
    alone), 4-bit codes, 16-bit compute, k tiles of 64 or 128 inside one group, and operands TMA can bring
    (wgmma_tma_ready); the "wgmma" launch runs the mm kernel elsewhere."""
    return (gluon is not None and device.type == "cuda" and _capability(device) == (9, 0) and fmt.code_bits == 4
            and dtype in (torch.bfloat16, torch.float16) and block_k in (64, 128) and in_features % block_k == 0
            and fmt.group_size % block_k == 0 and wgmma_tma_ready(fmt.words, scales, zeros, fmt.group_size))


def _packed16(cfg: KernelConfig, fmt: _Format, dtype: torch.dtype, zeros: torch.Tensor | None, in_features: int,
              device: torch.device) -> bool:
    """Whether cfg's launch unpacks 4-bit codes by packed 16-bit arithmetic (unpack.py): where it
    runs, unless cfg.packed16 says otherwise. It runs with whole zero points on a GPU (inline PTX:
    not in the interpreter); the GEMV's f16x2 products (_nibble_dots) take any x, the tile kernels'
    16-bit weights (_packed_pairs) one scale per row and tile and a 16-bit compute dtype (bf16x2
    arithmetic from sm_90)."""
    runs = fmt.code_bits == 4 and device.type == "cuda" and (zeros is None or not zeros.is_floating_point())
    if cfg.kernel != "gemv":
        runs = runs and _scale_per_tile(in_features, fmt.group_size, cfg.block_k) and (
            dtype == torch.float16 or dtype == torch.bfloat16 and _capability(device) >= (9, 0))
    if cfg.packed16 and not runs:
        raise ValueError("packed16 takes 4-bit codes and whole zero points on a GPU (and, but for the gemv kernel, "
                         "one scale per tile and a 16-bit dtype)")
    return runs if cfg.packed16 is None else cfg.packed16


def _scale_per_tile(in_features: int, group_size: int, block_k: int) -> bool:
    """Whether every k tile lies in one group (one scale per row and tile); otherwise the kernels
    read a scale per word (a group always holds whole words)."""
    return group_size == in_features or group_size % block_k == 0


def pick_launch(tiles: tuple[LaunchTile, ...], m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The launch for an [m, k] @ [k, n] product: the first tile of the table that matches (a row
    for a GPU only on a device whose name holds it), its block_k halved until it divides k, block_n
    narrowed while the tiles leave SMs idle, and a split of k that brings the grid near the tile's
    programs per SM."""
    name = _device_name(device)
    tile = next((t for t in tiles if (t.max_m is None or m <= t.max_m) and n >= t.min_n
                 and (t.gpu is None or t.gpu in name)), None)
    if tile is None:
        raise ValueError(f"no tile of the table covers m={m}, n={n}")
    sms = _num_sms(device)
    block_n, block_k = tile.block_n, _block_k(k, tile.block_k)
    if tile.kernel == "slices":  # 16 words per code position at least: a row no such tile divides takes masked loads
        block_k = max(block_k, min(tile.block_k, 128))
    while block_n > tile.min_block_n and triton.cdiv(m, tile.block_m) * triton.cdiv(n, block_n) < sms:
        block_n //= 2
    split = 1
    if tile.programs_per_sm:
        tiles_mn = triton.cdiv(m, tile.block_m) * triton.cdiv(n, block_n)
        # The GEMV's splits may be one tile of k each; tl.dot's need a few to pipeline loads.
        split = _split(tiles_mn, k, block_k, tile.programs_per_sm * sms, min_tiles=1 if tile.kernel == "gemv" else 4)
    return KernelConfig(tile.kernel, tile.block_m, block_n, block_k, split, num_warps=tile.num_warps,
                        num_stages=tile.num_stages, join_codes=tile.join_codes, swap_ab=tile.swap_ab)


def distinct_launches(tiles: tuple[LaunchTile, ...], max_rows: int, n: int, k: int,
                      device: torch.device) -> list[tuple[int, KernelConfig]]:
    """Each launch pick_launch makes for [m, k] @ [k, n] products of 1..max_rows rows, with the
    fewest rows that take it (the kernels compile once per launch, whatever m is)."""
    first: dict[KernelConfig, int] = {}
    for m in range(1, max_rows + 1):
        first.setdefault(pick_launch(tiles, m, n, k, device), m)
    return [(m, config) for config, m in first.items()]


def compile_launches(qw: QuantizedWeight, bias: torch.Tensor | None, tiles: tuple[LaunchTile, ...],
                     max_rows: int) -> int:
    """Run every distinct launch of qw for 1..max_rows rows once, on zeros, so that Triton compiles
    them now: a first compile takes about a second, and mid-serving it stalls every request (H200,
    `bench throughput --quant int4`: four compiles inside the timed loop took 4.1 of its 8.8 s).
    The one-row GEMV also compiles taking silu(gate) * up (a down projection's, see _launch).
    Returns the launches run."""
    fmt = _format(qw)
    n, k = qw.shape
    device, dtype = qw.qweight.device, qw.scales.dtype
    launches = distinct_launches(tiles, max_rows, n, k, device)
    for m, config in launches:
        _launch(torch.zeros(m, k, dtype=dtype, device=device), qw, fmt, bias, config, None)
        if m == 1 and config.kernel == "gemv":
            _launch(torch.zeros(1, 2 * k, dtype=dtype, device=device), qw, fmt, bias, config, None, silu_mul=True)
    return len(launches) + sum(m == 1 and config.kernel == "gemv" for m, config in launches)


def _split(tiles: int, k: int, block_k: int, programs: int, min_tiles: int = 4) -> int:
    """Split-K factor that brings tiles * split near `programs`, each split a whole number of tiles
    of block_k (at most 16 splits, at least min_tiles tiles of k per split)."""
    split = 1
    while tiles * split * 2 <= programs and split < 16 and k // (block_k * split * 2) >= min_tiles:
        split *= 2
    return split


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for split-K's fix-up, one per output tile, kept per device (the
    kernels leave them at 0); a launch with more tiles gets a larger buffer, and the smaller ones
    stay allocated: a captured CUDA graph may still point at them."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return buffers[-1]


def _launch(x: torch.Tensor, qw: QuantizedWeight, fmt: _Format, bias: torch.Tensor | None, config: KernelConfig | None,
            pick: Callable[[int, int, int, int, int, torch.device], KernelConfig] | None,
            silu_mul: bool = False, rope: RopeTarget | None = None) -> torch.Tensor:
    """x @ dequantize(qw).T + bias with `config`, or (config None) the launch pick(m, n, k, code bits,
    group size, device) gives. silu_mul: x is one row [gate | up] of twice the weight's inputs, in
    the scales' dtype, and the product is with silu(gate) * up, taken by the GEMV as it loads x.
    rope: the GEMV of one row stores y as RoPE leaves it and k, v in the pages (rope_epilogue.py)."""
    out_features, in_features = qw.shape
    width = 2 * in_features if silu_mul else in_features
    if x.shape[-1] != width:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {in_features}"
                         + (" (twice that with silu_mul: gate and up)" if silu_mul else ""))
    dtype = qw.scales.dtype
    if silu_mul and (x.numel() != width or x.dtype != dtype):
        raise ValueError(f"silu_mul takes one row of x in the scales' dtype ({dtype}), got {tuple(x.shape)} {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, width).to(dtype)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_features, dtype=dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, out_features).to(x.dtype)
    scales = qw.scales if qw.scales.stride(-1) == 1 else qw.scales.contiguous()
    zeros = qw.zeros if qw.zeros is None or qw.zeros.stride(-1) == 1 else qw.zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    cfg = config or pick(m, out_features, in_features, fmt.code_bits, fmt.group_size, x.device)
    if cfg.kernel == "gemv" and m != 1:
        raise ValueError(f"the gemv kernel takes one row of x, got {m}")
    if (silu_mul or rope is not None) and cfg.kernel != "gemv":
        raise ValueError(f"silu_mul and rope are the gemv kernel's, not the {cfg.kernel} kernel's")
    if rope is not None and not rope_takes(rope, out_features, cfg.block_n):
        raise ValueError(f"rope: {out_features} rows of {rope.q_heads} + 2 x {rope.kv_heads} heads of {rope.head_dim} "
                         f"in tiles of {cfg.block_n} rows, pages {tuple(rope.k_pages.shape)}: not whole heads a tile, "
                         "or not the epilogue's layout")
    if cfg.block_k % (32 // fmt.code_bits) or (cfg.kernel == "mm" and cfg.block_k < 16):
        raise ValueError(f"block_k {cfg.block_k} is not whole {fmt.code_bits}-bit words (or under tl.dot's 16)")
    if cfg.kernel == "slices" and not _slices_take(fmt, dtype, zeros, in_features):
        cfg = KernelConfig("mm", cfg.block_m, cfg.block_n, min(cfg.block_k, 64), cfg.split_k, cfg.num_warps, cfg.num_stages)
    if cfg.kernel == "wgmma" and not _wgmma_takes(fmt, dtype, scales, zeros, in_features, cfg.block_k, x.device):
        # a tile the mm kernel computes right on sm_90 too (its 256-row, 8-warp swap_ab tile does not)
        cfg = KernelConfig("mm", min(cfg.block_m, 128), min(cfg.block_n, 128), 64, cfg.split_k, 4, 3, join_codes=True)
    if cfg.kernel == "slices" and cfg.block_k < 128:
        raise ValueError(f"the slices kernel takes block_k of at least 128 (16 words per code position), got {cfg.block_k}")
    packed16 = cfg.kernel != "wgmma" and _packed16(cfg, fmt, dtype, zeros, in_features, x.device)
    if cfg.kernel == "dense":  # one dequantizing pass over the weight, then cuBLAS (large m: compute-bound)
        weight = torch.empty(out_features, in_features, dtype=dtype, device=x.device)
        _dequant_kernel[(triton.cdiv(out_features, cfg.block_n), triton.cdiv(in_features, cfg.block_k))](
            fmt.words, scales, zeros if zeros is not None else scales, weight, out_features, in_features,
            fmt.words.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, weight.stride(0),
            GROUP=fmt.group_size, SCALE_PER_TILE=_scale_per_tile(in_features, fmt.group_size, cfg.block_k),
            CODE_BITS=fmt.code_bits, MAGIC=fmt.magic, OFFSET=fmt.offset, HAS_ZEROS=zeros is not None,
            FRACTIONAL_ZEROS=zeros is not None and zeros.is_floating_point(), EVEN_K=in_features % cfg.block_k == 0,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, JOIN_CODES=cfg.join_codes, PACKED16=packed16,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return F.linear(x2, weight, bias).reshape(*lead, out_features).to(x.dtype)
    k_per_split = triton.cdiv(triton.cdiv(in_features, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(in_features, k_per_split)
    part = torch.empty(split, m, out_features, dtype=torch.float32, device=x.device) if split > 1 else y
    has_zeros = zeros is not None
    consts = dict(
        GROUP=fmt.group_size, SCALE_PER_TILE=_scale_per_tile(in_features, fmt.group_size, cfg.block_k),
        CODE_BITS=fmt.code_bits, MAGIC=fmt.magic, OFFSET=fmt.offset, HAS_ZEROS=has_zeros,
        HAS_BIAS=bias is not None, EVEN_K=in_features % cfg.block_k == 0,
    )
    z_arg = zeros if has_zeros else scales
    b_arg = bias if bias is not None else scales
    z_stride = zeros.stride(0) if has_zeros else 0
    tiles = triton.cdiv(out_features, cfg.block_n) * (1 if cfg.kernel == "gemv" else triton.cdiv(m, cfg.block_m))
    # split-K: the last split of a tile adds the partials up, told by one zeroed counter per tile (and wgmma warpgroup)
    counters = _tile_counters(x.device, tiles * (cfg.num_warps // 4 if cfg.kernel == "wgmma" else 1)) if split > 1 else part
    if cfg.kernel == "gemv":
        grid = (tiles, split)
        gemv_consts = {k: v for k, v in consts.items() if k not in ("MAGIC", "OFFSET")}
        act = torch.empty(in_features, dtype=dtype, device=x.device) if silu_mul else y  # silu(gate) * up
        _qgemv_kernel[grid](
            x2, fmt.words, scales, z_arg, b_arg, y, part, counters, act,
            out_features, in_features, fmt.words.stride(0), scales.stride(0), z_stride, k_per_split,
            **gemv_consts, FLIP=fmt.magic & 0x80, CODE_OFFSET=fmt.offset - _MAGIC_F, SPLIT_K=split,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ONE_LOP3=x.device.type == "cuda", PACKED16=packed16,
            STAGES=cfg.num_stages, SILU_MUL=silu_mul, **rope_arguments(rope, y), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    elif cfg.kernel == "wgmma":
        wgmma_linear(x2, fmt.words, scales, zeros, bias, y, part, counters, k_per_split, split, fmt.group_size,
                     int(fmt.offset - _MAGIC_F), cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages)
    elif cfg.kernel == "slices":
        _qmm_slices_kernel[(tiles, split)](
            x2, fmt.words, scales, z_arg, b_arg, y, part, counters,
            m, out_features, in_features, x2.stride(0), fmt.words.stride(0), scales.stride(0), z_stride, y.stride(0),
            k_per_split, GROUP=fmt.group_size, SCALE_PER_TILE=consts["SCALE_PER_TILE"], CODE_OFFSET=fmt.offset - _MAGIC_F,
            HAS_ZEROS=has_zeros, HAS_BIAS=bias is not None, SPLIT_K=split, EVEN_K=consts["EVEN_K"],
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            PACKED16=packed16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        _qmm_kernel[(tiles, split)](
            x2, fmt.words, scales, z_arg, b_arg, y, part, counters,
            m, out_features, in_features, x2.stride(0), fmt.words.stride(0), scales.stride(0), z_stride, y.stride(0),
            k_per_split, **consts, FRACTIONAL_ZEROS=has_zeros and zeros.is_floating_point(), SPLIT_K=split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", JOIN_CODES=cfg.join_codes, SWAP_AB=cfg.swap_ab,
            PACKED16=packed16, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y.reshape(*lead, out_features).to(x.dtype)


