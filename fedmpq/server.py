"""The server of a federation (ALGORITHM.md, "Server round"), transport-free: downloads out,
uploads in, bytes only. The bit-reassignment arithmetic it applies is :mod:`fedmpq.allocation`;
the streaming aggregation of uploads is :mod:`fedmpq.aggregate`."""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Mapping, Sequence

import torch

from . import aggregate as agg_mod
from . import nn as qn
from . import wire
from .allocation import initial_assignment, next_assignments

log = logging.getLogger("fedmpq")


class Server:
    """The server side of the rounds (ALGORITHM.md, "Server round"), transport-free: it makes
    each sampled client's download (bytes), aggregates the uploads (bytes) it receives, and
    reassigns bit-widths; :mod:`fedmpq.federation` runs its rounds over a transport.

    Args:
        alg: ``fedmpq`` (reassignment every round), ``aqfl`` (every layer at the client's
            budget, fixed), ``fp8`` (every layer at 8 bits) or ``fp`` (float FedAvg).
        build: ``build(quantized, bits=..., act_bits=None)`` makes the model.
        budgets: beta_k per client id.  num_samples: |D_k| per client id.
        seed: seeds the global model's initialization.
        weighting: ``"mean"`` (the authors' unweighted mean) or ``"samples"``.
    """

    def __init__(self, alg: str, build, budgets: Mapping[int, float], num_samples: Mapping[int, int], seed: int = 0,
                 weighting: str = "mean"):
        if alg not in ("fedmpq", "aqfl", "fp8", "fp"):
            raise ValueError(f"unknown algorithm {alg!r}")
        self.alg, self.build, self.weighting = alg, build, weighting
        self.budgets = {int(k): (8 if alg == "fp8" else v) for k, v in budgets.items()}
        self.num_samples = dict(num_samples)
        torch.manual_seed(seed)
        self.global_state = {k: v.detach().clone() for k, v in build(quantized=False).state_dict().items()}
        qm = build(quantized=True, bits=1)
        self.layer_sizes = {f"{n}.weight": m.numel for n, m in qn.bit_layers(qm)}
        sizes = list(self.layer_sizes.values())
        self.assignments: Dict[int, List[int]] = {}
        if alg != "fp":
            self.assignments = {k: initial_assignment(b, len(sizes), sizes) for k, b in self.budgets.items()}

    def downloads(self, round_: int, clients: Sequence[int]) -> Dict[int, bytes]:
        """Each client's download: the global model, its quantized layers binarized at the
        client's bit-widths (a float32 ``Model`` for ``fp``)."""
        if self.alg == "fp":
            data = wire.encode_model(wire.Model(round_, self.global_state))
            return {k: data for k in clients}
        floats = {k: v for k, v in self.global_state.items() if k not in self.layer_sizes}
        out = {}
        for k in clients:
            layers = {name: wire.QuantizedTensor.from_float(self.global_state[name], b)
                      for name, b in zip(self.layer_sizes, self.assignments[k])}
            out[k] = wire.encode_download(wire.Download(k, round_, layers, floats))
        return out

    def aggregate(self, round_: int, uploads: Mapping[int, bytes]) -> Dict[str, object]:
        """Aggregate one round's uploads; a payload that does not decode, or claims another
        client or round, is left out with a logged reason. Nobody left: the previous model
        is kept (and said so). Returns ``{"bits": {client: [N per layer]}, "mean_bits":
        {client: size-weighted mean}, "assigned_mean_bits": {client: size-weighted mean of the
        bit-widths it gets next round}, "reported": [...], "seconds": quantization work}``
        (``assigned_mean_bits`` is absent for ``fp`` and when nobody reported)."""
        t0 = time.perf_counter()
        report: Dict[str, object] = {"bits": {}, "mean_bits": {}, "reported": [], "seconds": 0.0}
        if self.alg == "fp":
            states = []
            for k, data in uploads.items():
                try:
                    m = wire.decode_model(data)
                    if set(m.tensors) != set(self.global_state):
                        raise wire.WireFormatError("the model's entries differ from the global model's")
                except (wire.WireFormatError, ValueError) as e:
                    log.warning("round %d: the upload of client %d is left out: %s", round_, k, e)
                    continue
                states.append((k, m.tensors))
            if not states:
                log.warning("round %d: no client reported; the global model is unchanged", round_)
            else:
                total = sum(self.num_samples[k] for k, _ in states) if self.weighting == "samples" else len(states)
                new = {}
                for name, ref in self.global_state.items():
                    acc = sum((s[name].double() * (self.num_samples[k] if self.weighting == "samples" else 1))
                              for k, s in states) / total
                    new[name] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
                self.global_state = new
                report["reported"] = [k for k, _ in states]
            report["seconds"] = time.perf_counter() - t0
            return report
        agg = agg_mod.Aggregator(self.weighting)
        for k, data in uploads.items():
            try:
                agg.add(data, client_id=k, round_=round_)  # checked whole before anything is added
            except (wire.WireFormatError, ValueError) as e:
                log.warning("round %d: the upload of client %d is left out: %s", round_, k, e)
        if agg.count == 0:
            log.warning("round %d: no client reported; the global model and bit-widths are unchanged", round_)
            report["seconds"] = time.perf_counter() - t0
            return report
        result = agg.result()
        self.global_state = {k: result[k].to(v.dtype) for k, v in self.global_state.items()}
        names = list(self.layer_sizes)
        sizes = list(self.layer_sizes.values())

        def mean_bits(b: List[int]) -> float:  # weighted by each layer's weights
            return sum(x * s for x, s in zip(b, sizes)) / sum(sizes)

        for st in agg.stats:
            b = [st.bits[n] for n in names]
            report["bits"][st.client_id] = b
            report["mean_bits"][st.client_id] = mean_bits(b)
        report["reported"] = [st.client_id for st in agg.stats]
        if self.alg == "fedmpq":
            self.assignments = next_assignments(agg.stats, self.budgets, self.layer_sizes)
        report["assigned_mean_bits"] = {k: mean_bits(b) for k, b in sorted(self.assignments.items())}
        report["seconds"] = time.perf_counter() - t0
        return report

    def evaluate(self, x, y, batch_size: int = 1000) -> float:
        """Global test accuracy: the float model with the global weights, in eval mode with
        the aggregated BatchNorm statistics (**deviation**: the authors test in train mode);
        quantized algorithms use ReLU6 and 16-bit activations, as the authors' server does."""
        model = self.build(quantized=False, act_bits=None if self.alg == "fp" else 16)
        model.load_state_dict(self.global_state)
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
        return correct / max(len(y), 1)

    def evaluate_train_mode(self, x, y, batch_size: int = 128, seed: int = 0) -> float:
        """The authors' evaluation: BatchNorm in train mode (each test batch normalized by its
        own statistics), over a shuffled order, averaging the per-batch accuracy; reported
        beside :meth:`evaluate` so results compare with the paper's."""
        model = self.build(quantized=False, act_bits=None if self.alg == "fp" else 16)
        model.load_state_dict(self.global_state)
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        accs = []
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm in train mode needs two samples
                accs.append(float((model(x[idx]).argmax(1) == y[idx]).float().mean()))
        return sum(accs) / max(len(accs), 1)

    def float32_bytes(self) -> int:
        """Bytes of the model as float32 (what float FedAvg sends each way per client)."""
        return 4 * sum(v.numel() for v in self.global_state.values())

    def state(self) -> Dict[str, object]:
        """What a checkpoint keeps: the global model and the bit assignments."""
        return {"global_state": self.global_state, "assignments": {str(k): v for k, v in self.assignments.items()}}

    def load_state(self, s: Mapping[str, object]) -> None:
        self.global_state = dict(s["global_state"])
        self.assignments = {int(k): list(v) for k, v in dict(s["assignments"]).items()}
