"""Bit reassignment arithmetic: client weights, round statistics and pruning-or-growing.

ALGORITHM.md, "Server round", steps 2-4, as plain functions of the per-client statistics
that :class:`fedmpq.aggregate.Aggregator` returns; :class:`fedmpq.server.Server` calls them (each reporter's N and Delta per layer,
its sample count and budget):

* :func:`client_weights`: omega_k = |D_k| beta_k / sum_j |D_j| beta_j over the clients that
  reported this round (**[deviation]** the authors normalize over all clients).
* :func:`round_statistics`: b_bar_l = round(sum_k omega_k N_kl),
  delta_bar_l = round(sum_k omega_k Delta_kl + 1), priority p_l = w_l delta_bar_l.
* :func:`allocate_bits`: pruning-or-growing from b_bar toward one client's budget.
* :func:`next_assignments`: all of it, for every client (reporters or not).
* :func:`initial_assignment`: round 1, N_kl = beta_k.

Arithmetic is exact wherever a float could flip a decision:

* ``round`` is Python's (half to even), applied to the *exact* weighted sums (as
  :class:`fractions.Fraction`), so a sum that is exactly x.5 in exact arithmetic rounds to
  even; a float sum (the authors') can land an ulp on either side of it.
* The budget test "avg > beta" is made as the integer comparison
  ``sum_l n_l b_l`` against ``beta * sum_l n_l``, beta taken at its exact binary value
  (``Fraction(beta)``; a float32 budget from the wire is used as the float it is).
* The priorities this module computes are ``n_l delta_bar_l / sum n`` correctly rounded,
  so layers with equal exact priorities get equal floats and tie (ties go to the lowest
  layer index).
"""
from __future__ import annotations

import math
import numbers
import struct
from fractions import Fraction
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from fedmpq_kernels import MAX_BITS, MIN_BITS


# ---- validation helpers ------------------------------------------------------------------
def _int(v, what: str) -> int:
    """An integer value (int, numpy integer, or an integral float such as 4.0)."""
    if isinstance(v, bool):
        raise ValueError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
        return int(v)
    raise ValueError(f"{what} must be an integer, got {v!r}")


def _real(v, what: str) -> Fraction:
    """A finite real as its exact value."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {v!r}")
    if isinstance(v, numbers.Rational):
        return Fraction(int(v.numerator), int(v.denominator))
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, got {v!r}")
    return Fraction(f)


def _seq(v, what: str) -> list:
    """A sequence argument as a list; ValueError naming it for anything else (a number was
    "'int' object is not iterable"; a str or a mapping would be read as its characters or
    keys). ValueError, as for every bad value here: the server refuses a faulty client's
    report on it."""
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{what} must be a sequence, got {type(v).__name__}")
    return list(v)


def _map(v, what: str) -> Mapping:
    """A mapping argument (client -> value); ValueError naming it for anything else (a list
    was "'list' object has no attribute 'items'")."""
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} must be a mapping (client -> value), got {type(v).__name__}")
    return v


def _budget(v, what: str = "budget") -> Fraction:
    b = _real(v, what)
    if not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"{what} must be in [{MIN_BITS}, {MAX_BITS}], got {v!r}")
    return b


def _sizes(layer_sizes: Sequence[int]) -> List[int]:
    sizes = [_int(n, f"layer_sizes[{i}]") for i, n in enumerate(_seq(layer_sizes, "layer_sizes"))]
    if not sizes:
        raise ValueError("layer_sizes is empty: there must be at least one quantized layer")
    bad = [i for i, n in enumerate(sizes) if n <= 0]
    if bad:
        raise ValueError(f"layer_sizes must be > 0, layer {bad[0]} has {sizes[bad[0]]}")
    return sizes


def _bits_list(bits: Sequence[int], n: int, what: str, lo: int = MIN_BITS, hi: int = MAX_BITS) -> List[int]:
    out = [_int(b, f"{what}[{i}]") for i, b in enumerate(_seq(bits, what))]
    if len(out) != n:
        raise ValueError(f"{what} has {len(out)} entries, layer_sizes has {n}")
    bad = [i for i, b in enumerate(out) if not lo <= b <= hi]
    if bad:
        raise ValueError(f"{what}[{bad[0]}] = {out[bad[0]]} is outside {lo}..{hi}")
    return out


# ---- step 4: pruning-or-growing ------------------------------------------------------------
def allocate_bits(avg_bits: Sequence[int], priority: Sequence[float], layer_sizes: Sequence[int],
                  budget: float) -> List[int]:
    """Pruning-or-growing (ALGORITHM.md, "Server round", step 4) for one client.

    Args:
        avg_bits: the starting bit-width of every layer, b_bar_l (the rounded weighted average
            of the reporters' bit-widths, :func:`round_statistics`), integers in 1..8. Named
            as the issue names it; it is one value per layer, not a scalar.
        priority: p_l per layer (finite reals; :func:`round_statistics` gives w_l delta_bar_l).
            Compared as given.
        layer_sizes: n_l, the number of weights of each layer (> 0); w_l = n_l / sum n.
        budget: the client's average-bit budget beta_k, in [1, 8].

    Returns:
        The client's new bit-widths, one int in 1..8 per layer.

    With avg = sum_l w_l b_l:

    1. Pruning: while avg > budget, take one bit from the layer with the highest priority
       among those above 1 bit; stop when every layer is at 1.
    2. Then growing: while avg < budget, add one bit to the layer with the lowest priority
       among those below 8; stop when every layer is at 8.

    Ties go to the lowest layer index. Pruning stops at or below the budget (by less than one
    layer's share), so growing may then add one bit back: the result is at or above the
    budget by less than the share of the layer that got the last bit (below it only when
    every layer is at 8, above it only when every layer is at 1 or growing added a bit).
    The priorities never change during the allocation, so each phase exhausts one layer
    before it moves to the next, as the authors' cursor does.

    The comparisons are exact: ``sum_l n_l b_l`` (an int) against ``Fraction(budget) *
    sum n``.

    Raises:
        ValueError: lengths differ or are zero, a bit-width is outside 1..8, a priority is
            not finite, a size is not a positive integer, or the budget is outside [1, 8].
    """
    sizes = _sizes(layer_sizes)
    n = len(sizes)
    bits = _bits_list(avg_bits, n, "avg_bits")
    prio = _seq(priority, "priority")
    if len(prio) != n:
        raise ValueError(f"priority has {len(prio)} entries, layer_sizes has {n}")
    for i, p in enumerate(prio):
        _real(p, f"priority[{i}]")  # finite real, compared as given
    target = _budget(budget) * sum(sizes)
    cur = sum(s * b for s, b in zip(sizes, bits))

    # Pruning: highest priority first, ties to the lowest index.
    for i in sorted(range(n), key=lambda i: (-prio[i], i)):
        if cur <= target:
            break
        while bits[i] > MIN_BITS and cur > target:
            bits[i] -= 1
            cur -= sizes[i]
    # Growing: lowest priority first, ties to the lowest index.
    for i in sorted(range(n), key=lambda i: (prio[i], i)):
        if cur >= target:
            break
        while bits[i] < MAX_BITS and cur < target:
            bits[i] += 1
            cur += sizes[i]
    return bits


# ---- step 2: client weights ----------------------------------------------------------------
def _raw_weights(num_samples: Mapping[int, int], budgets: Mapping[int, float]) -> Dict[int, Fraction]:
    """|D_k| beta_k, exact, for every client in num_samples."""
    out = {}
    _map(budgets, "budgets")
    for k, d in _map(num_samples, "num_samples").items():
        d = _int(d, f"num_samples[{k!r}]")
        if d < 0:
            raise ValueError(f"num_samples[{k!r}] must be >= 0, got {d}")
        if k not in budgets:
            raise ValueError(f"no budget for client {k!r}")
        out[k] = d * _budget(budgets[k], f"budgets[{k!r}]")
    if not out:
        raise ValueError("no client reported: there are no weights to compute")
    if sum(out.values()) <= 0:
        raise ValueError("the reporting clients hold no samples: their weights are undefined")
    return out


def client_weights(num_samples: Mapping[int, int], budgets: Mapping[int, float]) -> Dict[int, float]:
    """omega_k = |D_k| beta_k / sum_j |D_j| beta_j over the clients in ``num_samples``.

    Args:
        num_samples: |D_k| of every client that reported this round (the weights are
            normalized over these only; ALGORITHM.md step 2, a deviation from the authors,
            who normalize over all clients).
        budgets: beta_k of at least those clients (others are ignored).

    Returns:
        omega_k per reporting client (summing to 1 up to float rounding; computed exactly,
        then rounded once).

    Raises:
        ValueError: no client, a negative or non-integer sample count, a missing budget or one
            outside [1, 8], or no samples at all.
    """
    raw = _raw_weights(num_samples, budgets)
    total = sum(raw.values())
    return {k: float(v / total) for k, v in raw.items()}


# ---- step 3: round statistics --------------------------------------------------------------
def round_statistics(bits: Mapping[int, Sequence[int]], deltas: Mapping[int, Sequence[int]],
                     weights: Mapping[int, float], layer_sizes: Sequence[int]
                     ) -> Tuple[List[int], List[int], List[float]]:
    """b_bar, delta_bar and the layer priorities from the reporters' statistics.

    Args:
        bits: per reporting client, its N per layer as uploaded (after its precision
            reduction, :attr:`fedmpq.aggregate.ClientStats.bits`), ints in 1..8.
        deltas: per reporting client (the same clients), its Delta per layer, ints in 0..7.
        weights: a weight per reporting client, e.g. :func:`client_weights` or the raw
            |D_k| beta_k; keys beyond the reporters are ignored, and the reporters' weights are
            renormalized to sum to 1 (exactly, as fractions of the values given). Pass the raw
            products (as :func:`next_assignments` does) for sums that are exact: the floats
            of :func:`client_weights` are each rounded once, so a sum that is exactly x.5
            with the true weights can be an ulp off with them.
        layer_sizes: n_l per layer.

    Returns:
        ``(b_bar, delta_bar, priority)``, one entry per layer:
        b_bar_l = round(sum_k omega_k N_kl), delta_bar_l = round(sum_k omega_k Delta_kl + 1)
        (Python's round, half to even, of the exact sums) and
        p_l = w_l delta_bar_l = n_l delta_bar_l / sum n (correctly rounded float).

    Raises:
        ValueError: no reporter, ``bits`` and ``deltas`` name different clients, a missing,
            negative or non-finite weight, weights summing to 0, a list of the wrong length,
            or a value out of range.
    """
    sizes = _sizes(layer_sizes)
    n = len(sizes)
    bits, deltas, weights = _map(bits, "bits"), _map(deltas, "deltas"), _map(weights, "weights")
    if not bits:
        raise ValueError("no client reported: there are no statistics to compute")
    if set(bits) != set(deltas):
        raise ValueError(f"bits and deltas name different clients: {sorted(set(bits) ^ set(deltas), key=repr)[:5]}")
    w = {}
    for k in bits:
        if k not in weights:
            raise ValueError(f"no weight for client {k!r}")
        w[k] = _real(weights[k], f"weights[{k!r}]")
        if w[k] < 0:
            raise ValueError(f"weights[{k!r}] must be >= 0, got {weights[k]!r}")
    total = sum(w.values())
    if total <= 0:
        raise ValueError("the reporting clients' weights sum to 0")
    sum_b = [Fraction(0)] * n
    sum_d = [Fraction(0)] * n
    for k in bits:
        om = w[k] / total
        b = _bits_list(bits[k], n, f"bits[{k!r}]")
        d = _bits_list(deltas[k], n, f"deltas[{k!r}]", 0, MAX_BITS - MIN_BITS)
        sum_b = [s + om * x for s, x in zip(sum_b, b)]
        sum_d = [s + om * x for s, x in zip(sum_d, d)]
    b_bar = [round(s) for s in sum_b]
    delta_bar = [round(s + 1) for s in sum_d]
    tot_n = sum(sizes)
    priority = [nl * dl / tot_n for nl, dl in zip(sizes, delta_bar)]  # int / int: correctly rounded
    return b_bar, delta_bar, priority


# ---- everything, per client ---------------------------------------------------------------
def next_assignments(stats: Union[Iterable, Mapping], budgets: Mapping[int, float],
                     layer_sizes: Mapping[str, int]) -> Dict[int, List[int]]:
    """Every client's bit-widths for the next round (ALGORITHM.md steps 2-4).

    Args:
        stats: the reporters' :class:`fedmpq.aggregate.ClientStats` (``Aggregator.stats``),
            an iterable, or a mapping whose values are they; one per client.
        budgets: beta_k of every client to assign, reporters or not, in [1, 8]. A client that
            did not report this round gets its assignment from the same b_bar and priorities
            with its own budget. A reporter's budget must be the one it uploaded (equal, or
            equal after rounding to float32 as the wire stores it).
        layer_sizes: n_l of every quantized layer, by name, in the model's layer order (the
            order of the returned lists); each reporter's ``bits`` and ``deltas`` must name
            exactly these layers.

    Returns:
        ``{client: [N_l per layer, in layer_sizes' order]}``, for every client in ``budgets``
        (in its order).

    Raises:
        ValueError: no reporter, a client reported twice, a reporter without a budget or with
            a different one, layer names that do not match, or any value out of range.
    """
    if isinstance(stats, Mapping):
        stats = stats.values()
    stats = _seq(stats, "stats")
    budgets, layer_sizes = _map(budgets, "budgets"), _map(layer_sizes, "layer_sizes")
    if not stats:
        raise ValueError("no client reported this round: keep the previous assignments")
    names = list(layer_sizes)
    sizes = _sizes([layer_sizes[nm] for nm in names])
    bits, deltas, samples = {}, {}, {}
    for st in stats:
        k = st.client_id
        if k in bits:
            raise ValueError(f"client {k!r} reported twice")
        if k not in budgets:
            raise ValueError(f"client {k!r} reported but has no budget")
        if not same_budget(st.budget, budgets[k]):
            raise ValueError(f"client {k!r} uploaded budget {st.budget}, the server has {budgets[k]}")
        for what, m in (("bits", st.bits), ("deltas", st.deltas)):
            if set(m) != set(names):
                diff = sorted(set(m) ^ set(names))[:3]
                raise ValueError(f"client {k!r}: {what} name other layers than layer_sizes: {diff}")
        bits[k] = [st.bits[nm] for nm in names]
        deltas[k] = [st.deltas[nm] for nm in names]
        samples[k] = st.num_samples
    weights = _raw_weights(samples, budgets)  # exact; round_statistics normalizes
    b_bar, _, priority = round_statistics(bits, deltas, weights, sizes)
    return {k: allocate_bits(b_bar, priority, sizes, beta) for k, beta in budgets.items()}


def same_budget(stated: float, budget) -> bool:
    """Whether ``stated`` (an upload's budget) is ``budget``: equal, or equal after rounding
    to float32 as the wire stores it (NaN is never the same)."""
    return stated == budget or stated == _float32(budget)


def _float32(v) -> float:
    """v rounded to float32, as the wire stores a budget (NaN when it does not convert)."""
    try:
        return struct.unpack("<f", struct.pack("<f", float(v)))[0]
    except (OverflowError, TypeError, ValueError):
        return math.nan


# ---- round 1 --------------------------------------------------------------------------------
def initial_assignment(budget: float, n_layers: int, layer_sizes: Optional[Sequence[int]] = None) -> List[int]:
    """Round 1: N_kl = beta_k for every layer (ALGORITHM.md, "Setting").

    Args:
        budget: beta_k in [1, 8]. The paper's budgets are integers (4 or 4.0 both work).
        n_layers: L, the number of quantized layers (>= 1).
        layer_sizes: n_l, needed only for a budget that is not an integer.

    A budget that is not an integer (an extension: the paper has none) starts every layer at
    round(beta_k) (half to even) and then runs :func:`allocate_bits` toward beta_k with
    priorities w_l, i.e. the priorities of a round in which every Delta is 0 (delta_bar = 1,
    the authors' initial Delta); e.g. beta = 2.5 over four equal layers gives [4, 2, 2, 2].

    Raises:
        ValueError: budget outside [1, 8], n_layers < 1, layer_sizes of another length, or a
            non-integer budget without layer_sizes.
    """
    beta = _budget(budget)
    n = _int(n_layers, "n_layers")
    if n < 1:
        raise ValueError(f"n_layers must be >= 1, got {n}")
    sizes = None
    if layer_sizes is not None:
        sizes = _sizes(layer_sizes)
        if len(sizes) != n:
            raise ValueError(f"layer_sizes has {len(sizes)} entries, n_layers is {n}")
    if beta.denominator == 1:
        return [int(beta)] * n
    if sizes is None:
        raise ValueError(f"budget {budget!r} is not an integer: layer_sizes are needed to meet it")
    total = sum(sizes)
    return allocate_bits([round(beta)] * n, [s / total for s in sizes], sizes, budget)
