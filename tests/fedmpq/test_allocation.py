"""Server bit reassignment (ALGORITHM.md, "Server round", steps 2-4): hand-computed cases of
pruning-or-growing, client weights renormalized over the reporters, the round statistics
with Python's half-to-even rounding, the whole step per client, round 1, invalid inputs,
and a randomized check against a literal step-by-step statement of the rule.

Notation in the comments: n = layer sizes (S = sum n), b = bit-widths, cur = sum n_l b_l,
target = beta * S; avg = cur / S."""
from __future__ import annotations

import functools
import operator
import random
from fractions import Fraction

import pytest

from fedmpq import allocation
from fedmpq.aggregate import ClientStats

SIZES4 = [10, 20, 30, 40]  # S = 100, w = [0.1, 0.2, 0.3, 0.4]


def float_sum(xs):
    """Left-to-right float addition, the sum an inexact implementation makes (a loop of
    ``+=``; Python's ``sum`` of floats did this before 3.12, and compensates from 3.12 on)."""
    return functools.reduce(operator.add, xs, 0.0)


# ---- allocate_bits: hand-computed -------------------------------------------------------
def test_pruning_then_growing_back():
    # b = [4,4,4,4]: cur 400, beta 3 -> target 300. Priorities [0.1, 0.4, 0.3, 0.2]:
    # pruning order layer1 (0.4), layer2 (0.3), layer3, layer0.
    #   layer1 (n 20): 4->3 (380), 3->2 (360), 2->1 (340); at 1: skipped from now on.
    #   layer2 (n 30): 4->3 (310), 3->2 (280) <= 300: stop. b = [4,1,2,4], avg 2.8 < 3.
    # growing (lowest priority first: layer0 0.1): layer0 (n 10): 4->5 (290), 5->6 (300): stop.
    got = allocation.allocate_bits([4, 4, 4, 4], [0.1, 0.4, 0.3, 0.2], SIZES4, 3)
    assert got == [6, 1, 2, 4]
    assert sum(n * b for n, b in zip(SIZES4, got)) == 300  # avg exactly 3.0


def test_growing_skips_layers_at_8_and_ties_to_lowest_index():
    # b = [2,2,2,2]: cur 200, beta 3.5 -> target 350. Priorities [0.3, 0.1, 0.1, 0.4]:
    # growing order layer1 (0.1, tie with layer2: lowest index first), layer2, layer0, layer3.
    #   layer1 (n 20): 2->8 adds 6*20 = 120 -> 320; at 8: skipped.
    #   layer2 (n 30): 2->3 -> 350 >= 350: stop.
    assert allocation.allocate_bits([2, 2, 2, 2], [0.3, 0.1, 0.1, 0.4], SIZES4, 3.5) == [2, 8, 3, 2]


def test_pruning_ties_to_lowest_index():
    # equal sizes and priorities, b = [3,3,3]: cur 9, beta 2 -> target 6.
    # layer0: 3->2 (8), 2->1 (7); layer1: 3->2 (6): stop.
    assert allocation.allocate_bits([3, 3, 3], [1.0, 1.0, 1.0], [1, 1, 1], 2) == [1, 2, 3]
    # growing, same ties: b = [3,3,3] -> target 12: layer0 3->6.
    assert allocation.allocate_bits([3, 3, 3], [1.0, 1.0, 1.0], [1, 1, 1], 4) == [6, 3, 3]


def test_pruning_skips_layers_at_1():
    # b = [1,5,5], priorities [9,2,1], n = 1 each: cur 11, beta 2 -> target 6.
    # layer0 has the highest priority but is at 1: skipped. layer1: 5->1 (7); layer2: 5->4 (6).
    assert allocation.allocate_bits([1, 5, 5], [9, 2, 1], [1, 1, 1], 2) == [1, 1, 4]


def test_growing_skips_layers_at_8():
    # b = [8,2,2], priorities [0,1,2], n = 1 each: cur 12, beta 5 -> target 15.
    # layer0 has the lowest priority but is at 8: skipped. layer1: 2->5 (15).
    assert allocation.allocate_bits([8, 2, 2], [0, 1, 2], [1, 1, 1], 5) == [8, 5, 2]


def test_everything_exhausted():
    # beta 1: every layer pruned down to 1 (cur = S = target); beta 8: every layer up to 8.
    assert allocation.allocate_bits([8, 3, 5, 1], [0.4, 0.3, 0.2, 0.1], SIZES4, 1) == [1, 1, 1, 1]
    assert allocation.allocate_bits([1, 3, 5, 8], [0.4, 0.3, 0.2, 0.1], SIZES4, 8) == [8, 8, 8, 8]
    assert allocation.allocate_bits([8, 8, 8, 8], [0.4, 0.3, 0.2, 0.1], SIZES4, 8.0) == [8, 8, 8, 8]
    assert allocation.allocate_bits([1, 1, 1, 1], [0.4, 0.3, 0.2, 0.1], SIZES4, 1.0) == [1, 1, 1, 1]


def test_overshoot_by_less_than_one_layer_share():
    # b = [3,3,3,3]: cur 300, beta 3.05 -> target ~305. Priorities [0.4,0.3,0.2,0.1]: growing
    # takes layer3 (n 40): 3->4 -> 340 >= 305: stop. avg 3.4, over by 0.35 < w_3 = 0.4.
    got = allocation.allocate_bits([3, 3, 3, 3], [0.4, 0.3, 0.2, 0.1], SIZES4, 3.05)
    assert got == [3, 3, 3, 4]
    avg = Fraction(sum(n * b for n, b in zip(SIZES4, got)), 100)
    assert 0 <= avg - Fraction(3.05) < Fraction(40, 100)


def test_budget_already_met_changes_nothing():
    # b = [2,4,6,8]: cur 20 + 80 + 180 + 320 = 600, beta 6: neither loop runs.
    assert allocation.allocate_bits([2, 4, 6, 8], [0.1, 0.2, 0.3, 0.4], SIZES4, 6) == [2, 4, 6, 8]


def test_exact_comparison_where_a_float_sum_is_off():
    # n = [1,1,1], b = [8,6,7]: avg is exactly 7, but (1/3)*8 + (1/3)*6 + (1/3)*7 in floats
    # is 6.999999999999999 < 7, which would grow a bit. Exactly: the budget is met.
    assert float_sum((1 / 3) * b for b in [8, 6, 7]) < 7  # the float trap this guards against
    assert allocation.allocate_bits([8, 6, 7], [0.1, 0.2, 0.3], [1, 1, 1], 7) == [8, 6, 7]
    # n = [7,6,2], b = [8,4,5]: cur 90, S 15, avg exactly 6; the float sum is 6.000000000000001
    # > 6, which would prune a bit (and then grow another back elsewhere).
    assert float_sum((n / 15) * b for n, b in zip([7, 6, 2], [8, 4, 5])) > 6
    assert allocation.allocate_bits([8, 4, 5], [0.3, 0.2, 0.1], [7, 6, 2], 6) == [8, 4, 5]


def test_accepts_integral_floats_and_numpy_like_values():
    np = pytest.importorskip("numpy")
    got = allocation.allocate_bits(np.array([4, 4, 4, 4]), np.array([0.1, 0.4, 0.3, 0.2]), np.array(SIZES4), np.float32(3))
    assert got == [6, 1, 2, 4] and all(type(b) is int for b in got)
    assert allocation.allocate_bits([4.0, 4.0, 4.0, 4.0], [0.1, 0.4, 0.3, 0.2], SIZES4, 3) == [6, 1, 2, 4]


@pytest.mark.parametrize("args, match", [
    (([4, 4], [0.1, 0.2, 0.3], [1, 1], 3), "priority has 3 entries"),
    (([4, 4, 4], [0.1, 0.2], [1, 1], 3), "avg_bits has 3 entries"),
    (([], [], [], 3), "layer_sizes is empty"),
    (([0, 4], [0.1, 0.2], [1, 1], 3), r"avg_bits\[0\] = 0 is outside 1..8"),
    (([4, 9], [0.1, 0.2], [1, 1], 3), r"avg_bits\[1\] = 9 is outside 1..8"),
    (([4, 3.5], [0.1, 0.2], [1, 1], 3), r"avg_bits\[1\] must be an integer"),
    (([4, 4], [0.1, 0.2], [1, 0], 3), "layer_sizes must be > 0, layer 1 has 0"),
    (([4, 4], [0.1, 0.2], [1, -3], 3), "layer_sizes must be > 0"),
    (([4, 4], [0.1, 0.2], [1, 2.5], 3), r"layer_sizes\[1\] must be an integer"),
    (([4, 4], [0.1, float("nan")], [1, 1], 3), r"priority\[1\] must be finite"),
    (([4, 4], [0.1, "x"], [1, 1], 3), r"priority\[1\] must be a real number"),
    (([4, 4], [0.1, 0.2], [1, 1], 0.5), r"budget must be in \[1, 8\]"),
    (([4, 4], [0.1, 0.2], [1, 1], 8.5), r"budget must be in \[1, 8\]"),
    (([4, 4], [0.1, 0.2], [1, 1], float("inf")), "budget must be finite"),
    (([4, 4], [0.1, 0.2], [1, 1], True), "budget must be a real number"),
    (([True, 4], [0.1, 0.2], [1, 1], 3), r"avg_bits\[0\] must be an integer"),
])
def test_allocate_bits_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        allocation.allocate_bits(*args)


# ---- allocate_bits against the rule stated literally ------------------------------------
def _literal(b, prio, sizes, beta):
    """ALGORITHM.md step 4, one bit at a time, re-choosing the layer every time."""
    b = list(b)
    S = sum(sizes)

    def avg():
        return Fraction(sum(n * x for n, x in zip(sizes, b)), S)

    while avg() > Fraction(beta):
        cand = [i for i in range(len(b)) if b[i] > 1]
        if not cand:
            break
        i = max(cand, key=lambda i: (prio[i], -i))
        b[i] -= 1
    while avg() < Fraction(beta):
        cand = [i for i in range(len(b)) if b[i] < 8]
        if not cand:
            break
        i = min(cand, key=lambda i: (prio[i], i))
        b[i] += 1
    return b


def test_random_cases_match_the_literal_rule_and_bounds():
    rng = random.Random(7)
    for _ in range(3000):
        L = rng.randint(1, 6)
        sizes = [rng.choice([1, 3, 9, 27, 64, 576, 2304]) for _ in range(L)]
        b = [rng.randint(1, 8) for _ in range(L)]
        prio = [rng.choice([0.1, 0.2, 0.5, 1.0]) for _ in range(L)]  # many ties
        beta = rng.choice([1, 2, 4, 6, 8, 2.5, 3.25, rng.uniform(1, 8)])
        got = allocation.allocate_bits(b, prio, sizes, beta)
        assert got == _literal(b, prio, sizes, beta)
        assert all(1 <= x <= 8 for x in got)
        over = Fraction(sum(n * x for n, x in zip(sizes, got)), sum(sizes)) - Fraction(beta)
        if over < 0:
            assert got == [8] * L  # below the budget only when every layer is full
        else:
            assert over < Fraction(max(sizes), sum(sizes))  # less than one layer's share


# ---- client_weights -------------------------------------------------------------------
def test_client_weights_over_the_reporters():
    # samples 100, 300 and budgets 2, 6: |D| beta = 200, 1800 -> 0.1, 0.9.
    # Client 2 (budget 8) did not report: it is not in the sum.
    w = allocation.client_weights({0: 100, 1: 300}, {0: 2, 1: 6, 2: 8})
    assert w == {0: 0.1, 1: 0.9}
    # all three reporting: 200, 1800, 8 * 500 = 4000 -> /6000
    w = allocation.client_weights({0: 100, 1: 300, 2: 500}, {0: 2, 1: 6, 2: 8})
    assert w == pytest.approx({0: 1 / 30, 1: 0.3, 2: 2 / 3})
    assert w[2] == 2 / 3 and w[1] == 0.3  # each weight rounded once from the exact ratio
    # budget 2.3 (its float64 value, exactly): 1 * 2.3 / (2.3 + 2 * 4) rounded once is
    # 0.2233009708737864; dividing the two rounded floats gives 0.22330097087378636.
    w = allocation.client_weights({0: 1, 1: 2}, {0: 2.3, 1: 4})
    exact = {0: Fraction(2.3) / (Fraction(2.3) + 8), 1: 8 / (Fraction(2.3) + 8)}
    assert w == {k: float(v) for k, v in exact.items()} and w[0] == 0.2233009708737864
    assert float(Fraction(2.3)) / float(Fraction(2.3) + 8) != w[0]  # the twice-rounded value


@pytest.mark.parametrize("samples, budgets, match", [
    ({}, {0: 2}, "no client reported"),
    ({0: 10, 1: 5}, {0: 2}, "no budget for client 1"),
    ({0: 0, 1: 0}, {0: 2, 1: 4}, "hold no samples"),
    ({0: -1}, {0: 2}, "must be >= 0"),
    ({0: 2.5}, {0: 2}, "must be an integer"),
    ({0: 10}, {0: 9}, r"budgets\[0\] must be in \[1, 8\]"),
])
def test_client_weights_invalid(samples, budgets, match):
    with pytest.raises(ValueError, match=match):
        allocation.client_weights(samples, budgets)


# ---- round_statistics -----------------------------------------------------------------
BITS = {0: [2, 3, 1, 4], 1: [3, 4, 6, 4]}
DELTAS = {0: [0, 1, 2, 4], 1: [1, 2, 5, 4]}


def test_round_statistics_half_to_even_and_renormalized_weights():
    # Clients 0 and 1 report with |D| beta = 300*2 = 600 and 100*6 = 600: omega = 1/2 each.
    # b_bar:     (2+3)/2 = 2.5 -> 2, (3+4)/2 = 3.5 -> 4, (1+6)/2 = 3.5 -> 4, (4+4)/2 = 4 -> 4
    # delta_bar: (0+1)/2+1 = 1.5 -> 2, (1+2)/2+1 = 2.5 -> 2, (2+5)/2+1 = 4.5 -> 4, 4+1 = 5
    # priority = n * delta_bar / 100 = [0.2, 0.4, 1.2, 2.0]
    want = ([2, 4, 4, 4], [2, 2, 4, 5], [0.2, 0.4, 1.2, 2.0])
    w = allocation.client_weights({0: 300, 1: 100}, {0: 2, 1: 6})
    assert w == {0: 0.5, 1: 0.5}
    assert allocation.round_statistics(BITS, DELTAS, w, SIZES4) == want
    # Weights of all three clients (client 2: 500 samples at budget 8 -> 4000, not reporting):
    # renormalized over the reporters, the same result. Without renormalization
    # (the authors' rule) omega = 600/5200 each and b_bar_0 = round(5 * 600/5200) = 1.
    assert allocation.round_statistics(BITS, DELTAS, {0: 600, 1: 600, 2: 4000}, SIZES4) == want
    w_all = allocation.client_weights({0: 300, 1: 100, 2: 500}, {0: 2, 1: 6, 2: 8})
    assert allocation.round_statistics(BITS, DELTAS, w_all, SIZES4) == want
    assert round(5 * 600 / 5200) == 1


def test_round_statistics_exact_half_where_the_float_sum_is_below():
    # Raw weights 3, 2, 1 (omega = 1/2, 1/3, 1/6), one layer, N = [1, 2, 2]:
    # 1/2 + 2/3 + 1/3 = 3/2 exactly -> round to even: 2. The float sum is
    # 1.4999999999999998, which rounds to 1.
    assert float_sum((r / 6) * n for r, n in zip([3, 2, 1], [1, 2, 2])) < 1.5
    b_bar, delta_bar, prio = allocation.round_statistics({0: [1], 1: [2], 2: [2]}, {0: [0], 1: [0], 2: [0]},
                                                     {0: 3, 1: 2, 2: 1}, [5])
    assert (b_bar, delta_bar, prio) == ([2], [1], [1.0])


def test_round_statistics_priority_ties_are_exact():
    # n = [3, 1], delta_bar = [1, 3]: p = 3*1/4 = 1*3/4 -> equal floats (a tie), where
    # (3/4)*1 and (1/4)*3 would also agree here, but n*delta/S is one rounding in general.
    b_bar, delta_bar, prio = allocation.round_statistics({0: [4, 4]}, {0: [0, 2]}, {0: 1.0}, [3, 1])
    assert delta_bar == [1, 3] and prio[0] == prio[1] == 0.75
    # n = [1, 5], delta_bar = [5, 1]: p = 5/6 for both. (1/6)*5 = 0.8333333333333333 but
    # (5/6)*1 = 0.8333333333333334: computed as w_l * delta_bar the tie would be broken.
    b_bar, delta_bar, prio = allocation.round_statistics({0: [4, 4]}, {0: [4, 0]}, {0: 1.0}, [1, 5])
    assert delta_bar == [5, 1] and prio[0] == prio[1] == 5 / 6
    assert (1 / 6) * 5 != (5 / 6) * 1


def test_round_statistics_takes_fraction_weights_exactly():
    """Weights given as fractions are used as they are, not as floats: raw weights 1/3 and
    1/5 (omega = 5/8, 3/8) with N = 1 and 5 give exactly 2.5 -> 2 (half to even); as floats
    (0.333..., 0.2000...01) the sum is just above 2.5 and would round to 3."""
    b_bar, _, _ = allocation.round_statistics({0: [1], 1: [5]}, {0: [0], 1: [0]},
                                              {0: Fraction(1, 3), 1: Fraction(1, 5)}, [7])
    assert b_bar == [2]
    w = [Fraction(float(Fraction(1, 3))), Fraction(float(Fraction(1, 5)))]
    assert round((w[0] * 1 + w[1] * 5) / sum(w)) == 3  # what float weights would give


@pytest.mark.parametrize("bits, deltas, weights, match", [
    ({}, {}, {}, "no client reported"),
    ({0: [1, 1, 1, 1]}, {1: [0, 0, 0, 0]}, {0: 1, 1: 1}, "bits and deltas name different clients"),
    (BITS, DELTAS, {0: 1.0}, "no weight for client 1"),
    (BITS, DELTAS, {0: 1.0, 1: -0.5}, r"weights\[1\] must be >= 0"),
    (BITS, DELTAS, {0: 0, 1: 0}, "weights sum to 0"),
    (BITS, DELTAS, {0: 1.0, 1: float("nan")}, "must be finite"),
    ({0: [2, 3, 1]}, {0: [0, 0, 0]}, {0: 1}, r"bits\[0\] has 3 entries, layer_sizes has 4"),
    ({0: [2, 3, 1, 9]}, {0: [0, 0, 0, 0]}, {0: 1}, r"bits\[0\]\[3\] = 9 is outside 1..8"),
    ({0: [2, 3, 1, 4]}, {0: [0, 0, 0, 8]}, {0: 1}, r"deltas\[0\]\[3\] = 8 is outside 0..7"),
    ({0: [2, 3, 1, 4]}, {0: [0, -1, 0, 0]}, {0: 1}, r"deltas\[0\]\[1\] = -1 is outside 0..7"),
])
def test_round_statistics_invalid(bits, deltas, weights, match):
    with pytest.raises(ValueError, match=match):
        allocation.round_statistics(bits, deltas, weights, SIZES4)


# ---- next_assignments -----------------------------------------------------------------
NAMES = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "fc.weight"]
LAYERS = dict(zip(NAMES, SIZES4))


def _stats(k, samples, budget, bits, deltas):
    return ClientStats(k, 3, samples, float(budget), dict(zip(NAMES, bits)), dict(zip(NAMES, deltas)))


def test_next_assignments_every_client():
    # Reporters 0 (300 samples, budget 2) and 1 (100 samples, budget 6): omega 1/2 each, so
    # b_bar = [2,4,4,4], priority [0.2,0.4,1.2,2.0] (test above). avg(b_bar) = 3.8 (cur 380).
    # client 0, beta 2 (target 200): prune layer3 (n 40) 4->1 (260), layer2 (n 30) 4->2 (200).
    #   -> [2,4,2,1]
    # client 1, beta 6 (target 600): grow layer0 (n 10) 2->8 (440), layer1 (n 20) 4->8 (520),
    #   layer2 (n 30) 4->7 (610 >= 600, over by 0.1 < 0.3). -> [8,8,7,4]
    # client 2, beta 8, did not report: every layer to 8.
    # client 3, beta 4, did not report (target 400): grow layer0 2->4 (400). -> [4,4,4,4]
    stats = [_stats(0, 300, 2, BITS[0], DELTAS[0]), _stats(1, 100, 6, BITS[1], DELTAS[1])]
    budgets = {0: 2, 1: 6, 2: 8, 3: 4}
    want = {0: [2, 4, 2, 1], 1: [8, 8, 7, 4], 2: [8, 8, 8, 8], 3: [4, 4, 4, 4]}
    got = allocation.next_assignments(stats, budgets, LAYERS)
    assert got == want and list(got) == [0, 1, 2, 3]
    # the statistics in any order, or as a mapping, give the same
    assert allocation.next_assignments(stats[::-1], budgets, LAYERS) == want
    assert allocation.next_assignments({s.client_id: s for s in stats}, budgets, LAYERS) == want


def test_next_assignments_follows_layer_order_of_layer_sizes():
    stats = [_stats(0, 300, 2, BITS[0], DELTAS[0]), _stats(1, 100, 6, BITS[1], DELTAS[1])]
    rev = dict(reversed(list(LAYERS.items())))
    got = allocation.next_assignments(stats, {0: 2, 1: 6, 3: 4}, rev)
    assert got == {0: [1, 2, 4, 2], 1: [4, 7, 8, 8], 3: [4, 4, 4, 4]}


def test_next_assignments_float32_budget_from_the_wire():
    # the wire stores a budget as float32: 2.3 comes back as 2.299999952316284
    import struct
    b32 = struct.unpack("<f", struct.pack("<f", 2.3))[0]
    stats = [_stats(0, 50, b32, [3, 3, 3, 3], [0, 0, 0, 0])]
    # b_bar = [3,3,3,3], priorities w_l; target 230 (just under): prune layer3 (n 40) 3->2 (260),
    # 2->1 (220); then grow layer0 (n 10) 3->4 (230 >= 229.99...).
    assert allocation.next_assignments(stats, {0: 2.3}, LAYERS) == {0: [4, 3, 3, 1]}


def test_next_assignments_weights_with_the_servers_budgets():
    """omega_k uses the budget the server holds for client k, not the float32 the upload states.
    Budgets 2.3 and 3 * 2.3 (= 6.8999999999999995 exactly) with 3 and 1 samples: raw weights
    3 * 2.3 and 6.8999999999999995 are equal, so layer 0's N = 2 and 1 average to exactly 1.5
    -> b_bar 2. With the float32 budgets (3 * 2.29999995 < 6.9000001) the sum is below 1.5
    -> 1. Then delta_bar = [3, 1], priorities [1.5, 0.5]; client 0 (target 4.6) grows
    layer 1 from b_bar [2, 2] -> [2, 3] (from [1, 2] it would be [1, 4])."""
    import struct
    f32 = lambda v: struct.unpack("<f", struct.pack("<f", v))[0]  # noqa: E731
    b0, b1 = 2.3, 3 * 2.3
    assert Fraction(b1) == 3 * Fraction(b0) and 3 * f32(b0) < f32(b1)
    names = {"a.weight": 1, "b.weight": 1}
    stats = [ClientStats(0, 1, 3, f32(b0), {"a.weight": 2, "b.weight": 2}, {"a.weight": 2, "b.weight": 0}),
             ClientStats(1, 1, 1, f32(b1), {"a.weight": 1, "b.weight": 2}, {"a.weight": 2, "b.weight": 0})]
    got = allocation.next_assignments(stats, {0: b0, 1: b1}, names)
    assert got[0] == [2, 3]


@pytest.mark.parametrize("stats, budgets, match", [
    ([], {0: 2}, "no client reported this round"),
    ([_stats(0, 10, 2, BITS[0], DELTAS[0])] * 2, {0: 2}, "client 0 reported twice"),
    ([_stats(5, 10, 2, BITS[0], DELTAS[0])], {0: 2}, "client 5 reported but has no budget"),
    ([_stats(0, 10, 2, BITS[0], DELTAS[0])], {0: 4}, "client 0 uploaded budget 2.0, the server has 4"),
    ([ClientStats(0, 1, 10, 2.0, {"x": 2}, {"x": 0})], {0: 2}, "bits name other layers"),
    ([ClientStats(0, 1, 10, 2.0, dict(zip(NAMES, BITS[0])), {"x": 0})], {0: 2}, "deltas name other layers"),
    ([ClientStats(0, 1, 10, 2.0, {**dict(zip(NAMES, BITS[0])), "x": 2}, dict(zip(NAMES, DELTAS[0])))], {0: 2},
     r"bits name other layers than layer_sizes: \['x'\]"),
    ([ClientStats(0, 1, 10, 2.0, dict(zip(NAMES, BITS[0])), {**dict(zip(NAMES, DELTAS[0])), "x": 0})], {0: 2},
     r"deltas name other layers than layer_sizes: \['x'\]"),
    ([_stats(0, 10, 2, [2, 3, 1, 0], DELTAS[0])], {0: 2}, r"bits\[0\]\[3\] = 0 is outside 1..8"),
    ([_stats(0, 10, 2, BITS[0], DELTAS[0])], {0: 2, 1: 9}, r"budget must be in \[1, 8\]"),
])
def test_next_assignments_invalid(stats, budgets, match):
    with pytest.raises(ValueError, match=match):
        allocation.next_assignments(stats, budgets, LAYERS)


# ---- round 1 --------------------------------------------------------------------------
def test_initial_assignment():
    assert allocation.initial_assignment(4, 3) == [4, 4, 4]
    assert allocation.initial_assignment(2.0, 2) == [2, 2]
    assert all(type(b) is int for b in allocation.initial_assignment(6.0, 2))
    assert allocation.initial_assignment(8, 1, [7]) == [8]
    # beta 2.5 over four equal layers: start at round(2.5) = 2 (half to even), cur 8, target 10;
    # priorities w_l all equal: grow layer0 2->4. -> [4,2,2,2]
    assert allocation.initial_assignment(2.5, 4, [9, 9, 9, 9]) == [4, 2, 2, 2]
    # beta 3.5, sizes [10,20,30,40]: start at round(3.5) = 4 (cur 400, target 350); priorities
    # w_l: prune layer3 (n 40) 4->3 (360), 3->2 (320); grow layer0 (n 10) 4->7 (350). -> [7,4,4,2]
    assert allocation.initial_assignment(3.5, 4, SIZES4) == [7, 4, 4, 2]


@pytest.mark.parametrize("args, match", [
    ((0, 3), r"budget must be in \[1, 8\]"),
    ((9, 3), r"budget must be in \[1, 8\]"),
    ((4, 0), "n_layers must be >= 1"),
    ((4, 2.5), "n_layers must be an integer"),
    ((2.5, 3), "not an integer: layer_sizes are needed"),
    ((4, 3, [1, 2]), "layer_sizes has 2 entries, n_layers is 3"),
    ((4, 2, [1, 0]), "layer_sizes must be > 0"),
])
def test_initial_assignment_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        allocation.initial_assignment(*args)


@pytest.mark.parametrize("call, match", [
    (lambda: allocation.allocate_bits([4, 4], [1.0, 2.0], 7, 4.0), "layer_sizes must be a sequence, got int"),
    (lambda: allocation.allocate_bits([4, 4], 0.5, [10, 20], 4.0), "priority must be a sequence, got float"),
    (lambda: allocation.allocate_bits(None, [1.0, 2.0], [10, 20], 4.0), "avg_bits must be a sequence, got NoneType"),
    (lambda: allocation.allocate_bits("44", [1.0, 2.0], [10, 20], 4.0), "avg_bits must be a sequence, got str"),
    (lambda: allocation.initial_assignment(4.5, 2, 3.5), "layer_sizes must be a sequence, got float"),
    (lambda: allocation.client_weights([10, 20], {0: 4.0}), r"num_samples must be a mapping \(client -> value\), got list"),
    (lambda: allocation.client_weights({0: 10}, None), "budgets must be a mapping"),
    (lambda: allocation.round_statistics([[4]], {0: [0]}, {0: 1.0}, [10]), "bits must be a mapping"),
    (lambda: allocation.round_statistics({0: [4]}, {0: [0]}, [1.0], [10]), "weights must be a mapping"),
    (lambda: allocation.next_assignments([], [4.0], {"a": 10}), "budgets must be a mapping"),
    (lambda: allocation.next_assignments(5, {0: 4.0}, {"a": 10}), "stats must be a sequence, got int"),
])
def test_arguments_of_the_wrong_kind_are_named_as_value_errors(call, match):
    """A number where a list belongs was "'int' object is not iterable", a list where a
    mapping belongs "'list' object has no attribute 'items'": each is named, as a ValueError
    (the server refuses a faulty client's report on ValueError)."""
    with pytest.raises(ValueError, match=match):
        call()
