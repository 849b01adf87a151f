"""The models: CIFAR-style ResNets (``resnet20``, ``resnet44``) and a small CNN for 28x28
(Fashion-MNIST) and 8x8 (scikit-learn digits) inputs, each float or quantized.

Quantized form (ALGORITHM.md, "Setting" and "Activations"): every 3x3 conv (the stem's
included) and the classifier are bit-plane layers (``float_classifier=True`` keeps the
classifier a float ``nn.Linear``: a deviation, DESIGN.md); BatchNorm, 1x1 shortcut convs and biases
stay float; both activations of every basic block are ReLU6 + the ``act_bits`` quantizer,
the stem's is a plain ReLU. Float form: the same modules with float weights, plain ReLUs
(``act_bits=None``) or ReLU6 + an ``act_bits`` quantizer (16 for the server's evaluation).
State-dict names of the float form are those of :func:`fedmpq.layouts.cifar_resnet`.

``channels_last=True`` runs a model's activations channels-last (its forward converts the
input; convolutions, BatchNorm and the activation quantizer keep that layout): ResNet-20's
training step on the CPU is 13-23 % faster so, the small CNN's on 28x28 images 14 %, on 8x8
ones 15 % slower (docs/BENCHMARKS.md). The parameters and the state dict are the same either
way.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ActQuant, BitConv2d, BitLinear, check_width, is_width_list as _is_list

Bits = Union[int, Sequence[int]]


class _Factory:
    """Makes the layers of one model, float or bit-plane; bit-widths per quantized layer in
    creation order (an int: the same for all). ``float_classifier``: the quantized model's
    classifier is a float ``nn.Linear`` and takes no bit-width."""

    def __init__(self, quantized: bool, bits: Bits, act_bits: Optional[int], float_classifier: bool = False):
        if not isinstance(float_classifier, bool):
            raise TypeError(f"float_classifier must be a bool, got {type(float_classifier).__name__}")
        self.quantized = quantized
        self.float_classifier = float_classifier
        self.bits = bits
        # named here: ActQuant's own check says "bits"
        self.act_bits = None if act_bits is None else check_width(act_bits, "act_bits", float_ok=True)
        self.count = 0

    def _next_bits(self) -> int:
        if not _is_list(self.bits):
            b = check_width(self.bits)
        else:
            if self.count >= len(self.bits):
                raise ValueError(f"{len(self.bits)} bit-widths given, the model has more quantized layers")
            b = check_width(self.bits[self.count], f"bits[{self.count}]")  # int() truncated 4.5 to 4
        self.count += 1
        return b

    def conv3x3(self, cin: int, cout: int, stride: int = 1) -> nn.Module:
        if self.quantized:
            return BitConv2d(cin, cout, 3, stride, 1, bits=self._next_bits())
        self.count += 1
        return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)

    def linear(self, cin: int, cout: int) -> nn.Module:
        if self.quantized and not self.float_classifier:
            return BitLinear(cin, cout, bits=self._next_bits())
        if not self.quantized:
            self.count += 1
        return nn.Linear(cin, cout)

    def act(self) -> nn.Module:
        return ActQuant(self.act_bits)

    def done(self) -> None:
        if _is_list(self.bits) and self.quantized and self.count != len(self.bits):
            raise ValueError(f"{len(self.bits)} bit-widths given for {self.count} quantized layers")


class BasicBlock(nn.Module):
    def __init__(self, f: _Factory, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = f.conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = f.act()
        self.conv2 = f.conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = f.act()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth 6k+2 for 32x32 inputs: 16/32/64 channels, 3 stages of k blocks."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, quantized: bool = False,
                 bits: Bits = 8, act_bits: Optional[int] = None, float_classifier: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = _check_channels_last(channels_last)
        if not _is_int(depth) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6k + 2 >= 8, got {depth!r}")
        depth = int(depth)
        num_classes, in_channels = _check_arch(num_classes, in_channels, quantized)
        if quantized and act_bits is None:
            act_bits = 4
        f = _Factory(quantized, bits, act_bits, float_classifier)
        k = (depth - 2) // 6
        self.conv1 = f.conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for stage, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            blocks = []
            for b in range(k):
                blocks.append(BasicBlock(f, cin, cout, stride if b == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = f.linear(64, num_classes)
        f.done()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(_input(self, x))))  # the stem: plain ReLU, not quantized
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class SmallCNN(nn.Module):
    """conv3x3(16)-BN-act-maxpool, conv3x3(32)-BN-act-maxpool, conv3x3(64)-BN-act, global
    average pooling, linear: for 28x28 (Fashion-MNIST) or 8x8 (digits) single-channel images
    (``image_size``). Four quantized layers (three with ``float_classifier``). The classifier
    sees 64 pooled features, as in the CIFAR ResNets: a wide classifier (a flattened feature
    map) gives its scale a gradient summed over many thousands of weights, which SGD at the
    paper's learning rates blows up."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, quantized: bool = False,
                 bits: Bits = 8, act_bits: Optional[int] = None, float_classifier: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.channels_last = _check_channels_last(channels_last)
        num_classes, in_channels = _check_arch(num_classes, in_channels, quantized)
        if not _is_int(image_size):  # '<' not supported ... else
            raise TypeError(f"image_size must be an int, a multiple of 4 (two 2x2 poolings), got "
                            f"{type(image_size).__name__}")
        image_size = int(image_size)
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x2 poolings), got {image_size}")
        if quantized and act_bits is None:
            act_bits = 4
        f = _Factory(quantized, bits, act_bits, float_classifier)
        self.conv1 = f.conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = f.act()
        self.conv2 = f.conv3x3(16, 32)
        self.bn2 = nn.BatchNorm2d(32)
        self.act2 = f.act()
        self.conv3 = f.conv3x3(32, 64)
        self.bn3 = nn.BatchNorm2d(64)
        self.act3 = f.act()
        self.linear = f.linear(64, num_classes)
        f.done()

    def forward(self, x):
        out = F.max_pool2d(self.act1(self.bn1(self.conv1(_input(self, x)))), 2)
        out = F.max_pool2d(self.act2(self.bn2(self.conv2(out))), 2)
        out = self.act3(self.bn3(self.conv3(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _is_int(value) -> bool:
    """Any integer, NumPy's too (a sweep's np.arange gives them), never a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _input(model: nn.Module, x):
    """x as ``model`` computes on it: channels-last when the model is (no copy when x already
    is; a 3-d input as it is, the layout naming no 3-d form)."""
    return x.to(memory_format=torch.channels_last) if model.channels_last and x.dim() == 4 else x


def _check_channels_last(channels_last: bool) -> bool:
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    return channels_last


def _check_arch(num_classes: int, in_channels: int, quantized: bool):
    """The checked ``(num_classes, in_channels)`` as Python ints; ``quantized`` a bool (a
    string such as "no" was taken as true)."""
    if not isinstance(quantized, bool):
        raise TypeError(f"quantized must be a bool, got {type(quantized).__name__}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not _is_int(in_channels) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    return int(num_classes), int(in_channels)


def resnet20(**kw) -> CifarResNet:
    """ResNet-20 (19 quantizable layers + classifier = 20 quantized layers when quantized, 19
    with ``float_classifier``)."""
    return CifarResNet(depth=20, **kw)


def resnet44(**kw) -> CifarResNet:
    return CifarResNet(depth=44, **kw)


def small_cnn(**kw) -> SmallCNN:
    return SmallCNN(**kw)


MODELS = {"resnet20": resnet20, "resnet44": resnet44, "small_cnn": small_cnn}


def build(name: str, **kw) -> nn.Module:
    """A model by name (``resnet20``, ``resnet44``, ``small_cnn``) with its keyword
    arguments (``num_classes``, ``in_channels``, ``quantized``, ``bits``, ``act_bits``,
    ``float_classifier``, ``channels_last``, ``image_size`` for the CNN)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name](**kw)
