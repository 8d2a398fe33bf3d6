"""How many bytes a quantized weight occupies: the one formula behind `vibee explain`'s figures,
which the generated tests check against the buffers a generated QuantLinear really holds."""

from __future__ import annotations


def quantized_weight_bytes(out_features: int, in_features: int, *, bits: int, group_size: int, scale_bytes: int,
                           zero_point_bytes: int) -> int:
    """Bytes of a [out, in] weight as codes (bits each, packed with no padding), one scale per group
    of group_size inputs (-1: per output row) and, when zero_point_bytes, one zero point per group."""
    groups = out_features * (1 if group_size == -1 else in_features // group_size)
    return out_features * in_features * bits // 8 + groups * (scale_bytes + zero_point_bytes)
