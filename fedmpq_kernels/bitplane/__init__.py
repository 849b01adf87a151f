"""Bit-plane training: binarize, dequantize (+ backward), plane popcounts, the group lasso,
the fused optimizer step with re-quantization, precision reduction. Math: ``reference.py``."""
from .ops import (binarize, bitplane_step, bitplane_steps, dequantize, group_lasso, plane_popcounts,
                  precision_reduction, sink_like, step_key, step_keys, uniform)

__all__ = ["binarize", "dequantize", "sink_like", "plane_popcounts", "group_lasso", "bitplane_step",
           "bitplane_steps",
           "precision_reduction", "step_key", "step_keys", "uniform"]
