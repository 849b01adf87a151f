"""Conversions between quantized and float models (ALGORITHM.md: the server aggregates
de-quantized float weights, and each client binarizes the global float model with its new
assignment)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Union

import torch
from torch import nn

from .layers import bit_layers, check_width, is_width_list as _is_list

Tensor = torch.Tensor
_OWN = ("codes", "sign", "scale", "sink", "_extra_state")  # _extra_state: the bit-width


def bit_assignment(model: nn.Module) -> List[int]:
    """The bit-width of every bit-plane layer, in layer order."""
    return [m.bits for _, m in bit_layers(model)]


def float_state(model: nn.Module) -> Dict[str, Tensor]:
    """The state entries that stay float (BatchNorm, shortcuts, biases, a BitLinear's bias
    included): all but the bit-plane layers' own ``codes``, ``sign``, ``scale``, ``sink`` and
    ``_extra_state`` (the bit-width)."""
    own = {n for n, _ in bit_layers(model)}
    return {k: v for k, v in model.state_dict().items()
            if not (k.rpartition(".")[0] in own and k.rpartition(".")[2] in _OWN)}


def to_float_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The quantized model as the float model's state dict: ``<layer>.weight`` de-quantized
    (float32) for each bit-plane layer, every other entry (BatchNorm, shortcuts, biases) as is."""
    layers = dict(bit_layers(model))
    out: Dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf in _OWN:
            if leaf == "codes":
                out[f"{owner}.weight"] = layers[owner].float_weight()
            continue
        out[key] = value.detach().clone()
    return out


def load_float_state_dict(model: nn.Module, state: Mapping[str, Tensor], bits: Union[int, Sequence[int]]) -> nn.Module:
    """Load a float state dict into a quantized model, binarizing every bit-plane layer's
    ``<layer>.weight`` with its bit-width from ``bits`` (one int, or one per layer in layer
    order). Every key must be used and every entry present (``ValueError`` names the first
    problem). Returns ``model``."""
    layers = bit_layers(model)
    if not _is_list(bits):
        bits = [check_width(bits)] * len(layers)
    bits = [check_width(b, f"bits[{i}]") for i, b in enumerate(bits)]  # int() truncated 4.5 to 4
    if len(bits) != len(layers):
        raise ValueError(f"{len(bits)} bit-widths for {len(layers)} quantized layers")
    own = float_state(model)
    rest: Dict[str, Tensor] = {}
    used = set()
    for (name, layer), b in zip(layers, bits):
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"the state dict has no {key!r}")
        layer.load_float(state[key].float(), b)
        used.add(key)
    for key in own:
        if key not in state:
            raise ValueError(f"the state dict has no {key!r}")
        rest[key] = state[key]
        used.add(key)
    extra = sorted(set(state) - used)
    if extra:
        raise ValueError(f"unexpected keys in the state dict: {extra[:5]}")
    model.load_state_dict(rest, strict=False)
    return model
