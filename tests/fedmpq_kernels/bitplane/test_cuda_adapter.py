"""The CUDA backend's adapters (fedmpq_kernels/bitplane/cuda.py) without a GPU: CPU tensors,
with the CUDA kernels compiled for the host (tests/cuda_emu) standing in for ``_C.cuda`` and
a CPU tensor for the per-stream workspace. This checks what the adapters add to the kernels
(argument order, working copies of strided or misaligned state and their write-back, dtype
conversions, device keys, empty layers) against the reference; the kernels themselves are
test_cuda_emulated.py's, the bindings' checks test_cuda_binding.py's."""
from __future__ import annotations

import pytest
import torch

from fedmpq_kernels.bitplane import reference as R
from tests.cuda_emu.launchers import wire

from .helpers import ALL_BITS, assert_state_equal, bits_of, mid_round_state, random_codes_signs, reference_run, weights


@pytest.fixture
def bc(emu, monkeypatch):
    """fedmpq_kernels.bitplane.cuda wired to the emulated kernels (``bc.native.cuda.calls``
    lists the launcher calls)."""
    from fedmpq_kernels.bitplane import cuda as bc

    wire(bc, emu, monkeypatch)
    return bc


def _odd(t: torch.Tensor) -> torch.Tensor:
    """A copy of the uint8 tensor t one byte past a 4-byte boundary (the adapters must copy
    it to read words)."""
    raw = torch.empty(t.numel() + 1, dtype=torch.uint8)
    raw[1:].copy_(t.reshape(-1))
    return raw[1:]


def test_binarize_takes_16_bit_and_strided_weights(bc):
    """float16 and strided weights become contiguous float32 (exactly) before the kernels."""
    n = 4097
    w = weights(n, 2)
    for x in (w.half(), w.bfloat16(), torch.stack([w, w], 1)[:, 0]):
        for bits in (1, 4, 8):
            got = bc.binarize(x, bits)
            want = R.binarize(x.float(), bits)
            for a, b, name in zip(got, want, ("codes", "sign", "scale")):
                assert torch.equal(a, b), f"{x.dtype}, {bits} bits: {name}"
            assert got[2].shape == () and got[2].dtype == torch.float32
    codes, sign, scale = bc.binarize(torch.empty(0), 3)
    assert codes.shape == (0,) and sign.shape == (0,) and float(scale) == 0.0


def test_dequantize_and_popcounts_take_strided_and_misaligned_inputs(bc):
    n = 1000
    for bits in ALL_BITS:
        codes, sign = random_codes_signs(n, bits, seed=bits)
        strided = torch.zeros(2 * n, dtype=torch.uint8)[::2]
        strided.copy_(codes)
        scale = torch.tensor(0.3, dtype=torch.float64)  # converted to float32 by the adapter
        got = bc.dequantize(strided, _odd(sign), scale, bits)
        want = R.dequantize(codes, sign, scale.float(), bits)
        assert torch.equal(bits_of(got), bits_of(want)), f"{bits} bits"
        assert torch.equal(bc.plane_popcounts(strided, bits), R.plane_popcounts(codes, bits))
    assert bc.native.cuda.calls.count("dequantize") == 8


def test_dequantize_backward_takes_float64_and_strided_gradients(bc):
    n, bits = 4097, 5
    codes, sign = random_codes_signs(n, bits, seed=2)
    g32 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    g64 = torch.zeros(2 * n, dtype=torch.float64)[1::2]  # float32 values: the conversion is exact
    g64.copy_(g32)
    got = bc.dequantize_backward(g64, codes, _odd(sign), bits)
    want = R.dequantize_backward(g32, codes, sign, bits)
    assert got.shape == () and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="grad has 3 elements, codes 4097"):
        bc.dequantize_backward(torch.zeros(3), codes, sign, bits)


def test_empty_layers_launch_nothing(bc):
    e = torch.empty(0, dtype=torch.uint8)
    assert bc.binarize(torch.empty(0, 3), 3)[0].shape == (0,)
    assert bc.dequantize(e, e, torch.tensor(1.0), 3).shape == (0,)
    assert float(bc.dequantize_backward(torch.empty(0), e, e, 3)) == 0.0
    assert torch.equal(bc.plane_popcounts(e, 3), torch.zeros(3, dtype=torch.int64))
    gs = torch.tensor([5.0])
    g_s = bc.bitplane_step(e, e, torch.empty(3, 0, dtype=torch.uint8), gs, torch.empty(0), torch.zeros(3),
                           torch.tensor(1.0), 3, 0.1, 0.9, 7)
    assert float(g_s) == 0.0 and float(gs) == 0.0  # the reference: g_s = 0 zeroes gs
    assert bc.native.cuda.calls == []


def test_step_checks_the_gradient_length_before_stepping(bc):
    """The adapter hands the binding grad's own length, which the binding (the launchers'
    stand-in of its check here) holds to codes': a gradient of another length is a
    ValueError before anything is launched, and no layer is stepped (the many-layer call
    checks every layer first)."""
    n, bits = 40, 3
    state = mid_round_state(n, bits, seed=1)
    before = [t.clone() for t in state]
    coef, scale = torch.zeros(bits), torch.tensor(1.0)
    with pytest.raises(ValueError, match="grad has 39 elements, codes 40"):
        bc.bitplane_step(*state, torch.ones(n - 1), coef, scale, bits, 0.5, 0.9, 7)
    with pytest.raises(ValueError, match="layer 1: grad has 41 elements, codes 40"):
        bc.bitplane_step_layers(*[[t, t.clone()] for t in state], [torch.ones(n), torch.ones(n + 1)], [coef, coef],
                                [scale, scale], [bits, bits], 0.5, 0.9, [7, 8])
    assert_state_equal(state, before, "after the refusals")
    assert bc.native.cuda.calls == []
    # an empty layer launches nothing, but a gradient for it is still refused, not ignored
    empty = mid_round_state(0, bits, seed=1)
    with pytest.raises(ValueError, match="grad has 1 elements, codes 0"):
        bc.bitplane_step(*empty, torch.ones(1), coef, scale, bits, 0.5, 0.9, 7)
    with pytest.raises(ValueError, match="grad has 0 elements, codes 40"):
        bc.dequantize_backward(torch.ones(0), state[0], state[1], bits)
    with pytest.raises(ValueError, match="layer 1: grad has 0 elements, codes 40"):
        bc.dequantize_backward_layers([torch.ones(n), torch.ones(0)], [state[0]] * 2, [state[1]] * 2, [bits] * 2)


def test_empty_layers_outputs_never_read_uninitialized_memory(bc, monkeypatch):
    """An empty layer launches nothing, so its dL/ds and its popcounts must be zeros the
    adapter wrote: with every torch.empty poisoned (NaN, 0x5A bytes), as memory from the
    caching allocator may be, the many-layer calls still give 0 there."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan") if t.is_floating_point() else 0x5A)

    monkeypatch.setattr(torch, "empty", poisoned)
    gen = torch.Generator().manual_seed(8)
    codes = [torch.randint(0, 8, (n,), generator=gen, dtype=torch.uint8) for n in (33, 0, 70)]
    signs = [random_codes_signs(c.numel(), 3, seed=l)[1] for l, c in enumerate(codes)]
    grads = [torch.randn(c.numel(), generator=gen) for c in codes]
    got = bc.dequantize_backward_layers(grads, codes, signs, [3, 3, 3])
    assert float(got[1]) == 0.0
    for l in (0, 2):
        torch.testing.assert_close(got[l], R.dequantize_backward(grads[l], codes[l], signs[l], 3), rtol=1e-6, atol=0)
    counts = bc.plane_popcounts_layers(codes, [3, 2, 3])
    assert torch.equal(counts, torch.cat([R.plane_popcounts(codes[0], 3), torch.zeros(2, dtype=torch.int64),
                                          R.plane_popcounts(codes[2], 3)]))


def test_dequantize_of_many_layers_in_one_call(bc, emu):
    """dequantize_layers / dequantize_backward_layers: one native call and one launch each
    (one layer table), each weight made in its shape, a strided codes tensor and a misaligned
    bitmap copied, a float64 gradient converted; an empty layer's weight empty and its dL/ds
    zero (it is not in the table, so its slot is zero-filled); dL/ds are 0-dim float32 views
    of one buffer, each the single-layer launcher's bits."""
    specs = [((5, 3, 3, 3), 3), ((0, 4), 2), ((40, 25), 8), ((), 1), ((7, 37), 5)]
    codes, signs, scales, bits, shapes = [], [], [], [], []
    for l, (shape, b) in enumerate(specs):
        n = int(torch.Size(shape).numel())
        q, sg = random_codes_signs(n, b, seed=l)
        codes.append(q)
        signs.append(sg)
        scales.append(torch.tensor(0.25 + l, dtype=torch.float64 if l == 2 else torch.float32))
        bits.append(b)
        shapes.append(torch.Size(shape))
    strided = torch.zeros(2 * codes[2].numel(), dtype=torch.uint8)[1::2]
    strided.copy_(codes[2])
    args_codes = [codes[0], codes[1], strided, codes[3], codes[4]]
    args_signs = [signs[0], signs[1], signs[2], signs[3], _odd(signs[4])]
    before = emu.launches()
    ws = bc.dequantize_layers(args_codes, args_signs, scales, bits, shapes)
    assert bc.native.cuda.calls == ["dequantize_layers"] and emu.launches() - before == 1
    for l, w in enumerate(ws):
        assert w.shape == shapes[l] and w.dtype == torch.float32
        want = R.dequantize(codes[l], signs[l], scales[l].float(), bits[l])
        assert torch.equal(bits_of(w).reshape(-1), bits_of(want)), f"layer {l}"
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen) for shape in shapes]
    grads[2] = grads[2].double()  # float32 values: the conversion is exact
    before = emu.launches()
    out = bc.dequantize_backward_layers(grads, args_codes, args_signs, bits)
    assert bc.native.cuda.calls[1:] == ["dequantize_backward_layers"] and emu.launches() - before == 1
    assert float(out[1]) == 0.0
    for l, g in enumerate(out):
        assert g.shape == () and g.dtype == torch.float32
        assert torch.equal(bits_of(g), bits_of(bc.dequantize_backward(grads[l], codes[l], signs[l], bits[l])))
        torch.testing.assert_close(g, R.dequantize_backward(grads[l].float(), codes[l], signs[l], bits[l]), rtol=1e-6,
                                   atol=0)
    assert len({g.untyped_storage().data_ptr() for g in out}) == 1
    with pytest.raises(ValueError, match="grad has 3 elements, codes 1000"):
        bc.dequantize_backward_layers([grads[0], torch.zeros(3)], [codes[0], codes[2]], [signs[0], signs[2]], [3, 8])


@pytest.mark.parametrize("n", [33, 1000])
def test_step_follows_the_reference_through_the_adapter(bc, n):
    """Five steps: the state and g_s bit for bit; the returned g_s a 0-dim float32."""
    for bits in (1, 3, 8):
        traj = reference_run(n, bits, 0.5, 0.9)
        codes, sign, scale = R.binarize(weights(n, bits), bits)
        state = [codes, sign, torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1)]
        for t, (grad, coef, key, want, want_gs) in enumerate(traj):
            g_s = bc.bitplane_step(*state, grad, coef, scale, bits, 0.5, 0.9, key)
            assert g_s.shape == () and g_s.dtype == torch.float32
            assert int(bits_of(g_s)) == int(bits_of(want_gs)), f"bits={bits} step {t}"
            assert_state_equal(state, want, f"n={n} bits={bits} step {t}")


def test_step_writes_back_working_copies_and_reads_a_device_key(bc):
    """Codes strided, the sign bitmap at an odd byte offset and longer than its words, gs a
    strided view, a 0-dim key tensor with high bits set: the adapter copies what the kernel
    cannot take, writes it back, and the key's low 32 bits give the int key's result."""
    n, bits = 1000, 4
    base = mid_round_state(n, bits, seed=11)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 0.3
    coef = torch.rand(bits, generator=torch.Generator().manual_seed(3)) * 1e-3
    scale, key = torch.tensor(0.8), R.step_key(5, 9, 2)
    ref = [t.clone() for t in base]
    want_gs = R.bitplane_step(*ref, grad, coef, scale, bits, 0.4, 0.9, key)

    codes = torch.zeros(2 * n, dtype=torch.uint8)[::2]
    codes.copy_(base[0])
    tail = torch.tensor([0xAB, 0xCD], dtype=torch.uint8)
    sign = _odd(torch.cat([base[1], tail]))
    mom = base[2].clone()
    gs_buf = torch.tensor([base[3].item(), 42.0])
    gs = gs_buf[:1]
    # as ops.bitplane_step calls it with a tensor key: the int key 0 and the tensor
    g_s = bc.bitplane_step(codes, sign, mom, gs, grad.double(), coef, scale, bits, 0.4, 0.9, 0,
                           torch.tensor(key + (3 << 40)))
    assert int(bits_of(g_s)) == int(bits_of(want_gs))
    assert_state_equal([codes.contiguous(), sign[:-2].clone(), mom, gs.clone()], ref, "working copies")
    assert torch.equal(sign[-2:], tail), "the bytes past the sign words changed"
    assert float(gs_buf[1]) == 42.0


def test_popcounts_of_many_layers_in_one_call(bc):
    """plane_popcounts_layers: one launcher call, an empty layer's counts zero, a strided
    layer copied; the reference's counts back to back."""
    gen = torch.Generator().manual_seed(6)
    codes = [torch.randint(0, 1 << b, (n,), generator=gen, dtype=torch.uint8) for n, b in [(33, 3), (0, 2), (999, 8)]]
    codes.append(torch.randint(0, 2, (128,), generator=gen, dtype=torch.uint8)[::2])
    bits = [3, 2, 8, 1]
    got = bc.plane_popcounts_layers(codes, bits)
    assert bc.native.cuda.calls.count("plane_popcounts_layers") == 1
    assert torch.equal(got, torch.cat([R.plane_popcounts(c, b) for c, b in zip(codes, bits)]))


@pytest.mark.parametrize("device_keys", [False, True], ids=["int-keys", "device-keys"])
def test_steps_of_many_layers_in_one_call(bc, device_keys):
    """bitplane_step_layers: one launcher call for every layer (an empty one among them), layer l
    reading its key from element l of a strided key tensor, a strided and a misaligned state
    written back; each layer's state and g_s as the reference's step gives them."""
    shapes = [(33, 3), (0, 2), (1000, 8), (64, 1)]
    states, grads, coefs, scales, bits = [], [], [], [], []
    gen = torch.Generator().manual_seed(4)
    for l, (n, b) in enumerate(shapes):
        codes, sign, scale = R.binarize(weights(n, b, seed=l), b)
        states.append([codes, sign, torch.zeros(b, n, dtype=torch.uint8), torch.tensor([0.5])])
        grads.append(torch.randn(n, generator=gen) * 0.3)
        coefs.append(torch.rand(b, generator=gen) * 1e-3)
        scales.append(scale)
        bits.append(b)
    keys = [R.step_key(3, 1, l) for l in range(len(shapes))]
    ref = [[t.clone() for t in s] for s in states]
    want = [R.bitplane_step(*ref[l], grads[l], coefs[l], scales[l], bits[l], 0.5, 0.9, keys[l]) for l in range(4)]
    states[2][0] = torch.zeros(2 * 1000, dtype=torch.uint8)[::2].copy_(states[2][0])  # strided codes
    states[0][1] = _odd(states[0][1])  # a misaligned sign bitmap
    key_buf = torch.zeros(2 * len(keys), dtype=torch.int64)
    key_buf[::2] = torch.tensor(keys) + (5 << 40)  # high bits set: the kernel takes the low 32
    args = [[s[i] for s in states] for i in range(4)] + [grads, coefs, scales, bits, 0.5, 0.9]
    if device_keys:
        got = bc.bitplane_step_layers(*args, [0] * 4, key_buf[::2])
    else:
        got = bc.bitplane_step_layers(*args, keys)
    assert bc.native.cuda.calls == ["bitplane_step_layers"]  # one native call, its launches grouped
    assert got.shape == (4,) and torch.equal(bits_of(got), bits_of(torch.stack(want)))
    for l in range(4):
        assert_state_equal([t.contiguous() for t in states[l]], ref[l], f"layer {l}")


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_a_layer_listed_twice_is_stepped_twice(bc, emu, strided):
    """The same state twice: contiguous, the native launcher sees the layers share memory and
    steps them in order (four launches, not two); strided, the adapter's working copies
    would hide the first step from the second, so it goes layer by layer itself, after the
    native call has checked every layer (launching nothing)."""
    n, b = 257, 4
    codes, sign, scale = R.binarize(weights(n, b, seed=5), b)
    gen = torch.Generator().manual_seed(5)
    grad, coef = torch.randn(n, generator=gen) * 0.2, torch.rand(b, generator=gen) * 1e-3
    ref = [codes.clone(), sign.clone(), torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)]
    keys = [R.step_key(2, 0, 0), R.step_key(2, 0, 1)]
    want = torch.stack([R.bitplane_step(*ref, grad, coef, scale, b, 0.5, 0.9, k) for k in keys])
    cbuf = torch.zeros(n, 2, dtype=torch.uint8)
    cbuf[:, 0] = codes
    st = [cbuf[:, 0] if strided else codes.clone(), sign.clone(), torch.zeros(b, n, dtype=torch.uint8),
          torch.zeros(1)]
    before = emu.launches()
    got = bc.bitplane_step_layers(*[[t, t] for t in st], [grad, grad], [coef, coef], [scale, scale], [b, b], 0.5, 0.9,
                                  keys)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal([t.contiguous() for t in st], ref, "the layer, stepped twice")
    assert emu.launches() - before == 4
    assert bc.native.cuda.calls == (["bitplane_step_layers (checks)"] + ["bitplane_step"] * 2 if strided
                                    else ["bitplane_step_layers"])


@pytest.mark.parametrize("device_keys", [False, True], ids=["host-keys", "device-keys"])
@pytest.mark.parametrize("batched", [False, True], ids=["weights-per-layer", "batch_weights"])
def test_a_quantized_model_trains_through_the_adapters_as_on_the_cpu(bc, emu, monkeypatch, device_keys, batched):
    """A client step's kernels, the autograd of dequantize and the activation quantizer and
    the optimizer included, with the bit-plane and fake-quant families routed to the CUDA
    adapters (their kernels emulated): binarize at construction, then three steps of the same
    data give the CPU backend's codes, signs, momentum and g_s bit for bit (only
    BitPlaneOptimizer steps: the scales stay, so the scale gradients, summed in another
    order, are compared within 1e-6). ``batch_weights``: the weights made as the client makes
    them (dequantize_layers, its adapters), against the CPU backend's per layer."""
    import torch.nn.functional as F

    from fedmpq import nn as qn
    from fedmpq_kernels import registry

    torch.manual_seed(3)
    x, y = torch.randn(3, 8, 1, 8, 8), torch.randint(0, 10, (3, 8))

    step_launches = []  # the emulated kernel launches of each optimizer step

    def train():
        torch.manual_seed(0)
        qm = qn.small_cnn(quantized=True, bits=3, image_size=8)
        opt = qn.BitPlaneOptimizer(qm, lr=0.5, lam=1e-3, seed=7, device_keys=device_keys)
        if routed_now and batched:
            qn.batch_weights(qm)
        grads = []
        for i in range(3):
            opt.zero_grad()
            for m in qm.parameters():
                m.grad = None
            F.cross_entropy(qm(x[i]), y[i]).backward()
            grads.append([m.scale.grad.clone() for _, m in qn.bit_layers(qm)])
            before = emu.launches()
            opt.step()
            step_launches.append(emu.launches() - before)
        state = [(m.codes.clone(), m.sign.clone(), opt.state[l]["mom"].clone(), opt.state[l]["gs"].clone())
                 for l, (_, m) in enumerate(qn.bit_layers(qm))]
        return state, grads

    routed_now = False
    want, want_grads = train()
    routed_now = True
    from fedmpq_kernels.fake_quant import cuda as fc

    fq_calls = wire(fc, emu, monkeypatch)
    real_get = registry.get
    adapters = {"bitplane": bc, "fake_quant": fc}

    def routed(family, op, device_type):
        if family in adapters and hasattr(adapters[family], op):
            return getattr(adapters[family], op)
        return real_get(family, op, device_type)

    monkeypatch.setattr(registry, "get", routed)
    monkeypatch.setattr(registry, "_cache", {})  # get_many's entries come from the routed get
    from fedmpq_kernels.fake_quant import ops as fq_ops

    for cache in ("_EAGER", "_R6_EAGER"):  # fake_quant's per-device caches of get_many's answers
        monkeypatch.setattr(fq_ops, cache, {})
    from fedmpq_kernels.bitplane import ops

    made = []  # dequantize_layers calls of the CUDA adapter
    real_many = bc.dequantize_layers
    monkeypatch.setattr(bc, "dequantize_layers", lambda *a: made.append(len(a[0])) or real_many(*a))
    monkeypatch.setattr(ops, "_LAYERS_OF", {})  # its lookup of the adapters' many-layer ops is cached
    for cache in ("_CPU_FN", "_DQ_CPU"):  # the fast paths' caches of the CPU backend's functions
        monkeypatch.setattr(ops, cache, {})
    del step_launches[:]
    emu.sm_count(4)  # a workspace with room for every layer's popcount slots (one SM's holds 8 blocks)
    got, got_grads = train()
    # the whole model's step: one popcount launch, then the step's two (one layer table)
    assert step_launches == [3, 3, 3]
    # the optimizer counts and steps every layer through one call each (launches over layer tables)
    weights = {"dequantize_layers", "dequantize_backward_layers"} if batched else {"dequantize", "dequantize_backward"}
    assert set(bc.native.cuda.calls) == {"binarize", "plane_popcounts_layers", "bitplane_step_layers"} | weights
    assert set(fq_calls.calls) == {"relu6_fake_quant", "fake_quant_backward"}
    assert made == ([4] * 3 if batched else []), "the weights were not made as asked"
    for l, (g, w) in enumerate(zip(got, want)):
        assert_state_equal(g, w, f"layer {l}")
    for step, (gs, ws) in enumerate(zip(got_grads, want_grads)):
        for l, (a, b) in enumerate(zip(gs, ws)):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-12), f"step {step}, layer {l}: dL/ds {a} != {b}"


def test_step_refuses_state_that_overlaps_behind_its_working_copies(bc):
    """Codes strided over mom's storage: the adapter's copies hid the overlap from the
    binding's checks, and the write-back put codes over mom. Refused, nothing launched."""
    n, bits = 64, 3
    store = torch.randint(0, 8, (3 * bits * n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    mom, codes = store[: bits * n].view(bits, n), store[::3][:n]
    args = (codes, torch.zeros(8, dtype=torch.uint8), mom, torch.zeros(1), torch.randn(n), torch.zeros(bits),
            torch.tensor(1.0))
    before = store.clone()
    with pytest.raises(ValueError, match="^codes and mom overlap in memory"):
        bc.bitplane_step(*args, bits, 0.5, 0.9, 3)
    with pytest.raises(ValueError, match="^layer 0: codes and mom overlap in memory"):
        bc.bitplane_step_layers(*[[a] for a in args], [bits], 0.5, 0.9, [3])
    assert torch.equal(store, before) and not bc.native.cuda.calls
