"""Bit-plane training: binarize, dequantize (+ backward), plane popcounts, the group lasso,
the fused optimizer step with re-quantization, precision reduction. Math: ``reference.py``."""
from .ops import (binarize, bitplane_step, bitplane_step_layers, dequantize, dequantize_layers, group_lasso,
                  plane_popcounts, plane_popcounts_layers, precision_reduction, sink_like, step_key, step_keys, uniform)

__all__ = ["binarize", "dequantize", "dequantize_layers", "sink_like", "plane_popcounts", "plane_popcounts_layers", "group_lasso",
           "bitplane_step", "bitplane_step_layers", "precision_reduction", "step_key", "step_keys", "uniform"]
