"""Bit-plane packing: b-bit codes <-> bit planes, sign maps, and the server's fused
de-quantize-and-accumulate. The layout is stated in :mod:`.reference`; the schemas and
public functions in :mod:`.ops`."""
from ._common import check_packed
from .ops import dequant_accumulate, dequant_accumulate_layers, layer_coefs, pack_codes, unpack_codes

__all__ = ["pack_codes", "check_packed", "unpack_codes", "dequant_accumulate", "dequant_accumulate_layers", "layer_coefs"]
