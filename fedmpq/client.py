"""A FedMPQ client, transport-free: a download payload (bytes) and the client's data in, an
upload payload (bytes) out (ALGORITHM.md: "Local objective", "Bit-plane optimizer",
"Precision reduction", "What a client sends").

Algorithms: ``fedmpq`` (bit-plane training, then precision reduction with threshold θ: the
upload carries the pruned bit-widths and Δ per layer), ``aqfl`` and ``fp8`` (the same
training at fixed bit-widths: no pruning, Δ = 0) and ``fp`` (float FedAvg: SGD with momentum
and weight decay on a float model; download and upload are float32 ``Model`` payloads).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import fedmpq_kernels as fk

from . import nn as qn
from . import wire
from .step_graph import StepGraph

log = logging.getLogger("fedmpq")

Tensor = torch.Tensor
ALGORITHMS = ("fedmpq", "aqfl", "fp8", "fp")
SCALE_LR_RULES = ("lsq", "sgd")  # see scale_param_groups


@dataclass
class TrainConfig:
    """The local training settings (the paper's keys)."""

    alg: str = "fedmpq"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # fp only: the bit-plane optimizer ignores it, as the authors'
    lam: float = 1e-3
    threshold: float = 2.0
    local_epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    scale_lr: str = "lsq"  # "lsq": lr / sqrt(n (2^N - 1)) per scale; "sgd": lr (the authors')
    device: str = "cpu"  # where the model trains; the data moves there once per round
    cuda_graph: bool = False  # replay the local step from a CUDA graph (device cuda only)


@dataclass
class LocalResult:
    """What a client reports beside its upload (for logs; never needed by the server)."""

    upload: bytes
    train_accuracy: float
    train_loss: float
    seconds: float
    quant_seconds: float  # decode, the bit-plane optimizer, precision reduction and encode


def _batches(n: int, batch_size: int, seed: int, device=None):
    """A seeded shuffle of range(n) cut into batches of ``batch_size``; a remainder smaller
    than half a batch (or than 2) joins the last full batch. Why: train-mode BatchNorm on a
    batch of one is dominated by its epsilon, and the scale gradient it gives took a conv's
    scale through zero in one step (0.009 -> -0.36 on digits), which the server's mean of
    mirrored layers then turned into a collapse of the global model."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).to(device)  # drawn on the CPU: the same batches on every device
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < max(2, batch_size // 2):
        starts.pop()
    ends = starts[1:] + [n]
    for a, b in zip(starts, ends):
        yield order[a:b]


def load_download(model: torch.nn.Module, d: wire.Download) -> None:
    """Put a decoded download into a quantized model: every bit-plane layer from its
    ``<layer>.weight`` entry (codes, signs, scale, bits), every other state entry from the
    floats. Raises ``ValueError`` naming a missing or unexpected entry."""
    layers = qn.bit_layers(model)
    names = {f"{n}.weight" for n, _ in layers}
    for name, layer in layers:
        qt = d.layers.get(f"{name}.weight")
        if qt is None:
            raise ValueError(f"the download has no quantized entry {name}.weight")
        if tuple(qt.shape) != layer.weight_shape:
            raise ValueError(f"{name}.weight has shape {qt.shape}, the model {layer.weight_shape}")
        layer.load_packed(fk.unpack_codes(qt.planes, qt.bits, qt.numel), qt.signs, qt.scale, qt.bits)
    extra = set(d.layers) - names
    if extra:
        raise ValueError(f"the download has quantized entries the model lacks: {sorted(extra)[:3]}")
    own = set(qn.float_state(model))
    missing = own - set(d.floats)
    if missing:
        raise ValueError(f"the download lacks {sorted(missing)[:3]}")
    unexpected = set(d.floats) - own
    if unexpected:
        raise ValueError(f"the download has entries the model lacks: {sorted(unexpected)[:3]}")
    model.load_state_dict(dict(d.floats), strict=False)


def make_upload(model: torch.nn.Module, client_id: int, round_: int, num_samples: int, budget: float,
                deltas: Dict[str, int]) -> wire.Upload:
    """The model's state as an upload: quantized layers packed (N + 1 bits per weight), the
    rest as float tensors."""
    layers = qn.bit_layers(model)
    q = {}
    for name, layer in layers:
        sign = layer.sign.detach().cpu().clone()  # the layer's bitmap is the wire's: no unpack/pack
        scale = float(layer.scale.detach())
        if scale < 0:  # SGD may take the scale below 0: W = s*sigma*q/L = |s|*(-sigma)*q/L
            sign, scale = _flip_signs(sign, layer.numel), -scale
        q[f"{name}.weight"] = wire.QuantizedTensor(layer.weight_shape, layer.bits, scale,
                                                   fk.pack_codes(layer.codes.detach().cpu(), layer.bits), sign)
    floats = {k: v.detach().cpu() for k, v in qn.float_state(model).items()}
    return wire.Upload(client_id, round_, num_samples, float(budget), q, deltas, floats)


def _flip_signs(sign: Tensor, n: int) -> Tensor:
    """A sign bitmap of n elements with every sign flipped, in place; the padding bits past
    element n stay 0 (the pack layout: little-endian uint32 words, bit j%32 of word j//32)."""
    sign.bitwise_not_()
    if n % 32:
        word = sign[(n // 32) * 4:(n // 32) * 4 + 4]
        keep = (1 << (n % 32)) - 1
        word.bitwise_and_(torch.tensor(list(keep.to_bytes(4, "little")), dtype=torch.uint8))
    return sign


def scale_param_groups(model: torch.nn.Module, lr: float, rule: str = "lsq") -> list:
    """SGD parameter groups for a quantized model's float parameters. ``rule="lsq"``: each
    bit-plane layer's scale at ``lr / sqrt(n_l * (2^N_l - 1))`` (LSQ's step-size gradient
    scale, Esser et al. 2020), everything else at ``lr``; ``rule="sgd"``: everything at ``lr``
    (the authors' code). Raises ``ValueError`` for another rule.

    Why (a deviation, DESIGN.md): the scale's gradient sums over the layer's n weights, so a
    plain SGD step moves every weight about n·E[(q/L)^2] times further than the weights' own
    steps. At the authors' lr the classifier's scale crossed zero every step or two and a
    mirrored layer in one client's upload dominated the server's mean."""
    if rule not in SCALE_LR_RULES:
        raise ValueError(f"scale_lr must be one of {', '.join(SCALE_LR_RULES)}, got {rule!r}")
    if rule == "sgd":
        return [{"params": qn.float_parameters(model), "lr": lr}]
    layers = qn.bit_layers(model)
    scales = {id(layer.scale) for _, layer in layers}
    rest = [p for p in qn.float_parameters(model) if id(p) not in scales]
    # One group per rate, not per layer: layers of one size and width share it (ResNet-20 at
    # 4 bits: 7 rates for 20 layers), and each group is a call of torch's SGD, on a GPU a few
    # launches (per parameter the same arithmetic either way).
    by_lr: dict = {}
    for _, layer in layers:
        # max(1, .): a layer of 0 weights (its scale's gradient is always 0) took lr / sqrt(0)
        by_lr.setdefault(lr / math.sqrt(max(1, layer.numel * (2 ** layer.bits - 1))), []).append(layer.scale)
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": r} for r, ps in by_lr.items()]


def train_local(model: torch.nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, client_id: int, round_: int,
                quantized: bool, on_epoch: Optional[Callable[[], Any]] = None) -> Tuple[float, float, float]:
    """``cfg.local_epochs`` epochs of local training; returns (train accuracy, mean loss) of
    the last epoch and the seconds spent in the bit-plane optimizer. Batches and draws are
    seeded by (seed, round, client). ``on_epoch`` is called before every epoch after the
    first (a ClientApp counts the processes training beside it again there). With
    ``cfg.cuda_graph`` the steps of the batch size replay one CUDA graph
    (:class:`fedmpq.step_graph.StepGraph`); the optimizer's seconds then count its eager
    steps only (a replayed step's share is not timed apart)."""
    model.train()
    if quantized:
        bit_opt = qn.BitPlaneOptimizer(model, lr=cfg.lr, momentum=cfg.momentum, lam=cfg.lam,
                                       seed=fk.step_key(cfg.seed, round_, client_id), device_keys=cfg.cuda_graph)
        sgd = qn.FloatSGD(scale_param_groups(model, cfg.lr, cfg.scale_lr), lr=cfg.lr, momentum=cfg.momentum)
    else:
        bit_opt = None
        sgd = qn.FloatSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # on the device, summed in float64 as Python floats would be: no sync per batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    opt_seconds = 0.0

    def step(xb: Tensor, yb: Tensor) -> None:  # in place only: a CUDA graph may replay it
        nonlocal opt_seconds
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        if bit_opt is not None:
            bit_opt.zero_grad()
        sgd.zero_grad()
        loss.backward()
        if bit_opt is not None:
            t = time.perf_counter()
            bit_opt.step()  # before SGD moves the scales
            opt_seconds += time.perf_counter() - t
        sgd.step()
        loss_sum.add_(loss.detach().double() * len(yb))
        correct.add_((out.detach().argmax(1) == yb).sum())

    run = (lambda idx: step(x[idx], y[idx])) if not cfg.cuda_graph else StepGraph(step, x, y, cfg.batch_size)
    total = 0
    # every layer's weight in one call per forward, one autograd node (the same bits)
    with (qn.batch_weights(model) if quantized else contextlib.nullcontext()):
        for epoch in range(cfg.local_epochs):
            if epoch and on_epoch is not None:
                on_epoch()
            loss_sum.zero_()
            correct.zero_()
            total = 0
            for idx in _batches(len(y), cfg.batch_size, fk.step_key(cfg.seed, round_ * 1000 + epoch, client_id),
                                x.device):
                run(idx)
                total += len(idx)
    loss_total, n_correct = float(loss_sum), int(correct)
    if not math.isfinite(loss_total):
        raise FloatingPointError("the local loss is not finite")
    if bit_opt is not None and bit_opt.skipped:  # counted on the CPU only (a GPU's would need a sync)
        # a step skipped leaves the layer as it was: said, or a run with lambda or lr too large
        # for float32 trained nothing and looked like one that did
        log.warning("round %d: client %d skipped %d bit-plane layer steps of %d steps x %d layers (a gradient, scale "
                    "or group-lasso coefficient not finite in float32: lambda or lr too large?)", round_, client_id,
                    bit_opt.skipped, bit_opt.steps, len(bit_opt.layers))
    return n_correct / max(total, 1), loss_total / max(total, 1), opt_seconds


def client_update(download: bytes, x: Tensor, y: Tensor, builder: Callable[..., torch.nn.Module], cfg: TrainConfig,
                  client_id: int, round_: int, budget: float,
                  on_epoch: Optional[Callable[[], Any]] = None) -> LocalResult:
    """One round of one client: decode the download, train, (fedmpq) prune, encode.

    Args:
        download: a ``Download`` payload (``Model`` for ``fp``).
        x, y: the client's training data, float32 (N, C, H, W) and int64 (N,).
        builder: makes the model: ``builder(quantized=..., bits=[...])``.
        cfg: :class:`TrainConfig`.  budget: β_k (reported in the upload).
        on_epoch: called before every local epoch after the first (:func:`train_local`).

    Returns:
        :class:`LocalResult` with the upload payload (``Upload``; ``Model`` for ``fp``).
    """
    t0 = time.perf_counter()
    if cfg.alg not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {cfg.alg!r}; expected one of {', '.join(ALGORITHMS)}")
    dev = torch.device(cfg.device)
    x, y = x.to(dev), y.to(dev)  # once per round; batches are cut on the device
    if cfg.alg == "fp":
        m = wire.decode_model(download)
        model = builder(quantized=False)
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in m.tensors.items()})
        model.to(dev)
        q0 = time.perf_counter() - t0
        acc, loss, _ = train_local(model, x, y, cfg, client_id, round_, quantized=False, on_epoch=on_epoch)
        t1 = time.perf_counter()
        up = wire.encode_model(wire.Model(round_, {k: v.detach() for k, v in model.state_dict().items()}))
        return LocalResult(up, acc, loss, time.perf_counter() - t0, q0 + time.perf_counter() - t1)
    d = wire.decode_download(download)
    if d.client_id != client_id or d.round != round_:
        raise ValueError(f"the download is for client {d.client_id} round {d.round}, not {client_id} round {round_}")
    model = builder(quantized=True, bits=1)
    load_download(model, d)  # sets every layer's bit-width from the download
    model.to(dev)
    assigned = [layer.bits for _, layer in qn.bit_layers(model)]
    q0 = time.perf_counter() - t0
    acc, loss, opt_s = train_local(model, x, y, cfg, client_id, round_, quantized=True, on_epoch=on_epoch)
    t1 = time.perf_counter() - opt_s
    deltas = {}
    for (name, layer), a in zip(qn.bit_layers(model), assigned):
        if cfg.alg == "fedmpq":
            layer.reduce_precision(cfg.threshold)
        deltas[f"{name}.weight"] = a - layer.bits
    up = wire.encode_upload(make_upload(model, client_id, round_, len(y), budget, deltas))
    return LocalResult(up, acc, loss, time.perf_counter() - t0, q0 + time.perf_counter() - t1)
