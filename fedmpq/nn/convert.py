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


def _every_name(model: nn.Module) -> Dict[str, nn.Module]:
    """Every name of every bit-plane layer, a layer shared by two attributes (tied) under
    both, as ``state_dict()`` lists its entries (bit_layers names it once)."""
    own = {id(m) for _, m in bit_layers(model)}  # (bit_layers checks model)
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if id(m) in own}


def float_state(model: nn.Module) -> Dict[str, Tensor]:
    """The state entries that stay float (BatchNorm, shortcuts, biases, a BitLinear's bias
    included): all but the bit-plane layers' own ``codes``, ``sign``, ``scale``, ``sink`` and
    ``_extra_state`` (the bit-width), under every name a tied layer has."""
    own = _every_name(model)
    return {k: v for k, v in model.state_dict().items()
            if not (k.rpartition(".")[0] in own and k.rpartition(".")[2] in _OWN)}


def to_float_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The quantized model as the float model's state dict: ``<layer>.weight`` de-quantized
    (float32) for each bit-plane layer (under each of a tied layer's names, as a float model's
    state dict lists a tied weight), every other entry (BatchNorm, shortcuts, biases) as is."""
    layers = _every_name(model)
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
    problem, before any layer is loaded; ``TypeError`` for a ``state`` that is not a mapping
    of tensors). Returns ``model``."""
    layers = bit_layers(model)
    if not isinstance(state, Mapping):  # None was "argument of type 'NoneType' is not iterable"
        raise TypeError(f"state must be a mapping of names to tensors, got {type(state).__name__}")
    if not _is_list(bits):
        bits = [check_width(bits)] * len(layers)
    bits = [check_width(b, f"bits[{i}]") for i, b in enumerate(bits)]  # int() truncated 4.5 to 4
    if len(bits) != len(layers):
        raise ValueError(f"{len(bits)} bit-widths for {len(layers)} quantized layers")
    weights = [f"{name}.weight" for name, _ in layers]
    # a tied layer's other names: its weight there is the same layer's (as torch loads a tied
    # parameter, the entry listed last is the one it holds)
    first = {id(layer): i for i, (_, layer) in reversed(list(enumerate(layers)))}
    aliases = [(f"{n}.weight", first[id(m)]) for n, m in _every_name(model).items() if f"{n}.weight" not in weights]
    own = list(float_state(model))
    # every key checked before any layer is binarized: a missing one used to leave the layers
    # before it loaded
    for key in weights + [k for k, _ in aliases] + own:
        if key not in state:
            raise ValueError(f"the state dict has no {key!r}")
        if not isinstance(state[key], Tensor):  # a NumPy array was "has no attribute 'float'"
            raise TypeError(f"the state dict's {key!r} must be a tensor, got {type(state[key]).__name__}")
    for key, (_, layer) in [*zip(weights, layers), *((k, layers[i]) for k, i in aliases)]:
        if tuple(state[key].shape) != layer.weight_shape:
            raise ValueError(f"the state dict's {key!r} has shape {tuple(state[key].shape)}, the layer "
                             f"{layer.weight_shape}")
    extra = sorted(set(state) - set(weights) - {k for k, _ in aliases} - set(own))
    if extra:
        raise ValueError(f"unexpected keys in the state dict: {extra[:5]}")
    src = dict(zip(weights, weights))
    for key, i in aliases:  # the name listed last in the state dict wins, as in torch
        if list(state).index(key) > list(state).index(src[weights[i]]):
            src[weights[i]] = key
    for key, (_, layer), b in zip(weights, layers, bits):
        layer.load_float(state[src[key]].float(), b)
    model.load_state_dict({key: state[key] for key in own}, strict=False)
    return model
