"""The CUDA launchers over many layers (csrc/cuda/bitplane.cu: bitplane_step_layers and
plane_popcounts_layers, a model's optimizer step; dequantize_layers and
dequantize_backward_layers, its weights) under the emulator of tests/cuda_emu:
every layer's result bit for bit as the reference's layer by layer, with every width mixed
in one launch, more layers than one table holds and more blocks than one workspace holds
(so the launches split), empty, skipped and zero-g_s layers among the others, device and
int keys, stale workspace slots, shuffled block and warp orders, canaries around every
output; and the launch count, which is what grouping is for."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.bitplane import reference as R
from tests.cuda_emu import Guarded

from .helpers import assert_state_equal, bits_of, mid_round_state, random_codes_signs

TABLE = 32  # layers per table (kTableLayers)
BLOCK, BLOCKS_PER_SM = 256, 8


def _stale(ws: torch.Tensor) -> torch.Tensor:
    ws.fill_(0x7FC00000)
    ws[0] = 0
    return ws


def _grid(threads: int, sms: int) -> int:
    return max(1, min(-(-threads // BLOCK), sms * BLOCKS_PER_SM))


def _groups(blocks, cap):
    """Launch groups as bitplane.h states the rule: in order, up to TABLE layers and ``cap``
    blocks each (empty layers take no place)."""
    groups, count, used = 0, 0, 0
    for b in blocks:
        if b == 0:
            continue
        if count == 0 or count == TABLE or used + b > cap:
            groups, count, used = groups + 1, 0, 0
        count, used = count + 1, used + b
    return groups


def _layer(n, bits, seed, kind="normal", device_key=False):
    g = torch.Generator().manual_seed(seed)
    state = mid_round_state(n, bits, seed) if n else [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8),
                                                       torch.empty(bits, 0, dtype=torch.uint8), torch.tensor([0.5])]
    grad = torch.randn(n, generator=g) * 0.05
    coef = torch.rand(bits, generator=g) * 1e-3
    if kind == "nan" and n:
        grad[n // 2] = float("nan")
    if kind == "zero":  # every d is 0: g_s = 0, momentum codes zeroed
        grad.zero_()
        coef.zero_()
        state[3].zero_()
    key = R.step_key(5, 2, seed)
    key_t = torch.tensor([key + (3 << 32)]) if device_key else None
    return dict(state=state, grad=grad, coef=coef, scale=torch.tensor(0.4 + 0.01 * (seed % 7)), bits=bits, key=key,
                key_t=key_t)


def _run(emu, layers, lr, momentum, ws):
    """The emulated launcher on ``layers`` in place; returns out (g_s, previous gs per layer)."""
    out = Guarded(2 * len(layers), torch.float32)
    table, reads = [], [out.t, ws]
    for y in layers:
        codes, sign, mom, gs = y["state"]
        kt = y["key_t"]
        table.append((codes.data_ptr(), sign.data_ptr(), mom.data_ptr(), gs.data_ptr(), y["grad"].data_ptr(),
                      y["coef"].data_ptr(), y["scale"].data_ptr(), codes.numel(), y["bits"],
                      0 if kt is not None else y["key"], kt.data_ptr() if kt is not None else None))
        reads += [codes, sign, mom, gs, y["grad"], y["coef"], y["scale"], kt]
    ranges = [(t.data_ptr(), t.numel() * t.element_size()) for t in reads if t is not None and t.numel()]
    emu.bitplane_step_layers_raw(table, lr, momentum, out.t.data_ptr(), ws.data_ptr(), ranges)
    out.check("out")
    return out.t


def _reference(layers, lr, momentum):
    """Each layer stepped by the reference, in order, on copies: (states, g_s, previous gs)."""
    states, g_s, prev = [], [], []
    for y in layers:
        st = [t.clone() for t in y["state"]]
        prev.append(st[3].clone())
        if y["grad"].numel() == 0:  # the launcher launches nothing; the adapter zeroes gs
            g_s.append(None)
        else:
            g_s.append(R.bitplane_step(*st, y["grad"], y["coef"], y["scale"], y["bits"], lr, momentum, y["key"]))
        states.append(st)
    return states, g_s, prev


@pytest.mark.parametrize("sms, order", [(1, 0), (1, 7), (3, 11)])
def test_step_layers_equal_the_reference_layer_by_layer(emu, sms, order):
    """41 layers of every width (two tables at least), big layers among them (so that one
    workspace's slots do not hold every block), an empty, a skipped (NaN) and a zero-g_s
    layer, half with device keys: every state, g_s and previous gs as the reference's, the
    ticket back at 0, and the launches those of the groups the rule forms."""
    emu.sm_count(sms)
    emu.block_order(order)
    emu.warp_order(order)
    sizes = [1, 33, 1000, 4097, 257, 2048, 70001]
    shapes = [(0 if l == 5 else sizes[l % len(sizes)], 1 + l % 8) for l in range(41)]
    kinds = {9: "nan", 17: "zero"}
    layers = [_layer(n, b, seed=l, kind=kinds.get(l, "normal"), device_key=l % 2 == 1) for l, (n, b) in
              enumerate(shapes)]
    want, want_gs, prev = _reference(layers, 0.3, 0.9)
    ws = _stale(emu.bitplane_workspace())
    before = emu.launches()
    out = _run(emu, layers, 0.3, 0.9, ws)
    blocks = [_grid(32 * -(-n // 32), sms) if n else 0 for n, _ in shapes]
    groups = _groups(blocks, ws.numel() - 1)
    assert groups >= 2 and emu.launches() - before == 2 * groups
    assert int(ws[0]) == 0, "the ticket is not reset"
    for l, y in enumerate(layers):
        where = f"layer {l} (n={shapes[l][0]}, {shapes[l][1]} bits, {sms} SMs, order {order})"
        assert_state_equal(y["state"], want[l], where)
        if want_gs[l] is not None:
            assert int(bits_of(out[2 * l])) == int(bits_of(want_gs[l])), where + ": g_s"
            assert int(bits_of(out[2 * l + 1])) == int(bits_of(prev[l])), where + ": previous gs"
    assert not torch.isfinite(out[18]) and float(out[34]) == 0.0  # the skipped and the zero layer


def test_layers_conclude_more_slots_than_a_warp(emu):
    """5 SMs: a 70001-weight layer has 40 blocks (slots), more than the lanes of the warp
    that concludes it in the last block: the max of |d| (largest in block 35's first
    elements) and the plane counts must take every slot."""
    emu.sm_count(5)
    layers = [_layer(70001, 3, seed=1), _layer(1000, 8, seed=2), _layer(70001, 6, seed=3)]
    for y in (layers[0], layers[2]):
        y["grad"][35 * BLOCK + 5] = 1.0  # block 35's: the layer's max |d|
    want, want_gs, _ = _reference(layers, 0.3, 0.9)
    out = _run(emu, layers, 0.3, 0.9, _stale(emu.bitplane_workspace()))
    for l, y in enumerate(layers):
        assert_state_equal(y["state"], want[l], f"layer {l}")
        assert int(bits_of(out[2 * l])) == int(bits_of(want_gs[l])), f"layer {l}: g_s"
    codes = [y["state"][0] for y in layers]
    counts = torch.empty(17, dtype=torch.int64)
    ws = _stale(emu.bitplane_workspace())
    emu.plane_popcounts_layers_raw([(c.data_ptr(), c.numel(), y["bits"]) for c, y in zip(codes, layers)],
                                   counts.data_ptr(), ws.data_ptr(), _reads(ws, *codes))
    assert torch.equal(counts, torch.cat([R.plane_popcounts(c, y["bits"]) for c, y in zip(codes, layers)]))


def test_step_layers_sharing_memory_go_one_by_one(emu):
    """The same layer twice, and a layer whose gradient is another's codes' memory: the steps
    do not commute, so the launcher steps them in order, as the reference does (two
    launches per layer)."""
    a, b = _layer(1000, 4, seed=1), _layer(500, 3, seed=2)
    layers = [a, b, a]
    want, want_gs, _ = _reference([a, b], 0.3, 0.9)
    want2 = [t.clone() for t in want[0]]
    g2 = R.bitplane_step(*want2, a["grad"], a["coef"], a["scale"], 4, 0.3, 0.9, a["key"])
    before = emu.launches()
    out = _run(emu, layers, 0.3, 0.9, _stale(emu.bitplane_workspace()))
    assert emu.launches() - before == 6
    assert_state_equal(a["state"], want2, "layer a, stepped twice")
    assert_state_equal(b["state"], want[1], "layer b")
    assert int(bits_of(out[0])) == int(bits_of(want_gs[0])) and int(bits_of(out[4])) == int(bits_of(g2))

    # a read of one layer in another's state: also in order
    c = _layer(256, 2, seed=3)
    d = _layer(64, 1, seed=4)
    d["coef"] = c["state"][3]  # d's coefficient is c's gs, which c's step writes
    ref_c = [t.clone() for t in c["state"]]
    R.bitplane_step(*ref_c, c["grad"], c["coef"], c["scale"], 2, 0.3, 0.9, c["key"])
    ref_d = [t.clone() for t in d["state"]]
    before = emu.launches()
    _run(emu, [c, d], 0.3, 0.9, _stale(emu.bitplane_workspace()))
    R.bitplane_step(*ref_d, d["grad"], ref_c[3], d["scale"], 1, 0.3, 0.9, d["key"])  # c's new gs as d's coef
    assert emu.launches() - before == 4
    assert_state_equal(c["state"], ref_c, "layer c")
    assert_state_equal(d["state"], ref_d, "layer d, after c")


def _sharing_far_end(where):
    """Layer a (1000 weights, 4 bits) and layer b (24 weights, 8 bits: any byte is a code)
    that share memory only past the start of one of a's buffers: b's codes in a's last 24
    sign bytes or in its last momentum plane, or b's gs as a's last coefficient."""
    a, b = _layer(1000, 4, seed=1), _layer(24, 8, seed=2)
    if where == "sign":
        b["state"][0] = a["state"][1][-24:]
    elif where == "mom":
        b["state"][0] = a["state"][2][-1, :24]
    else:
        buf = torch.cat([a["coef"][:3], b["state"][3]])
        a["coef"], b["state"][3] = buf, buf[3:]
    return a, b


@pytest.mark.parametrize("where", ["sign", "mom", "coef"])
def test_step_layers_sharing_the_far_end_of_a_buffer_go_one_by_one(emu, where):
    """The launcher must see every byte of a layer's buffers (4 bytes a sign word, bits * n
    momentum codes, 4 bytes a coefficient) to find layers that share memory: these go in
    order (two launches each), with the reference's result stepping them in order on the
    same shared memory."""
    ra, rb = _sharing_far_end(where)
    for y in (ra, rb):
        R.bitplane_step(*y["state"], y["grad"], y["coef"], y["scale"], y["bits"], 0.3, 0.9, y["key"])
    a, b = _sharing_far_end(where)
    before = emu.launches()
    _run(emu, [a, b], 0.3, 0.9, _stale(emu.bitplane_workspace()))
    assert emu.launches() - before == 4
    assert_state_equal(a["state"], ra["state"], f"layer a ({where})")
    assert_state_equal(b["state"], rb["state"], f"layer b ({where})")


def test_step_layers_check_every_layer_before_launching(emu):
    """A bad width in the last layer: ValueError, and the layers before it untouched."""
    a, bad = _layer(100, 3, seed=1), _layer(100, 3, seed=2)
    bad["bits"] = 9
    before_a = [t.clone() for t in a["state"]]
    n0 = emu.launches()
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        _run(emu, [a, bad], 0.3, 0.9, emu.bitplane_workspace())
    assert emu.launches() == n0
    assert_state_equal(a["state"], before_a, "the good layer")
    assert emu.launches() == n0


@pytest.mark.parametrize("sms, order", [(1, 0), (2, 3)])
def test_popcounts_layers_equal_the_reference(emu, sms, order):
    """40 layers of every width, empty ones and big ones (more blocks than one workspace's
    slots): the reference's counts back to back, an empty layer's left as they were, the
    ticket back at 0, one launch per group."""
    emu.sm_count(sms)
    emu.block_order(order)
    emu.warp_order(order)
    sizes = [1, 31, 4097, 0, 999, 70001, 8192]
    shapes = [(sizes[l % len(sizes)], 1 + (l * 3) % 8) for l in range(40)]
    codes = [random_codes_signs(n, b, seed=l)[0] for l, (n, b) in enumerate(shapes)]
    total = sum(b for _, b in shapes)
    out = Guarded(total, torch.int64)
    out.t.fill_(-7)
    ws = _stale(emu.bitplane_workspace())
    before = emu.launches()
    table = [(c.data_ptr(), c.numel(), b) for c, (_, b) in zip(codes, shapes)]
    ranges = [(c.data_ptr(), c.numel()) for c in codes if c.numel()] + [(ws.data_ptr(), 4 * ws.numel())]
    emu.plane_popcounts_layers_raw(table, out.t.data_ptr(), ws.data_ptr(), ranges)
    blocks = [_grid(-(-n // 4), sms) if n else 0 for n, _ in shapes]
    groups = _groups(blocks, (ws.numel() - 2) // 16)
    assert groups >= 2 and emu.launches() - before == groups
    assert int(ws[0]) == 0, "the ticket is not reset"
    want = torch.cat([R.plane_popcounts(c, b) if c.numel() else torch.full((b,), -7, dtype=torch.int64)
                      for c, (_, b) in zip(codes, shapes)])
    assert torch.equal(out.t, want)
    out.check("out")


# ---- a model's weights: dequantize_layers and dequantize_backward_layers ----------------------
SIZES = [1, 33, 1000, 4097, 257, 2048, 70001]


def _weights(shapes):
    """codes, sign, scale, bits of random layers."""
    out = []
    for l, (n, b) in enumerate(shapes):
        codes, sign = random_codes_signs(n, b, seed=l)
        out.append((codes, sign, torch.tensor(0.3 + 0.01 * l), b))
    return out


def _reads(*tensors):
    return [(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t is not None and t.numel()]


def _dequantize_layers(emu, layers, outs):
    table = [(c.data_ptr(), s.data_ptr(), sc.data_ptr(), o.data_ptr(), c.numel(), b)
             for (c, s, sc, b), o in zip(layers, outs)]
    emu.dequantize_layers_raw(table, _reads(*[t for c, s, sc, _ in layers for t in (c, s, sc)]))


@pytest.mark.parametrize("sms, order", [(1, 0), (1, 7), (3, 11)])
def test_dequantize_layers_equal_the_reference(emu, sms, order):
    """41 layers of every width, an empty one among them: every weight the reference's bit for
    bit, nothing written outside it, one launch per table of 32 layers."""
    emu.sm_count(sms)
    emu.block_order(order)
    emu.warp_order(order)
    shapes = [(0 if l == 5 else SIZES[l % len(SIZES)], 1 + l % 8) for l in range(41)]
    layers = _weights(shapes)
    outs = [Guarded(n, torch.float32) for n, _ in shapes]
    before = emu.launches()
    _dequantize_layers(emu, layers, [o.t for o in outs])
    assert emu.launches() - before == 2  # 40 non-empty layers: two tables
    for l, ((c, s, sc, b), o) in enumerate(zip(layers, outs)):
        assert torch.equal(bits_of(o.t), bits_of(R.dequantize(c, s, sc, b))), f"layer {l} ({shapes[l]})"
        o.check(f"layer {l}'s weight")


@pytest.mark.parametrize("at", [0, 3000, 3999])
def test_dequantize_layers_whose_weight_another_reads_go_one_by_one(emu, at):
    """Layer 1 reads its codes from layer 0's weight, which layer 0 writes: not grouped, so
    layer 1 sees layer 0's weight as written (two launches), as calls in order would. The
    codes start at byte ``at`` of the 4000-byte weight: the launcher must count 4 bytes a
    weight, and one shared byte (at 3999) is an overlap."""
    (c0, s0, sc0, b0), (_, s1, sc1, _) = _weights([(1000, 4), (1000, 8)])
    buf = torch.zeros(2000, dtype=torch.float32)
    w0 = buf[:1000]
    w1 = torch.empty(1000, dtype=torch.float32)
    c1 = buf.view(torch.uint8)[at:at + 1000]
    before = emu.launches()
    table = [(c0.data_ptr(), s0.data_ptr(), sc0.data_ptr(), w0.data_ptr(), 1000, b0),
             (c1.data_ptr(), s1.data_ptr(), sc1.data_ptr(), w1.data_ptr(), 1000, 8)]
    emu.dequantize_layers_raw(table, _reads(c0, s0, sc0, s1, sc1, buf))
    assert emu.launches() - before == 2
    assert torch.equal(bits_of(w0), bits_of(R.dequantize(c0, s0, sc0, b0)))
    assert torch.equal(bits_of(w1), bits_of(R.dequantize(c1.clone(), s1, sc1, 8)))


@pytest.mark.parametrize("sms, order", [(1, 0), (5, 5)])
def test_dequantize_backward_layers_are_the_single_launchers_bits(emu, sms, order):
    """41 layers, big ones among them, so that their blocks' slots split the launches: every
    dL/ds the single-layer launcher's bits (the same blocks and the same order of the last
    block's sum) and the reference's within 1e-6, an empty layer's left as it was, stale
    slots never read, the ticket back at 0, one launch per group. At 5 SMs a big layer has
    40 blocks, so the last block's sum of its slots spans two warps (a missing barrier
    between two layers' sums shows)."""
    emu.sm_count(sms)
    emu.block_order(order)
    emu.warp_order(order)
    shapes = [(0 if l == 12 else SIZES[(l * 3) % len(SIZES)], 1 + l % 8) for l in range(41)]
    layers = _weights(shapes)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(n, generator=gen) for n, _ in shapes]
    out = Guarded(len(shapes), torch.float32)
    out.t.fill_(-7.0)
    ws = _stale(emu.bitplane_workspace())
    table = [(g.data_ptr(), c.data_ptr(), s.data_ptr(), out.t.data_ptr() + 4 * l, c.numel(), b)
             for l, (g, (c, s, _, b)) in enumerate(zip(grads, layers))]
    before = emu.launches()
    emu.dequantize_backward_layers_raw(table, ws.data_ptr(), _reads(ws, *grads, *[t for c, s, _, _ in layers
                                                                                    for t in (c, s)]))
    blocks = [_grid(-(-n // 4), sms) if n else 0 for n, _ in shapes]
    groups = _groups(blocks, (ws.numel() - 2) // 2)
    assert groups >= 2 and emu.launches() - before == groups
    assert int(ws[0]) == 0, "the ticket is not reset"
    out.check("out")
    single = torch.empty(1)
    for l, (g, (c, s, _, b)) in enumerate(zip(grads, layers)):
        if not c.numel():
            assert float(out.t[l]) == -7.0, "an empty layer's dL/ds was written"
            continue
        emu.dequantize_backward(g, c, s, b, single, _stale(emu.bitplane_workspace()))
        assert int(bits_of(out.t[l])) == int(bits_of(single)), f"layer {l} ({shapes[l]}): {out.t[l]} != {single}"
        torch.testing.assert_close(out.t[l], R.dequantize_backward(g, c, s, b), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sms", [1, 5])
def test_dequantize_backward_layers_keep_the_single_launchers_order(emu, sms):
    """Terms of +-2^40 that cancel exactly among small ones: the float64 sum then depends on
    the order it is added in (a rounding near 2^40 loses about 2^-13, far above the float32
    ulp of the small terms' sum), so only the same blocks, each summing the same elements, and
    the same order of the last block's sum give the single-layer launcher's bits, which
    bitplane.h promises every layer."""
    emu.sm_count(sms)
    shapes = [(1000, 3), (4097, 5), (70001, 8)]
    layers = _weights(shapes)
    gen = torch.Generator().manual_seed(12)
    grads = []
    for codes, sign, _, _ in layers:
        n = codes.numel()
        big = torch.arange(0, n - n % 6, 3)  # an even count: the +-2^40 terms sum to 0
        codes[big] = 1
        sigma = 1.0 - 2.0 * R.negative_mask(sign, n)[big].float()
        g = torch.randn(n, generator=gen)
        g[big] = 2.0 ** 40 * sigma * (1.0 - 2.0 * (torch.arange(big.numel()) % 2).float())
        grads.append(g)
    out = torch.full((len(shapes),), -7.0)
    ws = _stale(emu.bitplane_workspace())
    table = [(g.data_ptr(), c.data_ptr(), s.data_ptr(), out.data_ptr() + 4 * l, c.numel(), b)
             for l, (g, (c, s, _, b)) in enumerate(zip(grads, layers))]
    emu.dequantize_backward_layers_raw(table, ws.data_ptr(), _reads(ws, *grads, *[t for c, s, _, _ in layers
                                                                                    for t in (c, s)]))
    single = torch.empty(1)
    other_order = 0
    for l, (g, (c, s, _, b)) in enumerate(zip(grads, layers)):
        emu.dequantize_backward(g, c, s, b, single, _stale(emu.bitplane_workspace()))
        assert int(bits_of(out[l])) == int(bits_of(single)), f"layer {l} ({shapes[l]}): {out[l]} != {single}"
        other_order += int(bits_of(single)) != int(bits_of(R.dequantize_backward(g, c, s, b)))
    assert other_order > 0, "the sums do not depend on the order: the test shows nothing"


def test_dequantize_backward_layers_whose_grad_another_writes_go_one_by_one(emu):
    """Layer 0's dL/ds lands in layer 1's grad: grouped, layer 1 would read its grad before
    the last block wrote it; in order (two launches), as calls one by one would, it reads it
    after. Layers apart stay grouped (one launch)."""
    (c0, s0, _, b0), (c1, s1, _, b1) = _weights([(1000, 4), (700, 8)])
    gen = torch.Generator().manual_seed(3)
    g0, g1 = torch.randn(1000, generator=gen), torch.randn(700, generator=gen)
    out = torch.full((2,), -7.0)
    ws = emu.bitplane_workspace()
    reads = _reads(ws, g0, g1, c0, s0, c1, s1)
    table = [(g0.data_ptr(), c0.data_ptr(), s0.data_ptr(), g1.data_ptr() + 4 * 5, 1000, b0),
             (g1.data_ptr(), c1.data_ptr(), s1.data_ptr(), out.data_ptr(), 700, b1)]
    before_g1 = g1.clone()
    before = emu.launches()
    emu.dequantize_backward_layers_raw(table, ws.data_ptr(), reads)
    assert emu.launches() - before == 2
    want0 = R.dequantize_backward(g0, c0, s0, b0)
    assert int(bits_of(g1[5])) == int(bits_of(want0))  # layer 0's dL/ds, where its out pointed
    want_g1 = before_g1.clone()
    want_g1[5] = want0
    assert torch.equal(g1, want_g1)
    single = torch.empty(1)
    emu.dequantize_backward(want_g1, c1, s1, b1, single, emu.bitplane_workspace())
    assert int(bits_of(out[0])) == int(bits_of(single)), "layer 1 did not read layer 0's dL/ds"
    # the same layers with their outs apart: one launch
    table[0] = (g0.data_ptr(), c0.data_ptr(), s0.data_ptr(), out.data_ptr() + 4, 1000, b0)
    before = emu.launches()
    emu.dequantize_backward_layers_raw(table, ws.data_ptr(), reads)
    assert emu.launches() - before == 1
    assert int(bits_of(out[1])) == int(bits_of(want0))


@pytest.mark.parametrize("into", ["codes", "sign"])
def test_dequantize_backward_layers_whose_codes_or_sign_another_writes_go_one_by_one(emu, into):
    """Layer 0's dL/ds lands in the last whole word of layer 1's codes or sign bitmap: in
    order (two launches), layer 1 reads those bytes as layer 0 wrote them, as calls one by
    one would (grouped, it would read them before the last block wrote them)."""
    (c0, s0, _, b0), (c1, s1, _, b1) = _weights([(1000, 4), (700, 8)])  # 8 bits: any byte is a code
    gen = torch.Generator().manual_seed(4)
    g0, g1 = torch.randn(1000, generator=gen), torch.randn(700, generator=gen)
    target = c1 if into == "codes" else s1
    at = target.numel() // 4 * 4 - 4
    out = torch.full((1,), -7.0)
    ws = emu.bitplane_workspace()
    table = [(g0.data_ptr(), c0.data_ptr(), s0.data_ptr(), target.data_ptr() + at, 1000, b0),
             (g1.data_ptr(), c1.data_ptr(), s1.data_ptr(), out.data_ptr(), 700, b1)]
    before = emu.launches()
    emu.dequantize_backward_layers_raw(table, ws.data_ptr(), _reads(ws, g0, g1, c0, s0, c1, s1))
    assert emu.launches() - before == 2
    want0 = R.dequantize_backward(g0, c0, s0, b0)
    assert int(target[at:at + 4].view(torch.int32)) == int(bits_of(want0))
    single = torch.empty(1)
    emu.dequantize_backward(g1, c1, s1, b1, single, emu.bitplane_workspace())  # on layer 0's bytes
    assert int(bits_of(out)) == int(bits_of(single)), "layer 1 did not read layer 0's dL/ds"


def test_weights_layers_check_every_layer_before_launching(emu):
    """A bad width in the last layer: ValueError and no launch, forward and backward."""
    (c, s, sc, b), = _weights([(100, 3)])
    w, g, o = torch.empty(100), torch.randn(100), torch.empty(2)
    ws = emu.bitplane_workspace()
    n0 = emu.launches()
    with pytest.raises(ValueError, match="bits must be in 1..8, got 0"):
        emu.dequantize_layers_raw([(c.data_ptr(), s.data_ptr(), sc.data_ptr(), w.data_ptr(), 100, b),
                                   (c.data_ptr(), s.data_ptr(), sc.data_ptr(), w.data_ptr(), 100, 0)], _reads(c, s, sc))
    with pytest.raises(ValueError, match="bits must be in 1..8, got 9"):
        emu.dequantize_backward_layers_raw([(g.data_ptr(), c.data_ptr(), s.data_ptr(), o.data_ptr(), 100, b),
                                            (g.data_ptr(), c.data_ptr(), s.data_ptr(), o.data_ptr() + 4, 100, 9)],
                                           ws.data_ptr(), _reads(g, c, s, ws))
    assert emu.launches() == n0
