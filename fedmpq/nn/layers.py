"""Bit-plane layers (ALGORITHM.md, "Local representation") and the activation quantizer.

A quantized layer of n weights at N bits keeps, between steps, only what the method needs:
``codes`` (uint8 magnitudes, one byte per weight), ``sign`` (a bitmap, bit set = negative),
``scale`` (one float32 parameter) and ``sink``: a zero-stride float32 parameter of the
weight's shape (4 bytes in all) whose ``.grad`` receives G = dL/dW in backward, from which
:class:`fedmpq.nn.BitPlaneOptimizer` forms the per-plane gradients in closed form. No float
planes, no float plane-gradients.
"""
from __future__ import annotations

import copy
import math
import operator
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fedmpq_kernels as fk

Tensor = torch.Tensor
_device_of = operator.attrgetter("device")


def check_width(bits, what: str = "bits", float_ok: bool = False) -> int:
    """A bit-width argument (an int, a NumPy integer or an integer 0-dim tensor) as an int in
    1..8 (or 16 with ``float_ok``); :func:`fedmpq_kernels.check_bits` raises naming ``what``
    (never truncates 4.5 to 4)."""
    if not isinstance(bits, (bool, int)) and hasattr(bits, "__index__"):
        try:
            bits = operator.index(bits)
        except TypeError:
            pass  # a float tensor: check_bits names its type
    return fk.check_bits(bits, what, float_ok)


def _size(v, name: str, low: int = 0) -> int:
    """A layer's size argument (features, channels, a kernel side): an int (or NumPy integer)
    >= ``low``, not a bool; TypeError / ValueError naming it, where torch said "zeros():
    argument 'size' ... must be tuple of ints" or "Dimension size must be non-negative"."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an int >= {low}, got {type(v).__name__}")
    v = operator.index(v)
    if v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v}")
    return v


def is_width_list(bits) -> bool:
    """Whether ``bits`` is one width per layer (a list, tuple, array or 1-D tensor)."""
    return hasattr(bits, "__len__") and not (isinstance(bits, Tensor) and bits.dim() == 0)


class _BitWeight(nn.Module):
    """The weight of a bit-plane layer: state, binarization and de-quantization."""

    def _init_weight(self, shape: Sequence[int], bits: int) -> None:
        n = math.prod(shape)
        self.weight_shape = tuple(int(s) for s in shape)
        self._bits = fk.check_bits(bits)
        self._dtype = None  # the dtype a .half() or .to(dtype) set: the weight is made in it (None: float32)
        self.register_buffer("codes", torch.zeros(n, dtype=torch.uint8))
        self.register_buffer("sign", torch.zeros(fk.bitmap_nbytes(n), dtype=torch.uint8))
        self.scale = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.sink = nn.Parameter(fk.sink_like(self.weight_shape))
        w = torch.empty(self.weight_shape)
        if n:  # torch warns that initializing a zero-element tensor is a no-op
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # torch's default init of the float layer
        self.load_float(w, bits)

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def bits(self) -> int:
        """N, the layer's bit-width (1..8). Set only with the codes and scale it belongs to
        (``load_float``, ``load_packed``, ``load_codes``, ``reduce_precision``, a state
        dict): alone it would re-read every code at another width (W = s q / (2^N - 1))."""
        return self._bits

    @bits.setter
    def bits(self, value) -> None:
        # before, `layer.bits = 2` on an 8-bit layer gave weights up to 85x its scale, unsaid
        raise AttributeError(f"{type(self).__name__}.bits is set with the layer's codes and scale, not alone (the "
                             "weights would change): load_float(w, bits) re-binarizes a float weight, "
                             "reduce_precision(theta) drops planes, load_packed / load_codes set all three")

    def plane_state(self):
        """(codes, sign, scale, sink): the layer's state tensors, read from the module's own
        dicts, where ``nn.Module.__getattr__`` would look each name up (~0.5 µs each; the
        optimizer reads the four of every layer at every step)."""
        b, p = self._buffers, self._parameters
        return b["codes"], b["sign"], p["scale"], p["sink"]

    @torch.no_grad()
    def load_float(self, w: Tensor, bits: int) -> None:
        """Binarize a float weight of this layer's shape into ``bits`` bits (1..8)."""
        bits = fk.check_bits(bits)
        if not isinstance(w, Tensor):  # a NumPy array was "has no attribute 'to'"
            raise TypeError(f"w must be a tensor, got {type(w).__name__}")
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not fit a layer of shape {self.weight_shape}")
        codes, sign, scale = fk.binarize(w.to(self.codes.device), bits)
        self.codes.copy_(codes)
        self.sign.copy_(sign)
        self.scale.copy_(scale)
        self._bits = bits

    @torch.no_grad()
    def load_codes(self, codes: Tensor, negative: Tensor, scale: float, bits: int) -> None:
        """Set the state directly: codes (n values < 2^bits), negative (bool, n; or integer
        0/1), scale."""
        if not isinstance(negative, Tensor) or negative.is_floating_point() or negative.is_complex():
            # the uint8 conversion took a float mask's 0.5 as "not negative"
            raise TypeError(f"negative must be a bool mask, got {getattr(negative, 'dtype', type(negative).__name__)}")
        if negative.numel() != self.numel:
            raise ValueError(f"expected {self.numel} signs, got {negative.numel()}")
        if negative.dtype != torch.bool and negative.numel() and not (0 <= int(negative.min()) and
                                                                      int(negative.max()) <= 1):
            raise ValueError("negative must be a bool mask (or hold 0 and 1 only)")
        self.load_packed(codes, fk.pack_codes(negative.reshape(-1).to(device=self.codes.device, dtype=torch.uint8), 1),
                         scale, bits)

    @torch.no_grad()
    def load_packed(self, codes: Tensor, sign: Tensor, scale: float, bits: int) -> None:
        """Set the state from codes (n uint8 values < 2^bits) and a sign bitmap as the wire
        carries it (``fedmpq_kernels.bitmap_nbytes(n)`` uint8 bytes, bit set = negative): the
        bitmap is this layer's own layout, so it is copied, not unpacked and packed again."""
        bits = fk.check_bits(bits)
        if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex():
            # the uint8 conversion truncated 3.7 to 3
            raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
        codes = codes.reshape(-1)
        if codes.numel() != self.numel:
            raise ValueError(f"expected {self.numel} codes, got {codes.numel()}")
        if not isinstance(sign, Tensor):
            raise TypeError(f"sign must be a uint8 tensor, got {type(sign).__name__}")
        if sign.dtype != torch.uint8 or sign.numel() != self.sign.numel():
            raise ValueError(f"expected a uint8 sign bitmap of {self.sign.numel()} bytes, got {sign.dtype} "
                             f"of {sign.numel()}")
        # checked before the uint8 conversion, which wrapped 300 to 44 and -1 to 255
        if codes.numel() and int(codes.max()) >= (1 << bits):
            raise ValueError(f"a code is >= 2^{bits}")
        if codes.numel() and codes.dtype != torch.uint8 and int(codes.min()) < 0:
            raise ValueError(f"a code is negative ({int(codes.min())})")
        codes = codes.to(device=self.codes.device, dtype=torch.uint8)
        try:
            scale = float(scale)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
            raise TypeError(f"scale must be a number or a one-element tensor, got {scale!r}"[:200]) from None
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")  # as binarize refuses NaN weights
        self.codes.copy_(codes)
        self.sign.copy_(sign.reshape(-1))
        self.scale.fill_(scale)
        self._bits = bits

    @torch.no_grad()
    def reduce_precision(self, theta: float) -> int:
        """FedMPQ's precision reduction after local training (ALGORITHM.md,
        :func:`fedmpq_kernels.precision_reduction`), threshold ``theta`` in percent, in place:
        the layer's codes, scale and bit-width. Returns the new bit-width."""
        bits, codes, scale = fk.precision_reduction(self.codes, self.scale.detach(), self._bits, theta)
        self.codes.copy_(codes)
        self.scale.copy_(scale)
        self._bits = bits
        return bits

    def quantized_weight(self) -> Tensor:
        """The effective weight ``s * sigma * q / (2^N - 1)`` (float32, the layer's shape),
        differentiable in ``scale`` and ``sink``. Inside a forward of a model under
        :func:`batch_weights`, the weight its pre-hook made for this layer (once)."""
        if not torch.compiler.is_compiling():
            made = self.__dict__.pop("_batched", None)  # (weight, grad mode it was made in)
            if made is not None and made[1] == torch.is_grad_enabled():
                return made[0]
        return fk.dequantize(self.codes, self.sign, self.scale, self._bits, self.sink)  # the field, as optim

    @torch.no_grad()
    def float_weight(self) -> Tensor:
        """The de-quantized weight, a plain float32 tensor of the layer's shape."""
        return fk.dequantize(self.codes, self.sign, self.scale.detach(), self._bits,
                             fk.sink_like(self.weight_shape, self.codes.device)).clone()

    def state_bytes(self) -> int:
        """Bytes this layer keeps between steps (codes, sign bitmap, scale, the sink's one float)."""
        return self.codes.numel() + self.sign.numel() + 4 + 4

    def _apply(self, fn, recurse=True):
        # Module.to()/cuda() copy parameters with the preserve-format rule, which would turn
        # the zero-stride sink into n floats: make it again on the new device.
        super()._apply(fn, recurse)
        scale = self.scale
        if scale.dtype != torch.float32:  # .half(), .double(): the kernels take a float32 scale (every
            # forward and step raised after one); the weight is made in that dtype instead, as an
            # nn.Linear's would be (.float() takes it back)
            self._dtype = scale.dtype
            scale.data = scale.data.float()
            if scale.grad is not None:
                scale.grad = scale.grad.float()
        elif fn(torch.zeros((), dtype=torch.float16)).dtype == torch.float32:  # .float(), .to(torch.float32)
            self._dtype = None
        old = self.sink
        # a sink of 0 or 1 elements keeps its zero strides under .half(), but not its float32 dtype
        if old.dtype != torch.float32 or (old.numel() and any(s != 0 for s in old.stride())):
            # frozen or not, with its gradient (in float32, the sink's dtype)
            self.sink = self._sink_as(old, None if old.grad is None else old.grad.float())
        return self

    def _sink_as(self, old: nn.Parameter, grad: Optional[Tensor]) -> nn.Parameter:
        """A sink made as the layer makes one, on ``old``'s device and frozen or not as ``old``
        is, with ``grad`` as its gradient: what a copy or a move of ``old`` keeps."""
        sink = nn.Parameter(fk.sink_like(self.weight_shape, old.device), requires_grad=old.requires_grad)
        if grad is not None:
            sink.grad = grad
        return sink

    def __setstate__(self, state) -> None:
        # a layer pickled whole before the width became read-only kept it as "bits"
        if "bits" in state and "_bits" not in state:
            state = dict(state)
            state["_bits"] = state.pop("bits")
        if "_dtype" not in state:  # pickled before a layer had one
            state = dict(state, _dtype=None)
        super().__setstate__(state)

    def __deepcopy__(self, memo):
        # Parameter.__deepcopy__ clones with the preserve-format rule, which would turn the
        # zero-stride sink into n floats (state_bytes() would still count 4): the copy gets a
        # sink made as the layer makes it (frozen or not, with a copy of its gradient), then
        # the rest of the layer (its __dict__) is deep-copied through the memo, as by default.
        sink = self._parameters.get("sink")
        if sink is not None and id(sink) not in memo:
            memo[id(sink)] = self._sink_as(sink, None if sink.grad is None else copy.deepcopy(sink.grad, memo))
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    # The bit-width travels in the state dict (``<layer>._extra_state``, an int64 0-dim tensor,
    # as code that treats every entry as a tensor expects): without it, codes of another width
    # load into a layer of the same shape without a size mismatch and give wrong weights.
    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.bits, dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        bits = fk.check_bits(_width_of(state), "the state dict's bit-width")
        codes = self.codes  # a load's codes are copied before this runs (and checked before that)
        if bits < self._bits and codes.numel() and (top := int(codes.max())) >= 1 << bits:
            raise ValueError(f"the state dict's bit-width {bits} does not fit the layer's codes: a code is {top}, "
                             f"codes must be < {1 << bits}")
        self._bits = bits

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        why = self._codes_misfit(state_dict, prefix)
        if why is not None:  # the layer is left as it was, as torch leaves a size-mismatched entry
            error_msgs.append(why)
            return
        # The sink holds no value (zero strides: copying into it raises), so a state dict's
        # sink is only checked for its shape, never copied.
        sink = state_dict.pop(prefix + "sink", None)
        if sink is None:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        if tuple(sink.shape) != self.weight_shape:
            error_msgs.append(f"size mismatch for {prefix}sink: copying a param with shape {tuple(sink.shape)} "
                              f"from checkpoint, the shape in current model is {self.weight_shape}.")
        params = self._parameters  # kept in its order (parameters() feeds the optimizers)
        self.__dict__["_parameters"] = {k: v for k, v in params.items() if k != "sink"}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            params.update(self.__dict__["_parameters"])  # what assign=True put there
            self.__dict__["_parameters"] = params

    def _codes_misfit(self, state_dict, prefix: str) -> Optional[str]:
        """Why the state dict's codes or sign cannot be this layer's, or None. torch's copy
        would convert codes or bitmap bytes of another dtype (3.7 -> 3, 300 -> 44), and codes
        of a wider layer (a state dict without ``_extra_state``, loaded with strict=False, or
        an edited one) would give weights beyond the scale: both loaded with no error."""
        sign = state_dict.get(prefix + "sign")
        if isinstance(sign, Tensor) and sign.numel() == self.sign.numel() and sign.dtype != torch.uint8:
            return f"{prefix}sign must be a uint8 bitmap, got {sign.dtype}"
        codes = state_dict.get(prefix + "codes")
        if codes is None and prefix + "_extra_state" in state_dict:
            # a width without codes (strict=False) re-read the layer's own codes at it: other weights
            extra = _width_of(state_dict[prefix + "_extra_state"])
            if type(extra) is int and 1 <= extra <= fk.MAX_BITS and extra != self._bits:
                return (f"{prefix}_extra_state sets the width to {extra} bits without {prefix}codes: the layer's "
                        f"{self._bits}-bit codes would be read at {extra} bits (load both, or neither)")
        if not isinstance(codes, Tensor) or codes.numel() != self.numel or not codes.numel():
            return None  # nothing to check here: missing, or torch's size mismatch names it
        if codes.dtype != torch.uint8:
            return f"{prefix}codes must be uint8 codes, got {codes.dtype}"
        bits, whose = self.bits, "the layer's bit-width"
        extra = _width_of(state_dict.get(prefix + "_extra_state"))
        if extra is not None:
            if isinstance(extra, bool) or not isinstance(extra, int) or not 1 <= extra <= fk.MAX_BITS:
                return None  # set_extra_state refuses it, naming the problem
            bits, whose = extra, "the state dict's bit-width"
        top = int(codes.max())
        if top >= 1 << bits:
            return f"{prefix}codes do not fit in {bits} bits ({whose}): a code is {top}, codes must be < {1 << bits}"
        return None


def _width_of(state):
    """A state dict's ``_extra_state`` as the width it holds: an integer one-element tensor as
    its int, anything else as it is (for check_bits to name)."""
    if isinstance(state, Tensor) and state.numel() == 1 and not (state.is_floating_point() or state.is_complex()):
        return state.item()
    return state


class BitConv2d(_BitWeight):
    """A conv2d whose weight is a bit-plane weight of ``bits`` bits (no bias: BatchNorm follows)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bits: int = 8):
        """kernel_size: an int or (height, width), as ``nn.Conv2d``; stride and padding as
        ``F.conv2d`` takes them (an int or a pair)."""
        super().__init__()
        in_channels, out_channels = _size(in_channels, "in_channels"), _size(out_channels, "out_channels")
        if hasattr(kernel_size, "__index__") and not isinstance(kernel_size, bool):  # an int, a NumPy integer
            kernel_size = operator.index(kernel_size)
            ks = (kernel_size, kernel_size)
        else:
            ks = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else ()
        if len(ks) != 2 or not all(hasattr(k, "__index__") and not isinstance(k, bool) and k >= 1 for k in ks):
            raise ValueError(f"kernel_size must be an int >= 1 or a pair of them, got {kernel_size!r}")
        ks = tuple(map(operator.index, ks))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self._init_weight((out_channels, in_channels, *ks), bits)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        if self._dtype is not None:  # a model in half (.half()): the weight in its dtype
            w = w.to(self._dtype)
        return F.conv2d(x, w, None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.bits}")


class BitLinear(_BitWeight):
    """A linear layer whose weight is a bit-plane weight; the bias stays float
    (**deviation**: the authors keep it as bit planes too; ALGORITHM.md)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 8):
        super().__init__()
        in_features, out_features = _size(in_features, "in_features"), _size(out_features, "out_features")
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bits)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0  # as nn.Linear
            self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight()
        if self._dtype is not None:
            w = w.to(self._dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}"


class ActQuant(nn.Module):
    """ReLU6 fused with the dynamic-scale activation quantizer of ``bits`` bits (4 on
    clients, 16 for the server's evaluation); ``bits=None`` is a plain ReLU (float models)."""

    def __init__(self, bits: Optional[int] = 4):
        super().__init__()
        self.bits = None if bits is None else check_width(bits, "bits", float_ok=True)  # int() truncated 4.5

    def forward(self, x: Tensor) -> Tensor:
        if self.bits is None:
            return F.relu(x)
        return fk.relu6_fake_quant(x, self.bits)

    def extra_repr(self) -> str:
        return "relu" if self.bits is None else f"relu6, bits={self.bits}"


class BatchedWeights:
    """What :func:`batch_weights` installed on a model; :meth:`remove` takes it off."""

    def __init__(self, handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BatchedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# The hooks are objects, not closures: a model with them pickles (torch.save(model)), and a
# deepcopy of it gets hooks over its own layers (deepcopy maps the layer list with the model).
class _MakeWeights:
    """Forward pre-hook: every layer's weight in one dequantize_layers call, left with the layer."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, module, args) -> None:
        layers = self.layers
        if not layers or torch.compiler.is_compiling():
            return
        codes, sign, scale, sink = zip(*[m.plane_state() for m in layers])  # read once (see plane_state)
        if len(set(map(_device_of, codes))) != 1:
            return
        ws = fk.dequantize_layers(codes, sign, scale, [m._bits for m in layers], sink)
        mode = torch.is_grad_enabled()
        for m, w in zip(layers, ws):
            m.__dict__["_batched"] = (w, mode)


class _DropWeights:
    """Forward hook (also when the forward raised): drops the weights no layer took."""

    def __init__(self, make: _MakeWeights):
        self.make = make

    def __call__(self, module, args, out) -> None:
        if torch.compiler.is_compiling():
            return
        for m in self.make.layers:
            m.__dict__.pop("_batched", None)


def batch_weights(model: nn.Module) -> BatchedWeights:
    """Make every bit-plane layer's weight in one call at the start of each forward of
    ``model`` (:func:`fedmpq_kernels.dequantize_layers`: one autograd node for all of them)
    instead of one :func:`fedmpq_kernels.dequantize` per layer: the same weights and
    gradients, bit for bit, at a fraction of the host cost (a ResNet-20 step makes 20 such
    calls forward and 20 backward; on a GPU each is host time the kernels wait on, and on
    CUDA the one call is one launch each way instead of 20).

    A forward pre-hook makes the weights, in the grad mode the forward is called in, and each
    layer takes its own once; a forward hook drops any left unused, also when the forward
    raises. A layer called again in the same forward, called in another grad mode, or not
    among the model's layers when this was called, de-quantizes its weight itself. Not under
    ``torch.compile`` (the compiled graph de-quantizes per layer as before), and not for
    layers on several devices. The model still pickles, and a deepcopy keeps the hooks, over
    its own layers. On a model that has them already, it adds nothing and its handle removes
    nothing (so a trainer may call it on a model its caller set up the same way).

    Returns:
        a :class:`BatchedWeights` (``.remove()``, or use it as a context manager).
    """
    _check_module(model)
    if any(isinstance(h, _MakeWeights) for h in model._forward_pre_hooks.values()):
        return BatchedWeights([])  # already on (the caller's own): once is enough, and it stays
    make = _MakeWeights([m for _, m in bit_layers(model)])
    return BatchedWeights([model.register_forward_pre_hook(make),
                           model.register_forward_hook(_DropWeights(make), always_call=True)])


def bit_layers(model: nn.Module):
    """(name, layer) of every bit-plane layer of ``model``, in module order (the layer
    index l of ALGORITHM.md). ``TypeError`` for a ``model`` that is not a module."""
    _check_module(model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BitWeight)]


def _check_module(model) -> None:
    """A model argument is an ``nn.Module`` (anything else was "'NoneType' object has no
    attribute 'named_modules'", from every function that takes a model)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

