"""The server of a federation (ALGORITHM.md, "Server round"), transport-free: downloads out,
uploads in, bytes only. The bit-reassignment arithmetic it applies is :mod:`fedmpq.allocation`;
the streaming aggregation of uploads is :mod:`fedmpq.aggregate`."""
from __future__ import annotations

import logging
import numbers
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import aggregate as agg_mod
from . import nn as qn
from . import wire
from .allocation import _budget, initial_assignment, next_assignments

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
        rule: the aggregation rule, one of :data:`fedmpq.aggregate.RULES` (``median`` and
            ``trimmed_mean`` are unweighted).

    A faulty client cannot stop a round: an upload that does not decode, claims another
    client or round, states another budget or sample count than the server has for that
    client, does not hold exactly the model's entries and shapes (the layout comes from this
    server's model, not from the first upload), states bit-widths other than those it was sent
    (N + Delta per layer; Delta 0 but under fedmpq), or carries a value that is not finite (or so
    large that the round's float32 sums would overflow) is left out with a logged reason, and the others are aggregated. A round with no valid upload
    keeps the model and the bit-widths.

    Raises:
        ValueError: an unknown algorithm, weighting or rule; ``budgets`` or ``num_samples``
            not a mapping of client ids (ints >= 0); a budget that is not a finite number in
            [1, 8]; or a client of ``budgets`` without a sample count of at least 1 in
            ``num_samples``.
    """

    def __init__(self, alg: str, build, budgets: Mapping[int, float], num_samples: Mapping[int, int], seed: int = 0,
                 weighting: str = "mean", rule: str = "mean", device="cpu"):
        if alg not in ("fedmpq", "aqfl", "fp8", "fp"):
            raise ValueError(f"unknown algorithm {alg!r}")
        agg_mod.Aggregator(weighting, rule)  # refuses a bad weighting or rule now, not in round 1
        self.alg, self.build, self.weighting, self.rule = alg, build, weighting, rule
        self.device = torch.device(device)
        # What each client's upload states (its own beta_k, also under fp8), and what the
        # server assigns with (fp8: 8 for everyone).
        # all checked here, whatever the algorithm: under fp8 a NaN budget left every upload out
        # (its stated budget never equal), a list was "has no attribute 'items'", int() took a
        # client id of 1.5 as 1
        for what, m in (("budgets", budgets), ("num_samples", num_samples)):
            if not isinstance(m, Mapping):
                raise ValueError(f"{what} must be a mapping (client id -> value), got {type(m).__name__}")
            for k in m:
                if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                    raise ValueError(f"{what}: a client id must be an int >= 0, got {k!r}")
        for k, v in budgets.items():
            _budget(v, f"budgets[{k}]")
        self.client_budgets = {int(k): v for k, v in budgets.items()}
        self.budgets = {k: (8 if alg == "fp8" else v) for k, v in self.client_budgets.items()}
        self.num_samples = {int(k): v for k, v in num_samples.items()}
        for k in self.budgets:
            d = self.num_samples.get(k)
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
                raise ValueError(f"num_samples[{k}] must be an integer >= 1, got {d!r}")
        torch.manual_seed(seed)
        self.global_state = {k: v.detach().clone() for k, v in build(quantized=False).state_dict().items()}
        qm = build(quantized=True, bits=1)
        self.layer_sizes = {f"{n}.weight": m.numel for n, m in qn.bit_layers(qm)}
        self.layout = agg_mod.model_layout(self.global_state, self.layer_sizes if alg != "fp" else ())
        sizes = list(self.layer_sizes.values())
        self.assignments: Dict[int, List[int]] = {}
        if alg != "fp":
            self.assignments = {k: initial_assignment(b, len(sizes), sizes) for k, b in self.budgets.items()}

    def downloads(self, round_: int, clients: Sequence[int]) -> Dict[int, bytes]:
        """Each client's download: the global model, its quantized layers binarized at the
        client's bit-widths (a float32 ``Model`` for ``fp``). ValueError for a client the
        server does not have (it was a bare KeyError)."""
        clients = _known(clients, self.budgets)
        if self.alg == "fp":
            data = wire.encode_model(wire.Model(round_, self.global_state))
            return {k: data for k in clients}
        floats = {k: v for k, v in self.global_state.items() if k not in self.layer_sizes}
        # A layer binarized once per bit-width, whoever gets it: the clients share a handful of
        # widths, so this does a few of the K binarizations (read-only: encoding never writes it).
        binarized: Dict[Tuple[str, int], wire.QuantizedTensor] = {}
        out = {}
        for k in clients:
            layers = {}
            for name, b in zip(self.layer_sizes, self.assignments[k]):
                q = binarized.get((name, b))
                if q is None:
                    q = binarized[(name, b)] = wire.QuantizedTensor.from_float(self.global_state[name], b)
                layers[name] = q
            out[k] = wire.encode_download(wire.Download(k, round_, layers, floats))
        return out

    def aggregate(self, round_: int, uploads: Mapping[int, bytes]) -> Dict[str, object]:
        """Aggregate one round's uploads; a payload that does not decode, or claims another
        client or round, is left out with a logged reason. Nobody left: the previous model
        is kept (and said so). Returns ``{"bits": {client: [N per layer]}, "mean_bits":
        {client: size-weighted mean}, "assigned_mean_bits": {client: size-weighted mean of the
        bit-widths it gets next round}, "reported": [...], "seconds": quantization work}``
        (``assigned_mean_bits`` is absent for ``fp`` and when nobody reported). TypeError
        when ``uploads`` is not a mapping."""
        if not isinstance(uploads, Mapping):  # "'list' object has no attribute 'items'"
            raise TypeError(f"uploads must be a mapping (client id -> upload bytes), got {type(uploads).__name__}")
        t0 = time.perf_counter()
        report: Dict[str, object] = {"bits": {}, "mean_bits": {}, "reported": [], "seconds": 0.0}
        if self.alg == "fp":
            states = []
            for k, data in uploads.items():
                try:
                    if k not in self.budgets:
                        raise wire.WireFormatError("the server has no such client")
                    m = wire.decode_model(data)
                    if m.round != round_:  # a model payload names no client, but its round
                        raise wire.WireFormatError(f"the model says it is of round {m.round}, expected round {round_}")
                    self._check_model(m)
                except (wire.WireFormatError, ValueError) as e:
                    log.warning("round %d: the upload of client %r is left out: %s", round_, k, e)
                    continue
                states.append((k, m.tensors))
            if not states:
                log.warning("round %d: no client reported; the global model is unchanged", round_)
            else:
                self.global_state = self._combine_models(states)
                report["reported"] = [k for k, _ in states]
            report["seconds"] = time.perf_counter() - t0
            return report
        agg = agg_mod.Aggregator(self.weighting, self.rule, expected=self.layout)
        for k, data in uploads.items():
            try:
                if k not in self.budgets:
                    raise wire.WireFormatError("the server has no such client")
                # checked whole (its budget and sample count too) before anything is added
                agg.add(data, client_id=k, round_=round_, budget=self.client_budgets[k],
                        num_samples=self.num_samples[k], assigned=dict(zip(self.layer_sizes, self.assignments[k])),
                        may_prune=self.alg == "fedmpq")
            except (wire.WireFormatError, ValueError) as e:  # %r: a key of another type is logged, not an error
                log.warning("round %d: the upload of client %r is left out: %s", round_, k, e)
        if agg.count == 0:
            log.warning("round %d: no client reported; the global model and bit-widths are unchanged", round_)
            report["seconds"] = time.perf_counter() - t0
            return report
        result = agg.result()
        if self.alg == "fedmpq":  # before the model changes: a round is applied whole or not at all
            assignments = next_assignments(agg.stats, self.budgets, self.layer_sizes)
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
            self.assignments = assignments
        report["assigned_mean_bits"] = {k: mean_bits(b) for k, b in sorted(self.assignments.items())}
        report["seconds"] = time.perf_counter() - t0
        return report

    def _check_model(self, m: wire.Model) -> None:
        """A float upload (``fp``) must hold the global model's entries, shapes and dtypes,
        all finite; raises :class:`fedmpq.wire.WireFormatError` naming the first that is not."""
        missing = sorted(set(self.global_state) - set(m.tensors))
        extra = sorted(set(m.tensors) - set(self.global_state))
        if missing or extra:
            raise wire.WireFormatError(f"the model's entries differ from the global model's: missing {missing[:3]}, "
                                       f"unexpected {extra[:3]}")
        for name, ref in self.global_state.items():
            t = m.tensors[name]
            if t.shape != ref.shape or t.is_floating_point() != ref.is_floating_point():
                raise wire.WireFormatError(f"{name}: expected {ref.dtype} {tuple(ref.shape)}, got {t.dtype} "
                                           f"{tuple(t.shape)}")
            why = _bad_values(name, t)
            if why:
                raise wire.WireFormatError(why)

    def _combine_models(self, states) -> Dict[str, torch.Tensor]:
        """The aggregation rule over float models ``[(client, state)]``, in float64."""
        new = {}
        for name, ref in self.global_state.items():
            if self.rule == "mean":
                wts = [self.num_samples[k] if self.weighting == "samples" else 1 for k, _ in states]
                acc = sum(s[name].double() * w for (_, s), w in zip(states, wts)) / sum(wts)
            else:
                acc = agg_mod.robust(torch.stack([s[name].double() for _, s in states]), self.rule)
            new[name] = acc.to(ref.dtype) if ref.is_floating_point() else agg_mod.int_mean(acc, ref.dtype)
        return new

    def evaluate(self, x, y, batch_size: int = 1000) -> float:
        """Global test accuracy: the float model with the global weights, in eval mode with
        the aggregated BatchNorm statistics (**deviation**: the authors test in train mode);
        quantized algorithms use ReLU6 and 16-bit activations, as the authors' server does."""
        model = self._eval_model()
        model.eval()
        x, y = x.to(self.device), y.to(self.device)  # no copy when the caller moved them once
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum()
        return int(correct) / max(len(y), 1)

    def evaluate_train_mode(self, x, y, batch_size: int = 128, seed: int = 0) -> float:
        """The authors' evaluation: BatchNorm in train mode (each test batch normalized by its
        own statistics), over a shuffled order, averaging the per-batch accuracy; reported
        beside :meth:`evaluate` so results compare with the paper's."""
        model = self._eval_model()
        model.train()
        x, y = x.to(self.device), y.to(self.device)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(self.device)
        accs = []
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm in train mode needs two samples
                accs.append((model(x[idx]).argmax(1) == y[idx]).float().mean())
        return sum(float(a) for a in accs) / max(len(accs), 1)  # one sync per batch only at the end

    def _eval_model(self) -> torch.nn.Module:
        # quantized algorithms: ReLU6 and 16-bit activations, as the authors' server
        model = self.build(quantized=False, act_bits=None if self.alg == "fp" else 16)
        model.load_state_dict(self.global_state)
        return model.to(self.device)

    def float32_bytes(self) -> int:
        """Bytes of the model as float32 (what float FedAvg sends each way per client)."""
        return 4 * sum(v.numel() for v in self.global_state.values())

    def state(self) -> Dict[str, object]:
        """What a checkpoint keeps: the global model and the bit assignments."""
        return {"global_state": self.global_state, "assignments": {str(k): v for k, v in self.assignments.items()}}

    def load_state(self, s: Mapping[str, object]) -> None:
        """Take a checkpoint's :meth:`state`; ``ValueError`` naming the first entry that does not
        fit this server's model and clients (nothing is taken then)."""
        if not isinstance(s, Mapping) or not isinstance(s.get("global_state"), Mapping) \
                or not isinstance(s.get("assignments"), Mapping):
            raise ValueError("the server state lacks global_state or assignments")
        glob = dict(s["global_state"])
        if set(glob) != set(self.global_state):
            raise ValueError(f"the global model's entries differ from this run's model: missing "
                             f"{sorted(set(self.global_state) - set(glob))[:3]}, unexpected "
                             f"{sorted(set(glob) - set(self.global_state))[:3]}")
        for name, ref in self.global_state.items():
            t = glob[name]
            if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected {ref.dtype} {tuple(ref.shape)}, got {what}")
            # the checks an upload gets: NaN stopped the next round's binarization with a
            # traceback, inf or a negative variance left every upload out of every round
            why = _bad_values(name, t)
            if why:
                raise ValueError(why)
        assignments = {}
        for k, v in dict(s["assignments"]).items():
            # lists of ints: "4444" was read as [4, 4, 4, 4], 4.7 as 4 and True as 1
            if (not (isinstance(k, str) and k.isascii() and k.isdigit()) or not isinstance(v, (list, tuple))
                    or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) for b in v)):
                raise ValueError("the bit assignments are not lists of integers per client")
            assignments[int(k)] = [int(b) for b in v]
        if set(assignments) != set(self.assignments):
            raise ValueError(f"the bit assignments are for clients {sorted(assignments)[:5]}, this run has "
                             f"{sorted(self.assignments)[:5]}")
        n_layers = len(self.layer_sizes)
        for k, v in assignments.items():
            if len(v) != n_layers or not all(1 <= b <= 8 for b in v):
                raise ValueError(f"client {k}'s bit assignment {v[:8]} is not {n_layers} widths in 1..8")
        self.global_state = glob
        self.assignments = assignments


def _bad_values(name: str, t: torch.Tensor) -> Optional[str]:
    """Why a float model's entry cannot be aggregated or resumed (NaN or inf; a negative value
    where there can be none, as the Aggregator refuses in an upload), or None."""
    if not t.is_floating_point() or not t.numel():
        return None
    if not bool(torch.isfinite(t).all()):
        return f"{name} holds NaN or inf"
    if agg_mod.is_nonnegative(name) and float(t.min()) < 0:
        return f"{name} holds a negative value"
    return None


def _known(clients, known: Mapping[int, object]) -> List[int]:
    """``clients`` as a list, every one a key of ``known``: ValueError naming one that is not
    (a bare KeyError else), TypeError for a str or a non-iterable."""
    if isinstance(clients, (str, bytes)) or not hasattr(clients, "__iter__"):
        raise TypeError(f"clients must be a sequence of client ids, got {type(clients).__name__}")
    clients = list(clients)
    for k in clients:
        if isinstance(k, bool) or k not in known:
            ids = sorted(known)
            raise ValueError(f"client {k!r} is not one of the server's {len(ids)} clients "
                             f"({', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''})")
    return clients
