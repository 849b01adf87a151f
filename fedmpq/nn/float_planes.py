"""The slow float-plane reference of the authors' method: the oracle that the fidelity tests and
the ``float-planes-<N>bit`` benchmarks compare :mod:`fedmpq.nn` against.

It keeps every quantized layer the way the authors' code does (github.com/CityChan/Federated-
Mixed-Precision-Quantization, ``models/bit.py``, ``QuantOptimizer.py``; written fresh here, not
copied): the bit planes as a float32 tensor, the sign as a float tensor, the scale as a float
parameter, and trains them with autograd plus the authors' plane optimizer. Speed does not
matter beyond being vectorized over the elements; what matters is that it states the method in
the authors' own float form, so that our packed codes + fused step (:mod:`fedmpq_kernels.bitplane`)
can be checked against it.

A layer of weight shape S (n = prod(S) weights) at N bits
--------------------------------------------------------
* ``planes``: float32 Parameter of shape (*S, N), plane i = ``planes[..., i]`` (i = 0 the MSB),
  values 0.0 / 1.0 between steps (real-valued only inside a step, before re-quantization).
* ``sign``: float32 buffer of shape S, +1.0 / -1.0 (sigma).
* ``scale``: float32 0-dim Parameter, s.
* ``exps``: float32 (N,), 2^(N-1-i) / (2^N - 1) (computed in float64, rounded once, as the authors).
* forward: ``v = sign * sum_i planes[..., i] * exps[i]``; ``W = bit_ste(v, N) * scale`` with
  ``bit_ste``: clamp to [-1, 1], ``round(|v| * L) / L * sign(v)`` (L = 2^N - 1), identity gradient.
  Autograd then gives the plane gradients ``dL/dB_ij = ((G_j * s) * sigma_j) * exps_i`` and
  ``dL/ds = sum_j G_j * bit_ste(v)_j``.
* regularizer (group lasso, ALGORITHM.md "Local objective"), with autograd on the planes:
  ``R / T = sum_l n_l * N_l * sum_i sqrt(1e-8 + sum_j B_ij^2) / T``, T the model's quantized
  weights. :class:`FloatPlaneOptimizer` adds ``lam * dR/T / dB`` to the planes' gradients at the
  start of its step (the same numbers as adding ``lam * R / T`` to the loss, as the authors do:
  the two contributions meet in one float32 addition either way), so a training loop calls
  ``loss = CE; loss.backward(); opt.step()`` for both implementations.

The optimizer step of one layer (authors' ``QuantOptimizer.step`` + ``quant()``)
-------------------------------------------------------------------------------
1. ``d = mu * buf + g`` (buf the last step's Delta; the first step of a round: d = g).
2. ``g_s = max|d| / L``.
3. ``x = |d| / g_s * lr``; ``u = 2^round(log2 x) * 2^(N-1-i)`` (torch.log2, torch.round: the
   authors' ``PowerOfTwo``); ``e = log2 u``. 0 <= e <= N: ``Delta = u * g_s * sign(d)``, with
   sign(0) = -1; e < 0: ``p += u`` (summed over the planes in order 0..N-1); e > N: nothing.
4. ``p`` clamped to [0, 1]; hit where ``u_j < p_j`` with ``u_j`` from **our counter-based
   generator** (``fedmpq_kernels.uniform(step_key(seed, step, layer), n)``, element j = the
   flat index of the weight) instead of ``torch.distributions.Bernoulli``, so both
   implementations draw the same numbers; a hit adds ``g_s * sign(d of the MSB plane)`` to the
   LSB plane's Delta.
5. ``B <- B - lr * Delta``;  buf <- Delta (the authors' buffer keeps the update just applied).
6. re-quantization (``quant()``): ``v = sum_i B_i * exps_i``; ``q = round(v * L)``; planes from
   floor division of q by 2^(N-1-i), MSB first.
Then the float parameters (scale, BatchNorm, biases, shortcuts: :func:`float_parameters`) take
``torch.optim.SGD`` with momentum and no weight decay, built and stepped by the caller after
this optimizer, as with ours (:class:`fedmpq.nn.BitPlaneOptimizer` and
:func:`fedmpq.nn.float_parameters`). The plane step needs no scale (the gradient already holds
it), so the order matches ours: every layer's plane step, then SGD.

Where it differs from the authors' code (exactly our documented deviations, ALGORITHM.md)
-----------------------------------------------------------------------------------------
* the Bernoulli draws come from our counter-based generator (above);
* re-quantization: a negative q is folded into the sign (sigma <- -sigma, q <- -q) and q is
  saturated at L, so the planes stay bits (the authors' planes can leave {0, 1});
* precision reduction (:meth:`FloatPlaneModel.precision_reduction`): the MSB side drops planes
  one at a time with saturation on the *current* planes (``B_lower <- min(B_lower + B_msb, 1)``,
  i.e. q <- min(q, 2^(N-1) - 1)) and recounts after every drop; the authors merge the dropped
  plane into their *original* lower planes and keep the counts taken before the loop;
* biases stay float (the authors keep the classifier's bias as bit planes);
* edge cases the authors' code turns into NaN: g_s = 0 makes no update (buffer <- 0), a
  non-finite g_s or lr * g_s skips the layer's step; as :func:`fedmpq_kernels.bitplane_step`.
Float rounding differs from our fused step (e.g. ``(q / L) * s`` against ``q * (s / L)``,
``torch.log2`` against our exact bit test near sqrt 2, the float-plane sum before ``round``, a
G near float32 underflow whose product is 0 on one side and not the other), so results agree
except for values within float rounding of a decision boundary. Two more float differences
with our reference, kept here as the authors have them: an x below 2^-100 still adds its tiny
2^e to p (ours ignores it: a hit then needs a draw of exactly 0, probability 2^-24), and the
scale gradient is torch's float32 sum (ours accumulates in float64; with cancellation the two
can differ in the first digits, so trajectories that each compute their own scale gradient
drift apart: compare them with the same gradients, as ``tests/fedmpq/test_fidelity.py`` does).

Usage::

    twin = FloatPlaneModel.from_quantized(qmodel)        # qmodel untouched
    opt = FloatPlaneOptimizer(twin, lr=0.1, momentum=0.9, lam=1e-3, seed=0)
    sgd = torch.optim.SGD(float_parameters(twin), lr=0.1, momentum=0.9)
    F.cross_entropy(twin(x), y).backward(); opt.step(); sgd.step()   # planes first, then SGD
    opt.zero_grad(); sgd.zero_grad()
    layer = twin.layers()[0]; layer.codes(), layer.negative(), layer.scale   # uint8, bool, float32
    new_bits = twin.precision_reduction(2.0)             # then build a new optimizer
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedmpq_kernels as fk

from .layers import BitConv2d, BitLinear, _check_module, bit_layers
from .optim import check_settings

Tensor = torch.Tensor

EPS = 1e-8

__all__ = ["FloatPlaneConv2d", "FloatPlaneLinear", "FloatPlaneModel", "FloatPlaneOptimizer", "bit_ste",
           "float_parameters", "float_plane_layers"]


class _BitSTE(torch.autograd.Function):
    """The authors' ``bit_STE``: clamp to [-1, 1], round to N bits, identity gradient."""

    @staticmethod
    def forward(ctx, w: Tensor, bits: int) -> Tensor:
        w = torch.clamp(w, -1.0, 1.0)
        step = 2 ** bits - 1
        return torch.round(torch.abs(w) * step) / step * torch.sign(w)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def bit_ste(w: Tensor, bits: int) -> Tensor:
    """``round(|clamp(w, -1, 1)| * L) / L * sign(w)`` (L = 2^bits - 1), gradient passed unchanged."""
    return _BitSTE.apply(w, bits)


def _exps(bits: int, device=None) -> Tensor:
    """2^(N-1-i) / (2^N - 1) for i = 0..N-1: float64 division, one rounding to float32."""
    ex = np.arange(bits - 1, -1, -1)
    return torch.tensor((2.0 ** ex) / (2 ** bits - 1), dtype=torch.float64).float().to(device)


def _planes_of(q: Tensor, bits: int) -> Tensor:
    """Float planes (..., N) of non-negative integer-valued float codes q, by floor division
    (the authors' ``quant()``/``ini2bit`` loop)."""
    rest = q.clone()
    planes = []
    for i in range(bits):
        ex = float(2 ** (bits - 1 - i))
        b = torch.floor(rest / ex)
        planes.append(b)
        rest = rest - b * ex
    return torch.stack(planes, dim=-1)


class _FloatPlaneWeight(nn.Module):
    """Float planes (*S, N), float sign S, scale: the authors' weight (module docstring)."""

    def _init_state(self, layer, weight_shape) -> None:
        self.weight_shape = tuple(weight_shape)
        self.bits = layer.bits
        n = layer.numel
        codes = layer.codes.detach().reshape(self.weight_shape).float()
        negative = fk.unpack_codes(layer.sign, 1, n).reshape(self.weight_shape).bool()
        self.planes = nn.Parameter(_planes_of(codes, self.bits))
        self.register_buffer("sign", torch.where(negative, -1.0, 1.0).to(torch.float32))
        self.scale = nn.Parameter(layer.scale.detach().clone().reshape(()).float())
        self.register_buffer("exps", _exps(self.bits, codes.device), persistent=False)

    @property
    def numel(self) -> int:
        return self.sign.numel()

    def weight(self) -> Tensor:
        """W = bit_ste(sign * sum_i B_i * exps_i) * scale, float32 of the layer's shape,
        differentiable in the planes and the scale."""
        v = torch.sum(self.planes * self.exps, dim=-1) * self.sign
        return bit_ste(v, self.bits) * self.scale

    def group_lasso(self) -> Tensor:
        """n * N * sum_i sqrt(1e-8 + sum_j B_ij^2), float32 0-dim, differentiable (authors' L1reg)."""
        sq = torch.sum(self.planes.reshape(-1, self.bits) ** 2, dim=0)
        return torch.sum(torch.sqrt(EPS + sq)) * float(self.numel * self.bits)

    # -- accessors to compare with the packed layers --------------------------------------
    @torch.no_grad()
    def codes(self) -> Tensor:
        """q_j = sum_i B_ij * 2^(N-1-i), uint8 (n,) (the planes are bits between steps)."""
        w = torch.tensor([float(2 ** (self.bits - 1 - i)) for i in range(self.bits)], device=self.planes.device)
        return torch.round(torch.sum(self.planes * w, dim=-1)).reshape(-1).to(torch.uint8)

    @torch.no_grad()
    def negative(self) -> Tensor:
        """sigma_j = -1, bool (n,)."""
        return (self.sign < 0).reshape(-1)

    @torch.no_grad()
    def float_weight(self) -> Tensor:
        return self.weight().detach().clone()

    # -- precision reduction (ALGORITHM.md, with our sequential saturation) -----------------
    def _fractions(self) -> List[float]:
        p = self.planes.detach().reshape(-1, self.bits)
        return [100.0 * int(torch.count_nonzero(p[:, i])) / self.numel for i in range(self.bits)]

    def _keep(self, planes: Tensor) -> None:
        self.planes = nn.Parameter(planes.contiguous())
        self.bits = planes.shape[-1]
        self.exps = _exps(self.bits, planes.device)

    @torch.no_grad()
    def precision_reduction(self, theta: float) -> int:
        """Drop planes after local training with threshold ``theta`` (percent); returns the new
        N. f_i = 100 * count_nonzero(B_i) / n. MSB side, while N > 1: f_0 = 0 drops the top
        plane; 0 < f_0 < theta saturates (B_lower <- min(B_lower + B_0, 1)) and drops it;
        f_0 >= theta stops; the counts are taken again after every drop (**deviation**, see the
        module docstring). LSB side, while N > 1: f_last <= theta drops the bottom plane and
        doubles the scale; else stop. Finally s <- s * (2^N - 1) / (2^N0 - 1)."""
        N0 = self.bits
        if self.numel == 0:
            return self.bits
        planes = self.planes.detach()
        while self.bits > 1:
            f = self._fractions()[0]
            if f == 0:
                self._keep(planes[..., 1:])
            elif f < theta:
                merged = torch.clamp(planes[..., 1:] + planes[..., :1], max=1.0)
                self._keep(merged)
            else:
                break
            planes = self.planes.detach()
        while self.bits > 1:
            if self._fractions()[-1] <= theta:
                self._keep(planes[..., :-1])
                planes = self.planes.detach()
                self.scale.mul_(2)
            else:
                break
        self.scale.copy_(self.scale * (2 ** self.bits - 1) / (2 ** N0 - 1))
        return self.bits


class FloatPlaneConv2d(_FloatPlaneWeight):
    """The float-plane twin of :class:`fedmpq.nn.BitConv2d` (no bias)."""

    def __init__(self, layer: BitConv2d):
        super().__init__()
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = layer.kernel_size, layer.stride, layer.padding
        self._init_state(layer, layer.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.bits}, float planes")


class FloatPlaneLinear(_FloatPlaneWeight):
    """The float-plane twin of :class:`fedmpq.nn.BitLinear` (its bias stays float, as ours)."""

    def __init__(self, layer: BitLinear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_state(layer, layer.weight_shape)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}, float planes"


def float_plane_layers(model: nn.Module):
    """(name, layer) of every float-plane layer, in module order (the layer index l)."""
    _check_module(model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _FloatPlaneWeight)]


def float_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter of ``model`` (a :class:`FloatPlaneModel` or the module it wraps) that plain
    SGD trains: all but the float planes (scales, BatchNorm, shortcuts, biases)."""
    planes = {id(m.planes) for _, m in float_plane_layers(model)}
    return [p for p in model.parameters() if id(p) not in planes]


class FloatPlaneModel(nn.Module):
    """A quantized model's float-plane twin: the same module tree and float parameters, every
    bit-plane layer replaced by its float-plane layer holding the same codes, signs and scale.

    Build it with :meth:`from_quantized`; ``forward`` is the wrapped model's."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def from_quantized(cls, qmodel: nn.Module) -> "FloatPlaneModel":
        """Deep-copy ``qmodel`` (a model of :mod:`fedmpq.nn` with bit-plane layers) and replace
        each :class:`BitConv2d` / :class:`BitLinear` by a :class:`FloatPlaneConv2d` /
        :class:`FloatPlaneLinear` initialized from its codes (planes = their bits), sign bitmap
        (+-1) and scale. ``qmodel`` is left untouched."""
        net = copy.deepcopy(qmodel)
        layers = bit_layers(net)
        if not layers:
            raise ValueError("the model has no bit-plane layers (is it quantized?)")
        for name, layer in layers:
            twin = FloatPlaneConv2d(layer) if isinstance(layer, BitConv2d) else FloatPlaneLinear(layer)
            parent_name, _, leaf = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, leaf, twin)
        return cls(net)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def layers(self) -> List[_FloatPlaneWeight]:
        """The float-plane layers in layer order."""
        return [m for _, m in float_plane_layers(self.net)]

    def total_weights(self) -> int:
        """T = the quantized weights of the model."""
        return sum(m.numel for m in self.layers())

    def regularizer(self) -> Tensor:
        """R / T (float32 0-dim), differentiable in the planes; the loss adds ``lam * R / T``."""
        layers = self.layers()
        return sum(m.group_lasso() for m in layers) / self.total_weights()

    def float_parameters(self) -> List[nn.Parameter]:
        """Every parameter that plain SGD trains: all but the planes."""
        return float_parameters(self)

    def bit_assignment(self) -> List[int]:
        return [m.bits for m in self.layers()]

    @torch.no_grad()
    def precision_reduction(self, theta: float) -> List[int]:
        """Precision reduction of every layer (:meth:`_FloatPlaneWeight.precision_reduction`);
        returns the new N per layer. Build a new optimizer afterwards (the planes changed shape)."""
        return [m.precision_reduction(float(theta)) for m in self.layers()]


class FloatPlaneOptimizer:
    """The authors' optimizer on float planes (module docstring, steps 1-6), with our generator
    for the Bernoulli draws and the regularizer's gradient added at the start of each step;
    the float parameters take a separate ``torch.optim.SGD`` over :func:`float_parameters`,
    stepped after this one, exactly as ours.

    Usage as ours: ``loss = CE; loss.backward(); opt.step(); sgd.step()``. Per layer l:
    ``buffers[l]`` float32 (*S, N), the last step's Delta (absent at the start of a round), and,
    for inspection only (the authors keep no such state), ``gs[l]``, that step's g_s (float32
    0-dim), so that ``buffers[l] / gs[l]`` is the update r compared with ours.

    Args:
        model: a :class:`FloatPlaneModel`.  lr: eta > 0 (the attribute ``lr`` may be changed
            between steps).  momentum: mu in [0, 1).  lam: lambda >= 0.  seed: the generator's
            seed; the key of each draw is (seed, step, layer), element j = the weight's flat index.
    """

    def __init__(self, model: FloatPlaneModel, lr: float, momentum: float = 0.9, lam: float = 1e-3, seed: int = 0):
        check_settings(lr, momentum, lam)
        self.model = model
        self.layers = model.layers()
        self.total = model.total_weights()
        self.lr, self.momentum, self.lam, self.seed = float(lr), float(momentum), float(lam), int(seed)
        self.steps = 0
        self.skipped = 0
        self.buffers: Dict[int, Optional[Tensor]] = {}
        self.gs: Dict[int, Tensor] = {}

    def _add_regularizer_grads(self) -> None:
        if self.lam == 0:
            return
        live = [m for m in self.layers if m.planes.grad is not None]
        if not live:
            return
        with torch.enable_grad():
            r = sum(m.group_lasso() for m in self.layers)
            loss = r * self.lam / self.total
            grads = torch.autograd.grad(loss, [m.planes for m in live])
        for m, g in zip(live, grads):
            m.planes.grad = m.planes.grad + g

    @torch.no_grad()
    def _plane_step(self, l: int, layer: _FloatPlaneWeight) -> None:
        N = layer.bits
        L = 2 ** N - 1
        lr = self.lr
        B = layer.planes
        g = B.grad
        buf = self.buffers.get(l)
        if buf is None or buf.shape != B.shape:
            d = g.clone()                                    # first step: buf = g
        else:
            d = buf * self.momentum + g
        g_s = torch.max(torch.abs(d)) / torch.tensor(L)
        if not bool(torch.isfinite(g_s)) or (bool(g_s > 0) and not bool(torch.isfinite(g_s * lr))):
            self.skipped += 1                                 # as ours: a non-finite g_s or lr * g_s
            return
        self.gs[l] = g_s
        if not bool(g_s > 0):
            self.buffers[l] = torch.zeros_like(B)
            return
        sign = torch.where(d > 0, 1.0, -1.0)
        x = torch.abs(d) / g_s * lr
        k = torch.round(torch.log2(x))                        # PowerOfTwo; log2(0) = -inf
        plane_exp = torch.arange(N - 1, -1, -1, dtype=torch.float32, device=B.device)
        e = k + plane_exp                                     # log2 of u = 2^k * 2^(N-1-i)
        u = torch.exp2(e)
        det = (e >= 0) & (e <= N)
        delta = torch.where(det, u * g_s * sign, torch.zeros_like(u))
        small = torch.where(e < 0, u, torch.zeros_like(u))
        p = torch.zeros_like(small[..., 0])
        for i in range(N):                                    # planes in order
            p = p + small[..., i]
        p = torch.clamp(p, 0.0, 1.0)
        draws = fk.uniform(fk.step_key(self.seed, self.steps, l), layer.numel, B.device).reshape(p.shape)
        hit = (draws < p).float()
        delta[..., -1] = delta[..., -1] + hit * g_s * sign[..., 0]
        B.add_(delta, alpha=-lr)
        self.buffers[l] = delta
        self._requantize(layer)

    @staticmethod
    @torch.no_grad()
    def _requantize(layer: _FloatPlaneWeight) -> None:
        """The authors' ``quant()`` with our deviation: q = round(sum_i B_i * exps_i * L); q < 0
        flips the sign (q <- -q); q <- min(q, L); planes <- bits of q."""
        N = layer.bits
        L = 2 ** N - 1
        v = torch.sum(layer.planes * layer.exps, dim=-1)
        q = torch.round(v * L)
        flip = q < 0
        q = torch.clamp(torch.abs(q), max=float(L))
        layer.sign.copy_(torch.where(flip, -layer.sign, layer.sign))
        layer.planes.copy_(_planes_of(q, N))

    @torch.no_grad()
    def step(self) -> None:
        self._add_regularizer_grads()
        for l, layer in enumerate(self.layers):
            if layer.planes.grad is not None:
                self._plane_step(l, layer)
        self.steps += 1

    def zero_grad(self) -> None:
        for layer in self.layers:
            layer.planes.grad = None
