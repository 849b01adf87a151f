"""The ops over many layers in one call, on every backend against the reference's op taken
layer by layer (the oracle). ``fk.bitplane_step_layers``, a model's optimizer step: mixed
widths 1..8, odd and empty layers, a skipped layer (NaN gradient) and a zero-gradient layer
among the others, strided and misaligned state, int keys and device keys; the refusals name
the layer and leave every layer unchanged. ``fk.plane_popcounts_layers``: the layers' counts
back to back, empty and strided layers among them."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.bitplane import reference as R

from .helpers import assert_state_equal, bits_of, kernels, layer

# (n, bits): every width, odd sizes, an empty layer; the interpreter takes the small ones
LAYERS = [(33, 3), (0, 2), (1000, 8), (1, 1), (64, 4), (257, 5), (7, 6), (4097, 7), (100, 2)]
# a NaN in layer 4's gradient at step 1 (skipped); the last layer without gradient or
# regularizer (g_s = 0: momentum zeroed, codes kept)
NAN_LAYER, ZERO_LAYER = 4, -1


def _model(dev, small: bool, seed: int = 0):
    """Per layer [codes, sign, mom, gs], grads per step, coefs, scales, bits."""
    shapes = [(n, b) for n, b in LAYERS if not small or n <= 1000]
    gen = torch.Generator().manual_seed(seed)
    states, coefs, scales, bits = [], [], [], []
    for l, (n, b) in enumerate(shapes):
        codes, sign, scale = layer(n, b, seed=seed + l)
        states.append([codes, sign, torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)])
        coefs.append(torch.rand(b, generator=gen) * 1e-3)
        scales.append(scale)
        bits.append(b)
    coefs[ZERO_LAYER].zero_()
    grads = []
    for t in range(3):
        g = [torch.randn(n, generator=gen) * 0.2 for n, _ in shapes]
        if len(g) > NAN_LAYER and g[NAN_LAYER].numel():
            g[NAN_LAYER][g[NAN_LAYER].numel() // 2] = float("nan") if t == 1 else g[NAN_LAYER][0]
        g[ZERO_LAYER] = torch.zeros_like(g[ZERO_LAYER])
        grads.append(g)
    move = lambda ts: [t.to(dev) for t in ts]  # noqa: E731
    return [move(s) for s in states], [move(g) for g in grads], move(coefs), move(scales), bits


def _reference(states, grads, coefs, scales, bits, lr, momentum, keys):
    """The oracle: the reference's step, layer by layer, on CPU copies."""
    ref = [[t.cpu().clone() for t in s] for s in states]
    out = []
    for g, k in zip(grads, keys):
        out.append(torch.stack([R.bitplane_step(*ref[l], g[l].cpu(), coefs[l].cpu(), scales[l].cpu(), bits[l], lr,
                                                momentum, k[l]) for l in range(len(ref))]))
    return ref, out


@pytest.mark.parametrize("device_keys", [False, True], ids=["int-keys", "device-keys"])
def test_steps_equal_the_layers_steps_one_by_one(backend, device_keys):
    kernels(backend)
    dev = backend.device
    small = backend.max_numel is not None
    states, grads, coefs, scales, bits = _model(dev, small)
    L = len(states)
    keys = [[R.step_key(7, t, l) for l in range(L)] for t in range(len(grads))]
    ref, want = _reference(states, grads, coefs, scales, bits, 0.5, 0.9, keys)
    step = torch.zeros((), dtype=torch.int64, device=dev)
    with backend.active():
        for t, g in enumerate(grads):
            k = fk.step_keys(7, step, L) if device_keys else keys[t]
            got = fk.bitplane_step_layers([s[0] for s in states], [s[1] for s in states], [s[2] for s in states],
                                    [s[3] for s in states], g, coefs, scales, bits, 0.5, 0.9, k)
            step += 1
            assert got.shape == (L,) and got.dtype == torch.float32 and got.device.type == dev
            # bit for bit, but a NaN g_s (the skipped layer) matches any NaN: a GPU gives its
            # canonical NaN, the CPU reference keeps the gradient's
            nan = torch.isnan(want[t])
            assert torch.equal(torch.isnan(got.cpu()), nan), f"step {t}: NaN at different layers"
            assert torch.equal(bits_of(got)[~nan], bits_of(want[t])[~nan]), \
                f"step {t}: g_s {got.tolist()} != {want[t].tolist()}"
    for l in range(L):
        assert_state_equal(states[l], [r.clone() for r in ref[l]], f"layer {l} ({LAYERS[l]})")
    assert not torch.isfinite(want[1][NAN_LAYER]) and float(want[2][ZERO_LAYER]) == 0.0  # the cases are there


@pytest.mark.parametrize("unusual", [None, "strided-grad", "float64-grad", "numpy-key", "int-lr"])
def test_the_usual_call_takes_one_pass_and_any_other_the_checked_path(monkeypatch, unusual):
    """An optimizer's step on the CPU (plain contiguous tensors, Parameter scales, int keys in
    a tuple, float lr and momentum) is checked and stepped by the CPU backend in one pass,
    without the general per-layer checks; one layer it does not take (or an int lr) sends the
    whole call through those checks and the general adapter. The same steps either way, bit
    for bit the reference's."""
    import numpy as np

    from fedmpq_kernels.bitplane import ops

    states, grads, coefs, scales, bits = _model("cpu", small=True, seed=6)
    L = len(states)
    keys = [R.step_key(9, 0, l) for l in range(L)]
    ref, want = _reference(states, [grads[0]], coefs, scales, bits, 0.5, 0.9, [keys])
    grad, coef, key_arg, lr = list(grads[0]), list(coefs), tuple(keys), 0.5
    if unusual == "strided-grad":
        grad[2] = torch.stack([grad[2], grad[2]], 1)[:, 0]
    elif unusual == "float64-grad":
        grad[3] = grad[3].double()
    elif unusual == "numpy-key":
        key_arg = keys[:1] + [np.uint32(keys[1])] + keys[2:]
    elif unusual == "int-lr":
        lr = 1  # not a float
        ref, want = _reference(states, [grads[0]], coefs, scales, bits, 1.0, 0.9, [keys])
    checked = []
    real = ops._step_layer
    monkeypatch.setattr(ops, "_step_layer", lambda *a: checked.append(1) or real(*a))
    params = [torch.nn.Parameter(s.clone()) for s in scales]
    got = fk.bitplane_step_layers([s[0] for s in states], [s[1] for s in states], [s[2] for s in states],
                                  [s[3] for s in states], grad, coef, params, bits, lr, 0.9, key_arg)
    assert len(checked) == (0 if unusual is None else L), "the usual call took the general path, or another did not"
    nan = torch.isnan(want[0])
    assert torch.equal(torch.isnan(got), nan) and torch.equal(bits_of(got)[~nan], bits_of(want[0])[~nan])
    for l in range(L):
        assert_state_equal(states[l], ref[l], f"layer {l}")


def test_a_keys_tensor_gives_its_low_32_bits(backend):
    """A keys tensor's entries count modulo 2^32 (as one key tensor's does): keys beyond
    uint32 or negative step the layers as their low 32 bits given as ints."""
    kernels(backend)
    dev = backend.device
    states, grads, coefs, scales, bits = _model(dev, small=True, seed=4)
    states, coefs, scales, bits = states[:3], coefs[:3], scales[:3], bits[:3]
    keys = [R.step_key(3, 0, l) for l in range(3)]
    ref, want = _reference(states, [grads[0][:3]], coefs, scales, bits, 0.5, 0.9, [keys])
    wide = torch.tensor([keys[0] + 5 * 2**32, keys[1] - 2**32, keys[2] + 2**40], dtype=torch.int64, device=dev)
    with backend.active():
        got = fk.bitplane_step_layers(*[[s[i] for s in states] for i in range(4)], grads[0][:3], coefs, scales, bits,
                                      0.5, 0.9, wide)
    assert torch.equal(bits_of(got), bits_of(want[0]))
    for l in range(3):
        assert_state_equal(states[l], ref[l], f"layer {l}")


def test_steps_take_strided_and_misaligned_state(backend):
    """Layer 1's codes strided, its sign bitmap and gs misaligned views: the backend's working
    copies are written back, and the other layers' buffers are untouched."""
    kernels(backend)
    dev = backend.device
    states, grads, coefs, scales, bits = _model(dev, small=True, seed=3)
    states, coefs, scales, bits = states[:3], coefs[:3], scales[:3], bits[:3]
    g = grads[0][:3]
    keys = [R.step_key(1, 0, l) for l in range(3)]
    ref, want = _reference(states, [g], coefs, scales, bits, 0.7, 0.9, [keys])
    codes, sign, mom, gs = states[0]
    n = codes.numel()
    cbuf = torch.zeros(n, 2, dtype=torch.uint8, device=dev)
    cbuf[:, 0] = codes
    sbuf = torch.zeros(sign.numel() + 1, dtype=torch.uint8, device=dev)
    sbuf[1:] = sign
    gbuf = torch.tensor([0.0, float(gs)], device=dev)
    views = [cbuf[:, 0], sbuf[1:], mom, gbuf[1:]]
    assert not views[0].is_contiguous() and views[1].data_ptr() % 4
    all_states = [views] + states[1:]
    with backend.active():
        got = fk.bitplane_step_layers(*[[s[i] for s in all_states] for i in range(4)], g, coefs, scales, bits, 0.7, 0.9,
                                keys)
    assert torch.equal(bits_of(got), bits_of(want[0]))
    for l in range(3):
        assert_state_equal(all_states[l], ref[l], f"layer {l}")
    assert not cbuf[:, 1].any() and int(sbuf[0]) == 0 and float(gbuf[0]) == 0.0


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_a_layer_listed_twice_is_stepped_twice(backend, strided):
    """The same layer's state twice in the lists (its codes contiguous, or a strided view the
    backend must copy): stepped twice in order, as the reference does, not twice from the
    same state (a backend that groups the layers or steps working copies goes layer by layer
    when layers share memory)."""
    kernels(backend)
    dev = backend.device
    n, b = 257, 4
    codes, sign, scale = layer(n, b, seed=5)
    gen = torch.Generator().manual_seed(5)
    grad, coef = torch.randn(n, generator=gen) * 0.2, torch.rand(b, generator=gen) * 1e-3
    ref = [codes.clone(), sign.clone(), torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)]
    keys = [R.step_key(2, 0, 0), R.step_key(2, 0, 1)]
    want = torch.stack([R.bitplane_step(*ref, grad, coef, scale, b, 0.5, 0.9, k) for k in keys])
    cbuf = torch.zeros(n, 2, dtype=torch.uint8, device=dev)
    cbuf[:, 0] = codes.to(dev)
    c = cbuf[:, 0] if strided else codes.to(dev)
    st = [c, sign.to(dev), torch.zeros(b, n, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev)]
    g, cf, sc = grad.to(dev), coef.to(dev), scale.to(dev)
    with backend.active():
        got = fk.bitplane_step_layers(*[[t, t] for t in st], [g, g], [cf, cf], [sc, sc], [b, b], 0.5, 0.9, keys)
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(st, ref, "the layer, stepped twice")


def _args(dev):
    states, grads, coefs, scales, bits = _model(dev, small=True)
    lists = [[s[i] for s in states] for i in range(4)] + [grads[0], coefs, scales, bits]
    return lists, [R.step_key(0, 0, l) for l in range(len(states))]


@pytest.mark.parametrize("where, change, err, match", [
    (2, lambda a: a[2].__setitem__(2, torch.zeros(3, dtype=torch.uint8)), ValueError, "layer 2: mom must be"),
    (5, lambda a: a[4].__setitem__(5, a[4][5][:-1]), ValueError, "layer 5: grad has"),
    (3, lambda a: a[7].__setitem__(3, 9), ValueError, "layer 3: bits must be in 1..8"),
    (1, lambda a: a[6].__setitem__(1, torch.tensor(1.0, dtype=torch.float64)), TypeError, "layer 1: scale must be"),
    (0, lambda a: a[1].__setitem__(0, a[1][0].float()), TypeError, "layer 0: sign must be torch.uint8"),
    (4, lambda a: a[5].pop(), ValueError, "coef has 7 entries, codes 8"),
], ids=["mom-size", "grad-size", "bits", "scale-dtype", "sign-dtype", "list-length"])
def test_a_bad_layer_is_named_and_nothing_changes(where, change, err, match):
    lists, keys = _args("cpu")
    before = [[t.clone() for t in col] for col in lists[:4]]
    change(lists)
    with pytest.raises(err, match=match):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, keys)
    for col, old in zip(lists[:4], before):
        for a, b in zip(col, old):
            if a.dtype == b.dtype and a.shape == b.shape:
                assert torch.equal(a, b)


def test_bad_keys_and_scalars_are_refused():
    lists, keys = _args("cpu")
    L = len(keys)
    with pytest.raises(ValueError, match="keys has 7 entries, codes 8"):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, keys[:-1])
    with pytest.raises(ValueError, match=r"key must be a uint32 \(layer 2\)"):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, keys[:2] + [-1] + keys[3:])
    with pytest.raises(TypeError, match="int64 tensor"):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, torch.zeros(L, dtype=torch.int32))
    with pytest.raises(ValueError, match="one per layer"):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, torch.zeros(L - 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="lr must be > 0"):
        fk.bitplane_step_layers(*lists, 0.0, 0.9, keys)
    with pytest.raises(ValueError, match="and below 3.4028235677973366e38"):  # inf as float32
        fk.bitplane_step_layers(*lists, 3.5e38, 0.9, keys)
    with pytest.raises(ValueError, match="momentum must be in"):
        fk.bitplane_step_layers(*lists, 0.5, 1.0, keys)
    assert fk.bitplane_step_layers([], [], [], [], [], [], [], [], 0.5, 0.9, []).shape == (0,)


@pytest.mark.parametrize("op", ["bitplane_step_layers", "dequantize_layers", "plane_popcounts_layers"])
def test_a_list_argument_that_is_not_a_sequence_is_named(op):
    """One tensor, None or a number where a list of one entry per layer belongs was
    "object of type 'NoneType' has no len()" from inside the op: each is named. Tuples,
    lists and NumPy arrays are sequences."""
    import numpy as np

    lists, keys = _args("cpu")
    codes, sign, mom, gs, grad, coef, scale, bits = lists
    sinks = [fk.sink_like((c.numel(),)) for c in codes]
    args = {"bitplane_step_layers": dict(codes=codes, sign=sign, mom=mom, gs=gs, grad=grad, coef=coef, scale=scale,
                                         bits=bits, lr=0.5, momentum=0.9, keys=keys),
            "dequantize_layers": dict(codes=codes, sign=sign, scale=scale, bits=bits, sink=sinks),
            "plane_popcounts_layers": dict(codes=codes, bits=bits)}[op]
    names = [k for k in args if k not in ("lr", "momentum")]
    for name in names:
        for bad in (None, 4, 0.5, "codes", {0: codes[0]}):
            with pytest.raises(TypeError, match=f"^{name} must be a list or tuple, one entry per layer, got "
                                                f"{type(bad).__name__}$"):
                getattr(fk, op)(**dict(args, **{name: bad}))
    if op != "bitplane_step_layers":  # (a step changes its state: compared in the tests above)
        # tuples and a NumPy array of widths are sequences: the lists' results
        flat = lambda r: torch.cat([w.reshape(-1) for w in r]) if isinstance(r, list) else r  # noqa: E731
        want = flat(getattr(fk, op)(**args))
        got = flat(getattr(fk, op)(**dict({k: tuple(v) for k, v in args.items()}, bits=np.array(bits))))
        assert torch.equal(got, want)


def test_the_cpu_binding_names_the_bad_layer():
    """The native entry re-checks every layer before stepping any (sizes it did not check)."""
    from fedmpq_kernels._native import native
    if native is None:
        pytest.skip("native module not built")
    n, bits = 64, 4
    codes, sign, scale = layer(n, bits)
    mom, gs, grad, coef = torch.zeros(bits * n, dtype=torch.uint8), torch.zeros(1), torch.randn(n), torch.zeros(bits)
    good = (codes.data_ptr(), n, sign.data_ptr(), sign.numel(), mom.data_ptr(), mom.numel(), gs.data_ptr(),
            grad.data_ptr(), n, coef.data_ptr(), bits, float(scale), bits, 5)
    bad = good[:5] + (bits * n - 1,) + good[6:]  # mom one byte short
    short_grad = good[:8] + (n - 1,) + good[9:]
    out = torch.empty(2)
    before = codes.clone()
    with pytest.raises(ValueError, match="layer 1: mom"):
        native.cpu.bitplane_step_layers([good, bad], 0.5, 0.9, out.data_ptr(), 2, 1)
    with pytest.raises(ValueError, match="out"):
        native.cpu.bitplane_step_layers([good], 0.5, 0.9, out.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="layer 0: out and grad overlap"):
        native.cpu.bitplane_step_layers([good], 0.5, 0.9, grad.data_ptr(), 1, 1)
    # all of out is apart from every layer: here its second entry is layer 1's first gradient
    buf = torch.zeros(n + 1)
    buf[1:] = grad
    shifted = good[:7] + (buf[1:].data_ptr(),) + good[8:]
    with pytest.raises(ValueError, match="layer 1: out and grad overlap"):
        native.cpu.bitplane_step_layers([good, shifted], 0.5, 0.9, buf.data_ptr(), 2, 1)
    with pytest.raises(ValueError, match=f"layer 1: grad has {n - 1} elements, codes {n}"):
        native.cpu.bitplane_step_layers([good, short_grad], 0.5, 0.9, out.data_ptr(), 2, 1)
    for key in (-1, 2**32):
        with pytest.raises(ValueError, match="layer 1: key must be a uint32"):
            native.cpu.bitplane_step_layers([good, good[:13] + (key,)], 0.5, 0.9, out.data_ptr(), 2, 1)
    with pytest.raises(ValueError, match="layer 1: mom"):  # check_only checks the same
        native.cpu.bitplane_step_layers([good, bad], 0.5, 0.9, out.data_ptr(), 2, 1, True)
    assert native.cpu.bitplane_step_layers([good, good], 0.5, 0.9, out.data_ptr(), 2, 1, True) is None
    assert torch.equal(codes, before)  # check_only stepped nothing


def test_popcounts_of_many_layers_are_each_layers_back_to_back(backend):
    kernels(backend)
    dev = backend.device
    small = backend.max_numel is not None
    gen = torch.Generator().manual_seed(11)
    shapes = [(n, b) for n, b in LAYERS if not small or n <= 1000]
    codes = [torch.randint(0, 1 << b, (n,), generator=gen, dtype=torch.uint8).to(dev) for n, b in shapes]
    wide = torch.zeros(2 * codes[2].numel(), dtype=torch.uint8, device=dev)
    wide[::2] = codes[2]
    codes[2] = wide[::2]  # strided
    bits = [b for _, b in shapes]
    want = torch.cat([R.plane_popcounts(c.cpu(), b) for c, b in zip(codes, bits)])
    with backend.active():
        got = fk.plane_popcounts_layers(codes, bits)
    assert got.dtype == torch.int64 and got.device.type == dev and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("unusual", [None, "strided", "numpy-width", "parameter"])
def test_popcounts_of_the_usual_call_take_one_pass_and_any_other_the_checked_path(monkeypatch, unusual):
    """Plain contiguous CPU codes and int widths are checked and counted by the CPU backend in
    one pass; one layer it does not take sends the call through the general checks. The
    same counts either way, the reference's."""
    import numpy as np

    from fedmpq_kernels.bitplane import ops

    gen = torch.Generator().manual_seed(12)
    codes = [torch.randint(0, 1 << b, (n,), generator=gen, dtype=torch.uint8) for n, b in LAYERS]
    bits = [b for _, b in LAYERS]
    want = torch.cat([R.plane_popcounts(c, b) for c, b in zip(codes, bits)])
    if unusual == "strided":
        codes[2] = torch.stack([codes[2], codes[2]], 1)[:, 0]
    elif unusual == "numpy-width":
        bits[5] = np.int64(bits[5])
    elif unusual == "parameter":  # a plain type too: the one pass takes it
        codes[4] = torch.nn.Parameter(codes[4], requires_grad=False)
    checked = []
    real = ops._tensor
    monkeypatch.setattr(ops, "_tensor", lambda *a, **k: checked.append(1) or real(*a, **k))
    got = fk.plane_popcounts_layers(codes, bits)
    assert bool(checked) == (unusual in ("strided", "numpy-width")), "the wrong path counted"
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_popcounts_of_many_layers_refuse_a_bad_layer():
    codes = [torch.zeros(5, dtype=torch.uint8), torch.zeros(3, dtype=torch.int32)]
    with pytest.raises(TypeError, match="layer 1: codes must be torch.uint8"):
        fk.plane_popcounts_layers(codes, [2, 2])
    with pytest.raises(ValueError, match="layer 0: bits must be in 1..8"):
        fk.plane_popcounts_layers(codes[:1], [0])
    with pytest.raises(ValueError, match="bits has 1 entries, codes 2"):
        fk.plane_popcounts_layers(codes, [2])
    assert fk.plane_popcounts_layers([], []).shape == (0,)


def test_the_cpu_popcounts_binding_checks_every_layer():
    from fedmpq_kernels._native import native
    if native is None:
        pytest.skip("native module not built")
    c = torch.zeros(8, dtype=torch.uint8)
    out = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="layer 1: bits must be in 1..8"):
        native.cpu.plane_popcounts_layers([(c.data_ptr(), 8, 2), (c.data_ptr(), 8, 9)], out.data_ptr(), 4, 1)
    with pytest.raises(ValueError, match="out: buffer holds 3"):
        native.cpu.plane_popcounts_layers([(c.data_ptr(), 8, 2), (c.data_ptr(), 8, 2)], out.data_ptr(), 3, 1)
    with pytest.raises(ValueError, match="layer 0: out and codes overlap"):
        native.cpu.plane_popcounts_layers([(out.data_ptr(), 8, 2)], out.data_ptr(), 4, 1)
    # all of out (4 counts), not only its first: layer 1's codes are its second count's bytes
    with pytest.raises(ValueError, match="layer 1: out and codes overlap"):
        native.cpu.plane_popcounts_layers([(c.data_ptr(), 8, 2), (out.data_ptr() + 8, 8, 2)], out.data_ptr(), 4, 1)


def test_layers_stepped_one_by_one_are_all_checked_before_any_is_stepped():
    """Layers that share memory, one of them a strided view (the CPU backend steps a working
    copy of it): the call goes layer by layer, and still checks every layer before stepping
    any. A layer only the native checks refuse (its coef inside its own mom) stops the call
    with the layer named, the shared layer's state unchanged."""
    n, b = 257, 4
    codes, sign, scale = layer(n, b, seed=5)
    gen = torch.Generator().manual_seed(5)
    grad, coef = torch.randn(n, generator=gen) * 0.2, torch.rand(b, generator=gen) * 1e-3
    cbuf = torch.zeros(n, 2, dtype=torch.uint8)
    cbuf[:, 0] = codes
    st = [cbuf[:, 0], sign.clone(), torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)]
    bad = [codes.clone(), sign.clone(), torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)]
    bad_coef = bad[2].view(-1)[:4 * b].view(torch.float32)  # b zeros, inside the layer's own mom
    before = [t.clone() for t in st]
    lists = [[st[i], st[i], bad[i]] for i in range(4)]
    with pytest.raises(ValueError, match="layer 2: coef and mom overlap"):
        fk.bitplane_step_layers(*lists, [grad] * 3, [coef, coef, bad_coef], [scale] * 3, [b] * 3, 0.5, 0.9, [1, 2, 3])
    for a, want, name in zip(st, before, ("codes", "sign", "mom", "gs")):
        assert torch.equal(a, want), f"the shared layer's {name} was stepped before the refusal"
    # the same lists without the bad layer: stepped twice, in order, as the reference does
    ref = [codes.clone(), sign.clone(), torch.zeros(b, n, dtype=torch.uint8), torch.zeros(1)]
    want = torch.stack([R.bitplane_step(*ref, grad, coef, scale, b, 0.5, 0.9, k) for k in (1, 2)])
    got = fk.bitplane_step_layers(*[c[:2] for c in lists], [grad] * 2, [coef] * 2, [scale] * 2, [b] * 2, 0.5, 0.9, [1, 2])
    assert torch.equal(bits_of(got), bits_of(want))
    assert_state_equal(st, ref, "the shared layer, stepped twice")


def test_a_keys_tensor_on_another_device_is_refused_and_nothing_changes():
    """A keys tensor must be on the layers' device (it is read there, never on the host):
    one elsewhere (here meta next to CPU layers) is refused by name before any layer is
    stepped, not handed to a backend that fails half-way (it copied out of the meta tensor)."""
    lists, keys = _args("cpu")
    before = [[t.clone() for t in col] for col in lists[:4]]
    with pytest.raises(ValueError, match="keys is on meta, expected cpu"):
        fk.bitplane_step_layers(*lists, 0.5, 0.9, torch.tensor(keys, device="meta"))
    for col, old in zip(lists[:4], before):
        for a, b in zip(col, old):
            assert torch.equal(a, b)
