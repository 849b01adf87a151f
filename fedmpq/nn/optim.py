"""The client's optimizers (ALGORITHM.md, "Local objective" and "Bit-plane optimizer"):
:class:`BitPlaneOptimizer` for the bit-plane weights (group lasso, momentum whose buffer
keeps the last update, power-of-two updates with stochastic LSB rounding, re-quantization,
all in one fused kernel per layer), and SGD with momentum for the float parameters (scale,
BatchNorm, shortcuts, biases) through :func:`float_parameters`.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from torch.optim.sgd import sgd as sgd_fn  # the functional API: no torch._dynamo import

import fedmpq_kernels as fk

from .layers import _device_of, bit_layers

_EPS = 1e-8  # the group lasso's epsilon (ALGORITHM.md, "Local objective")


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (the CPU). There the step
    takes a few Python shortcuts; on a GPU, and in a step captured in a CUDA graph, it reads
    no value on the host (tests/fedmpq/test_step_graph.py turns this off on the CPU to run
    the GPU's way under a capture emulator)."""
    return device.type == "cpu"


F32_LEAST, F32_MAX = 2.0 ** -149, 3.4028234663852886e38  # float32's least positive and largest values
MOMENTUM_MAX = 1.0 - 2.0 ** -25  # the least double that float32 rounds to 1


def check_settings(lr: float, momentum: float, lam: float, lam_name: str = "lambda") -> None:
    """An optimizer's settings: lr > 0, momentum in [0, 1), ``lam`` (lambda, or what
    ``lam_name`` says: FloatSGD's weight_decay) >= 0; lr and lam finite. Each a real number
    (a Python or NumPy one, or a one-element tensor), not a bool: ``TypeError`` else, where
    the comparisons below raised torch's or Python's own message ("'<' not supported
    between instances of 'int' and 'str'")."""
    for name, v in (("lr", lr), ("momentum", momentum), (lam_name, lam)):
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1
                                                                      and not v.is_complex())):
            raise TypeError(f"{name} must be a number, got {v!r}")
    # in float32 (the kernels' steps): lr neither 0 nor inf, momentum not 1
    if not F32_LEAST <= lr <= F32_MAX:
        raise ValueError(f"lr must be a finite number > 0 that float32 holds (1.4e-45 to 3.4e38), got {lr}")
    if not 0 <= momentum < MOMENTUM_MAX:
        raise ValueError(f"momentum must be in [0, 1) (below 1 - 2**-25, which float32 rounds to 1), got {momentum}")
    if not 0 <= lam <= F32_MAX:  # lambda = inf (float32's too) made every coefficient inf: each step skipped, silently
        raise ValueError(f"{lam_name} must be a finite number >= 0 that float32 holds (at most 3.4e38), got {lam}")


def float_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter that plain SGD trains: all but the bit-plane layers' sinks."""
    sinks = {id(m.sink) for _, m in bit_layers(model)}
    return [p for p in model.parameters() if id(p) not in sinks]


def _zero(p: torch.Tensor, set_to_none: bool) -> None:
    if set_to_none or p.grad is None:
        p.grad = None
    else:
        p.grad.detach_().zero_()


class FloatSGD:
    """SGD with momentum for the float parameters: ``torch.optim.SGD``'s arithmetic, bit for
    bit (its own functional :func:`torch.optim.sgd.sgd`, with the same per-device choice of
    the single-tensor or foreach kernels), without ``torch.optim.Optimizer``, whose first call
    imports ``torch._dynamo``: 145 MB of resident memory and 0.7 s in every training
    process, which trains no compiled model (2 CPU cores; tests/fedmpq/test_nn.py). Also
    no profiler hooks per step.

    Args:
        groups: an iterable of parameters, or of dicts ``{"params": [...], "lr": x}`` (as
            ``torch.optim.SGD`` takes them; a group without ``lr``, ``momentum`` or
            ``weight_decay`` takes the argument's, a group's own are checked as the
            arguments are, ``ValueError`` naming the group; ``ValueError`` for ``dampening``,
            ``nesterov`` or ``maximize`` other than their defaults; ``ValueError`` for no
            parameters, and for a bit-plane layer's sink: give :func:`float_parameters`).
        lr, momentum, weight_decay: as ``torch.optim.SGD`` (dampening 0, no Nesterov).
    Momentum buffers are made at a parameter's first step with a gradient and kept while
    this object lives (one round, as the client builds it anew each round); a parameter
    whose ``grad`` is None is skipped, its buffer untouched, as ``torch.optim.SGD`` does."""

    def __init__(self, groups, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        check_settings(lr, momentum, weight_decay, "weight_decay")
        if isinstance(groups, torch.Tensor):  # list() would take its rows: views that never get a .grad
            raise TypeError("params must be an iterable of tensors or of dicts, got a tensor (give [tensor])")
        if isinstance(groups, dict):  # list() would take its keys: "a group holds a str"
            raise TypeError("params must be an iterable of tensors or of dicts, got a dict (give [dict])")
        groups = list(groups)
        if not groups:  # as torch.optim.SGD: a step that trains nothing is a mistake, not a choice
            raise ValueError("FloatSGD got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.groups: List[dict] = []
        seen = set()
        for i, g in enumerate(groups):
            if not isinstance(g, dict):  # g["params"] raised an IndexError on a tensor
                raise TypeError(f"param group {i} must be a dict, got a {type(g).__name__} (give every group as a "
                                "dict, or only tensors)")
            if "params" not in g:  # a bare KeyError else
                raise ValueError(f"param group {i} has no 'params'")
            # a group's params may be one tensor, as torch.optim.SGD takes it (not its rows)
            params = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
            for p in params:
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"FloatSGD optimizes tensors, a group holds a {type(p).__name__}")
                if not p.is_leaf:  # its .grad is never set: it would never step
                    raise ValueError("FloatSGD cannot optimize a non-leaf tensor")
                if any(st == 0 and sz > 1 for st, sz in zip(p.stride(), p.shape)):  # step() failed in torch
                    raise ValueError("FloatSGD cannot update a parameter whose elements share memory (zero strides: "
                                     "a bit-plane layer's sink, which BitPlaneOptimizer reads): give "
                                     "fedmpq.nn.float_parameters(model), not model.parameters()")
                if id(p) in seen:  # it would take two steps per step
                    raise ValueError("a parameter appears more than once in FloatSGD's groups")
                seen.add(id(p))
            for key, default in (("dampening", 0), ("nesterov", False), ("maximize", False)):
                if g.get(key, default) != default:  # what torch.optim.SGD would do and this does not: refused
                    raise ValueError(f"FloatSGD has no {key} (a group asks for {key}={g[key]!r})")
            group = {"params": params}
            for key, default in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
                try:
                    group[key] = float(g.get(key, default))
                except (TypeError, ValueError):
                    raise ValueError(f"param group {i}: {key} must be a number, got {g[key]!r}") from None
            try:  # the constructor's rules: a group's lr of -1, NaN or inf trained wrong, unsaid
                check_settings(group["lr"], group["momentum"], group["weight_decay"], "weight_decay")
            except ValueError as e:
                raise ValueError(f"param group {i}: {e}") from None
            self.groups.append(group)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buffers: Dict[int, torch.Tensor] = {}  # id(param) -> momentum buffer

    def _params(self) -> List[torch.Tensor]:
        """Every parameter, in the groups' order: its index there is its position in
        :meth:`state_dict` and in a copy."""
        return [p for g in self.groups for p in g["params"]]

    # A copy's parameters have new ids: a deepcopy or pickle (of the model with this optimizer)
    # carries the buffers by position in the groups and keys them by the copies' ids again.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        where = {id(p): i for i, p in enumerate(self._params())}
        state["buffers"] = {where[k]: b for k, b in self.buffers.items() if k in where}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        params = self._params()
        self.buffers = {id(params[i]): b for i, b in state["buffers"].items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Every parameter's gradient to None (or to zeros in place), as ``torch.optim.SGD``."""
        for g in self.groups:
            for p in g["params"]:
                _zero(p, set_to_none)

    def state_dict(self) -> dict:
        """The optimizer's state, as ``torch.optim`` gives it: ``{"param_groups": [{"lr",
        "momentum", "weight_decay", "params": [indices]}], "state": {index: {"momentum_buffer":
        tensor}}}``, parameters by their index in the groups' order (the tensors are this
        optimizer's own: ``torch.save`` copies them)."""
        groups, i = [], 0
        for g in self.groups:
            groups.append({"lr": g["lr"], "momentum": g["momentum"], "weight_decay": g["weight_decay"],
                           "params": list(range(i, i + len(g["params"])))})
            i += len(g["params"])
        state = {i: {"momentum_buffer": self.buffers[id(p)]} for i, p in enumerate(self._params())
                 if id(p) in self.buffers}
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict` of an optimizer over parameters of the same groups,
        counts and shapes: the groups' lr, momentum and weight_decay and the momentum buffers
        (copied, to each parameter's device and dtype). ``ValueError`` naming what does not
        fit; nothing changes then."""
        if not isinstance(state_dict, dict) or not {"param_groups", "state"} <= set(state_dict):
            raise ValueError("state_dict must be a FloatSGD.state_dict() (param_groups and state)")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.groups) or any(len(a["params"]) != len(g["params"]) for a, g in zip(saved, self.groups)):
            raise ValueError(f"the state dict has groups of {[len(a['params']) for a in saved]} parameters, this "
                             f"optimizer {[len(g['params']) for g in self.groups]}")
        index = {i: p for a, g in zip(saved, self.groups) for i, p in zip(a["params"], g["params"])}
        buffers = {}
        for i, st in state_dict["state"].items():
            p, buf = index.get(i), st.get("momentum_buffer") if isinstance(st, dict) else None
            if p is None or not isinstance(buf, torch.Tensor) or buf.shape != p.shape:
                raise ValueError(f"the state dict's parameter {i} does not fit this optimizer's "
                                 f"({tuple(p.shape) if p is not None else 'no such parameter'})")
            buffers[id(p)] = buf.detach().to(device=p.device, dtype=p.dtype, copy=True)
        for i, (a, g) in enumerate(zip(saved, self.groups)):
            try:
                check_settings(a["lr"], a["momentum"], a["weight_decay"], "weight_decay")
            except (KeyError, ValueError) as e:
                raise ValueError(f"the state dict's param group {i}: {e}") from None
        for a, g in zip(saved, self.groups):
            g.update(lr=float(a["lr"]), momentum=float(a["momentum"]), weight_decay=float(a["weight_decay"]))
        self.buffers = buffers

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            bufs = [self.buffers.get(id(p)) for p in params]
            fresh = g["momentum"] and any(b is None for b in bufs)
            sgd_fn(params, [p.grad for p in params], bufs, weight_decay=g["weight_decay"], momentum=g["momentum"],
                   lr=g["lr"], dampening=0.0, nesterov=False, maximize=False)
            if fresh:  # sgd_fn made them (in bufs); later steps update them in place
                for p, b in zip(params, bufs):
                    self.buffers[id(p)] = b


class BitPlaneOptimizer:
    """One fused step per bit-plane layer (:func:`fedmpq_kernels.bitplane_step`), every layer in
    one call (:func:`fedmpq_kernels.bitplane_step_layers`) when each has a gradient.

    The step of layer l uses G = ``layer.sink.grad`` from the last backward, the group-lasso
    coefficient ``lam / T * n_l * N_l / sqrt(eps + popcount_i)`` (T = the quantized weights
    of the model) and the forward's scale, so call it *before* the float optimizer updates
    the scales. State per layer: ``mom`` (N_l bytes per weight: the last update's codes) and
    ``gs`` (one float). Built anew each round, as the authors do.

    Args:
        model: a quantized model (its bit-plane layers are found by :func:`bit_layers`).
        lr: eta > 0.  momentum: mu in [0, 1).  lam: lambda >= 0 (0: no regularizer).
        seed: the generator's seed, an int (taken mod 2^32); the key of each draw is (seed,
            step, layer, element).
        device_keys: keep the step count on the layers' device and derive the layers' keys
            there (:func:`fedmpq_kernels.step_keys`), so that a step captured in a CUDA
            graph draws new numbers on every replay; the same draws as with host keys.
            ``steps`` then counts the host's calls only (a replay makes none); the device
            count is :attr:`device_step`.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, lam: float = 1e-3, seed: int = 0,
                 device_keys: bool = False):
        check_settings(lr, momentum, lam)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # int() took 1.5 as seed 1
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.layers = [m for _, m in bit_layers(model)]
        if not self.layers:
            raise ValueError("the model has no bit-plane layers (is it quantized?)")
        self.lr, self.momentum, self.lam, self.seed = float(lr), float(momentum), float(lam), int(seed)
        self.total = sum(m.numel for m in self.layers)
        if self.total == 0:  # T = 0: lam * R / T is undefined (lam / T raised ZeroDivisionError at the first step)
            raise ValueError("the model's bit-plane layers hold no weights (T = 0): nothing to optimize")
        self.steps = 0
        self.device_keys = bool(device_keys)
        # int64 0-dim on the layers' device, advanced in place by every step (device_keys)
        self.device_step = torch.zeros((), dtype=torch.int64, device=self.layers[0].codes.device) if device_keys else None
        self.skipped = 0  # layer steps skipped for a non-finite gradient or scale
        self.state: Dict[int, dict] = {}
        # (key, float64 n_l*N_l per plane or lam == 0's zeros, the widths) of _coefficients
        self._weights = None
        self._state_layout = None  # the layout (_layout) self.state was last checked against

    def _layer_state(self, l: int, layer) -> dict:
        st = self.state.get(l)
        n, N = layer.numel, layer._bits
        if st is None or st["mom"].shape != (N, n) or st["mom"].device != layer.codes.device:
            st = self.state[l] = {"mom": torch.zeros((N, n), dtype=torch.uint8, device=layer.codes.device),
                                  "gs": torch.zeros(1, dtype=torch.float32, device=layer.codes.device)}
        return st

    def coefficients(self, layer) -> torch.Tensor:
        """The per-plane regularizer coefficient of ``layer`` for a set bit, float32 (N,)."""
        N = layer._bits  # the field, read once (the property costs ~0.8k instructions a read)
        if self.lam == 0:
            return torch.zeros(N, dtype=torch.float32, device=layer.codes.device)
        pc = fk.plane_popcounts(layer.codes, N)
        if host_reads_free(pc.device):
            # N <= 8 numbers: plain float32 arithmetic beats a handful of tiny torch ops, with
            # group_lasso's exact rounding (float32(n*N / sqrt(eps + pc)) * float32(lam / T)).
            nN, f = layer.numel * N, np.float32(self.lam / self.total)
            return torch.tensor([float(np.float32(nN / math.sqrt(c + _EPS)) * f) for c in pc.tolist()],
                                dtype=torch.float32)
        _, c = fk.group_lasso(pc, layer.numel, N)
        return c * (self.lam / self.total)

    def all_coefficients(self, batched: bool = True) -> List[torch.Tensor]:
        """:meth:`coefficients` of every layer, the same bits, in a few launches for the whole
        model. Per layer on a GPU, the popcounts' sum, group_lasso and the factor are ten
        small launches, 200 of a ResNet-20 step's ~700; here the layers' popcounts are
        concatenated and group_lasso's formula (float64 ``n*N / sqrt(eps + pc)``, rounded to
        float32, times float32 ``lam / T``) runs once over them. Views of one float32 tensor,
        (N_l,) each. The per-plane weights ``n_l * N_l`` are made on the device once (kept
        while the layers' sizes, widths and device stay), not in every step: a step replayed
        from a CUDA graph may copy nothing from the host.

        On the CPU too, with NumPy for the formula (a few µs where torch's six ops on a small
        tensor cost ~20): a layer's N values in Python floats cost less than a handful of
        torch ops, but the batched way's few ops for the whole model cost less than the layers'
        Python. ``batched`` False goes layer by layer (:meth:`coefficients`), as do layers on
        several devices."""
        codes, bits = [m.plane_state()[0] for m in self.layers], [m._bits for m in self.layers]
        return self._coefficients(codes, bits, self._layout(codes, bits), batched)

    def _layout(self, codes, bits):
        """(sizes, widths, device) of the layers whose codes and widths are given; the device
        None when they are on several."""
        devs = set(map(_device_of, codes))
        return tuple(map(torch.Tensor.numel, codes)), tuple(bits), (devs.pop() if len(devs) == 1 else None)

    def _coefficients(self, codes, bits, layout, batched: bool = True) -> List[torch.Tensor]:
        """:meth:`all_coefficients` of the layers' ``codes`` and ``bits`` of ``layout``
        (:meth:`_layout`; the step reads them once)."""
        dev = layout[2]
        if not batched or dev is None:
            return [self.coefficients(m) for m in self.layers]
        key = (layout, self.lam == 0)
        if self._weights is None or self._weights[0] != key:
            sizes, widths = layout[0], layout[1]
            if self.lam == 0:  # no regularizer: zeros, made once (the kernels only read them)
                vec = torch.zeros(sum(widths), dtype=torch.float32, device=dev)
            else:
                vec = torch.tensor([float(n * b) for n, b in zip(sizes, widths) for _ in range(b)],
                                   dtype=torch.float64, device=dev)
            self._weights = (key, vec, list(widths))
        _, vec, splits = self._weights
        if self.lam == 0:
            return list(vec.split(splits))
        pc = fk.plane_popcounts_layers(codes, bits)
        if host_reads_free(dev):
            # the formula in NumPy on the same memory, bit for bit torch's (IEEE sqrt, division
            # and rounding to float32, then a float32 product)
            c = torch.from_numpy((vec.numpy() / np.sqrt(pc.numpy() + _EPS)).astype(np.float32)
                                 * np.float32(self.lam / self.total))
        else:
            c = (vec / torch.sqrt(pc.to(torch.float64) + _EPS)).float() * (self.lam / self.total)
        return list(c.split(splits))

    def _states(self, layout) -> List[dict]:
        """Every layer's state dict (``self.state[l]``), made where missing or no longer of its
        layer's size, width or device: checked layer by layer only when ``layout`` (see
        :meth:`_layout`) changed since the last step."""
        states = list(map(self.state.get, range(len(self.layers))))
        if layout != self._state_layout or layout[2] is None or None in states:
            states = [self._layer_state(l, m) for l, m in enumerate(self.layers)]
            self._state_layout = layout
        return states

    @torch.no_grad()
    def step(self) -> None:
        keys = None
        layers = self.layers
        if self.device_keys:
            if self.device_step.device != layers[0].codes.device:  # the model moved
                self.device_step = self.device_step.to(layers[0].codes.device)
            keys = fk.step_keys(self.seed, self.device_step, len(layers))
        # every layer's tensors read once (scale: the parameter itself, its value read under no_grad)
        codes, sign, scale, sink = zip(*[m.plane_state() for m in layers])
        bits = [m._bits for m in layers]  # the field: the property costs ~0.8k instructions a read
        layout = self._layout(codes, bits)
        coefs = self._coefficients(codes, bits, layout)
        grads = [s.grad for s in sink]
        if all(g is not None for g in grads):
            # every layer in one call (fk.bitplane_step_layers): the same steps, a fraction of the host cost
            states = self._states(layout)
            if keys is None:
                keys = [fk.step_key(self.seed, self.steps, l) for l in range(len(layers))]
            g_s = fk.bitplane_step_layers(codes, sign, [st["mom"] for st in states], [st["gs"] for st in states],
                                          grads, coefs, scale, bits, self.lr, self.momentum, keys)
            if host_reads_free(g_s.device):  # no sync on a GPU (and a read a capture refuses: not tolist)
                self.skipped += len(layers) - sum(map(math.isfinite, g_s.tolist()))
        else:  # layers without a gradient (not in this backward) keep their state: one by one
            statuses = []
            for l, layer in enumerate(layers):
                g = grads[l]
                if g is None:
                    continue
                st = self._layer_state(l, layer)
                key = keys[l] if keys is not None else fk.step_key(self.seed, self.steps, l)
                statuses.append(fk.bitplane_step(codes[l], sign[l], st["mom"], st["gs"], g, coefs[l], scale[l],
                                                 bits[l], self.lr, self.momentum, key))
            if statuses and host_reads_free(statuses[0].device):  # no sync on a GPU
                self.skipped += sum(not math.isfinite(s.item()) for s in statuses)  # no torch op per layer
        if self.device_keys:
            self.device_step.add_(1)
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Every layer's G (``sink.grad``) to None, or to zeros in place (then every layer
        steps, on its regularizer term alone where the backward did not reach it)."""
        for layer in self.layers:
            _zero(layer.plane_state()[3], set_to_none)  # the sink without nn.Module's lookup (see plane_state)

    def state_bytes(self) -> int:
        """Bytes this optimizer keeps between steps."""
        return sum(st["mom"].numel() + 4 for st in self.state.values())

    def state_dict(self) -> dict:
        """The optimizer's state: its settings, the step count (which keys the draws), and each
        layer's ``mom`` (uint8 (N_l, n_l)) and ``gs`` (float32 (1,)) by layer index. With the
        model's own state dict it resumes a round mid-way: the same steps as without a stop."""
        return {"lr": self.lr, "momentum": self.momentum, "lam": self.lam, "seed": self.seed, "steps": self.steps,
                "skipped": self.skipped, "device_step": self.device_step,
                "state": {l: {"mom": st["mom"], "gs": st["gs"]} for l, st in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict` of an optimizer over a model of the same layers (load
        the model's state dict first: each ``mom`` must fit its layer's width and size now).
        ``ValueError`` naming what does not fit; nothing changes then."""
        keys = {"lr", "momentum", "lam", "seed", "steps", "skipped", "state"}
        if not isinstance(state_dict, dict) or not keys <= set(state_dict):
            raise ValueError(f"state_dict must be a BitPlaneOptimizer.state_dict() ({', '.join(sorted(keys))})")
        check_settings(state_dict["lr"], state_dict["momentum"], state_dict["lam"])
        for key in ("seed", "steps", "skipped"):
            v = state_dict[key]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (key != "seed" and v < 0):
                raise ValueError(f"the state dict's {key} must be an integer{' >= 0' if key != 'seed' else ''}, "
                                 f"got {v!r}")
        state = {}
        for l, st in state_dict["state"].items():
            if not (isinstance(l, int) and 0 <= l < len(self.layers)):
                raise ValueError(f"the state dict has state for layer {l!r}; the model has {len(self.layers)}")
            layer = self.layers[l]
            mom, gs = (st.get("mom"), st.get("gs")) if isinstance(st, dict) else (None, None)
            if not (isinstance(mom, torch.Tensor) and mom.dtype == torch.uint8 and mom.shape == (layer._bits, layer.numel)
                    and isinstance(gs, torch.Tensor) and gs.dtype == torch.float32 and gs.numel() == 1):
                raise ValueError(f"the state dict's layer {l} state does not fit the layer ({layer._bits} bits, "
                                 f"{layer.numel} weights: mom uint8 ({layer._bits}, {layer.numel}), gs float32 (1,))")
            dev = layer.codes.device
            state[l] = {"mom": mom.to(dev, copy=True), "gs": gs.reshape(1).to(dev, copy=True)}
        self.lr, self.momentum, self.lam = float(state_dict["lr"]), float(state_dict["momentum"]), float(state_dict["lam"])
        self.seed, self.steps, self.skipped = int(state_dict["seed"]), int(state_dict["steps"]), int(state_dict["skipped"])
        if self.device_keys:
            step = state_dict.get("device_step")
            self.device_step.fill_(int(step) if isinstance(step, torch.Tensor) else self.steps)
        self.state, self._state_layout, self._weights = state, None, None


def regularizer(model: nn.Module) -> torch.Tensor:
    """``R / T`` of ALGORITHM.md for reporting (float32 0-dim): the loss adds ``lambda * R / T``;
    its gradient reaches the planes through :class:`BitPlaneOptimizer`, not autograd."""
    layers = [m for _, m in bit_layers(model)]
    total = sum(m.numel for m in layers)
    r = sum(fk.group_lasso(fk.plane_popcounts(m.codes, m.bits), m.numel, m.bits)[0] for m in layers)
    return r / total if total else torch.zeros(())  # no quantized weight: R = 0 (not 0 / 0 = NaN)


def state_bytes_per_weight(model: nn.Module, optimizer: BitPlaneOptimizer) -> float:
    """Training state kept between steps, per quantized weight: codes, sign bitmaps, scales,
    sinks and the optimizer's buffers."""
    layers = [m for _, m in bit_layers(model)]
    return (sum(m.state_bytes() for m in layers) + optimizer.state_bytes()) / sum(m.numel for m in layers)
