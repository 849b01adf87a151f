"""Backend selection: defaults, overrides, and loud failure when a forced backend is missing."""
import os
import subprocess
import sys

import pytest
import torch

import fedmpq_kernels
from fedmpq_kernels import registry
from fedmpq_kernels._native import native


def test_defaults_per_device():
    assert registry.backend_for("cpu") == ("cpu" if native is not None else "reference")
    assert registry.backend_for("meta") == "reference"


def test_override_applies_only_where_supported():
    with registry.use_backend("reference"):
        assert registry.backend_for("cpu") == "reference"
    with registry.use_backend("cuda"):  # CUDA C++ cannot take CPU tensors: CPU keeps its default
        assert registry.backend_for("cpu") == ("cpu" if native is not None else "reference")
    assert registry.backend_for("cpu") == ("cpu" if native is not None else "reference")


@pytest.fixture
def reference_only_family(tmp_path, monkeypatch):
    """A family ``fedmpq_kernels.refonly`` with a reference.py only."""
    pkg = tmp_path / "refonly"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reference.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.setattr(fedmpq_kernels, "__path__", [*fedmpq_kernels.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_cache", {})
    yield "refonly"
    for name in [m for m in sys.modules if m.startswith("fedmpq_kernels.refonly")]:
        del sys.modules[name]


def test_a_backend_a_family_lacks_is_skipped(reference_only_family):
    fam = reference_only_family
    assert registry.has(fam, "reference") and not registry.has(fam, "cpu")
    assert all(registry.has("fake_quant", b) for b in registry.BACKENDS)
    assert registry.backend_for("cpu", fam) == "reference"
    assert registry.get(fam, "twice", "cpu")(3) == 6
    assert registry.get(fam, "twice", "cpu") is registry.get(fam, "twice", "cpu")
    with registry.use_backend("cpu"):  # forced, but this family has no cpu.py: its defaults
        assert registry.backend_for("cpu", fam) == "reference"
        assert registry.backend_for("cpu", "fake_quant") == ("cpu" if native is not None else "reference")


@pytest.mark.skipif(native is None, reason="native module not built")
def test_an_op_a_backend_lacks_falls_back_to_the_next_that_has_it(reference_only_family, tmp_path):
    """cpu.py implements only some ops: the others come from the reference, per op."""
    (tmp_path / "refonly" / "reference.py").write_text("def twice(x):\n    return 2 * x\n\ndef thrice(x):\n    return 3 * x\n")
    (tmp_path / "refonly" / "cpu.py").write_text("def twice(x):\n    return ('cpu', 2 * x)\n")
    fam = reference_only_family
    assert registry.get(fam, "twice", "cpu")(3) == ("cpu", 6)
    assert registry.get(fam, "thrice", "cpu")(3) == 9
    with pytest.raises(AttributeError, match="no implementation"):
        registry.get(fam, "nothing", "cpu")


def test_a_family_override_applies_to_that_family_only_and_wins():
    """use_backend(name, family=...) forces one family; it wins over an override for every
    family, applies only where the backend runs (CPU tensors: not cuda), and each scope
    restores its own previous choice."""
    default = registry.backend_for("cpu", "fake_quant")
    with registry.use_backend("reference", family="bitplane"):
        assert registry.backend_for("cpu", "bitplane") == "reference"
        assert registry.backend_for("cpu", "fake_quant") == default
        assert registry.get("bitplane", "plane_popcounts", "cpu").__module__.endswith(".reference")
        with registry.use_backend("cpu"):  # for every family: the family's own entry still wins
            assert registry.backend_for("cpu", "bitplane") == "reference"
            if native is not None:
                assert registry.backend_for("cpu", "pack") == "cpu"
        with registry.use_backend("cuda", family="bitplane"):  # not on CPU tensors: the defaults
            assert registry.backend_for("cpu", "bitplane") == default
        assert registry.backend_for("cpu", "bitplane") == "reference"
        assert registry.explain()[-1].startswith("forced    bitplane=reference")
    assert registry.backend_for("cpu", "bitplane") == default
    assert not registry.explain()[-1].startswith("forced")


def test_override_lists_and_their_errors():
    try:
        registry.set_backends_from(" reference , bitplane=cpu,")
        assert registry.backend_for("cpu", "fake_quant") == "reference"
        assert registry.backend_for("cpu", "bitplane") == ("cpu" if native is not None else "reference")
    finally:
        registry.set_backend(None)
        registry.set_backend(None, family="bitplane")
    with pytest.raises(ValueError, match="FEDMPQ_BACKEND entry 'bitplan=triton': unknown op family 'bitplan'"):
        registry.set_backends_from("bitplan=triton")
    with pytest.raises(ValueError, match="entry 'pack=fast': unknown backend 'fast'"):
        registry.set_backends_from("pack=fast")
    with pytest.raises(ValueError, match="unknown op family 'nope'"):
        registry.use_backend("cpu", family="nope").__enter__()
    assert registry.backend_for("cpu", "pack") == ("cpu" if native is not None else "reference")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        registry.set_backend("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forcing_an_unavailable_backend_fails_loudly():
    with registry.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="'cuda' was requested but is not available"):
            registry.backend_for("cuda")


def test_env_override_and_info_command():
    env = dict(os.environ, FEDMPQ_BACKEND="reference")
    out = subprocess.run([sys.executable, "-m", "fedmpq_kernels.info"], env=env, capture_output=True, text=True, check=True).stdout
    assert "fake_quant      cpu   -> reference" in out
    env = dict(os.environ, FEDMPQ_BACKEND="bitplane=reference")
    out = subprocess.run([sys.executable, "-m", "fedmpq_kernels.info"], env=env, capture_output=True, text=True, check=True).stdout
    assert "bitplane_step   cpu   -> reference" in out and "forced    bitplane=reference" in out
    assert "bitplane_step_layers cpu   -> reference" in out  # the many-layer ops follow their one-layer op
    if native is not None:
        assert "fake_quant      cpu   -> cpu" in out
    env = dict(os.environ, FEDMPQ_BACKEND="bitplane=fast")
    res = subprocess.run([sys.executable, "-m", "fedmpq_kernels.info"], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "FEDMPQ_BACKEND entry 'bitplane=fast': unknown backend 'fast'" in res.stderr
    assert "torch          " + torch.__version__ in out
    out = subprocess.run([sys.executable, "-m", "fedmpq_kernels.info"], capture_output=True, text=True, check=True).stdout
    if native is not None:
        assert "native module  loaded from" in out and f"isa={native.cpu_isa()}" in out
        assert "fake_quant      cpu   -> cpu" in out
        for op in ("dequantize_layers", "plane_popcounts_layers", "bitplane_step_layers"):  # not "no kernel"
            assert f"  {op:15s} cpu   -> cpu\n" in out
    else:
        assert "native module  NOT LOADED:" in out


@pytest.mark.parametrize("version, ok", [("3.2.0", False), ("3.3.1", False), ("2.3.1", False), ("unknown", False),
                                         ("3.4.0", False), ("3.5.1", False), ("3.6.0", True),
                                         ("3.6.0+git1a2b3c", True), ("3.10.0", True), ("4.0.0", True)])
def test_triton_older_than_the_tested_floor_is_not_available(monkeypatch, version, ok):
    # Triton 3.4/3.5 flush subnormals in the kernels' divisions on a GPU, 3.2/3.3's interpreter
    # fails inside the kernels (no int1) and 3.0/3.1's wants constexpr aranges: an older Triton
    # is refused with the reason, not picked to give other numbers or crash later.
    import types

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got, why = registry.available("triton")
    assert got == ok
    if not ok:
        assert why == (f"triton {version} is older than 3.6, the oldest these kernels are tested with "
                       "(pip install 'triton>=3.6')")


def test_an_ops_fallback_skips_a_backend_that_is_not_available(reference_only_family, tmp_path, monkeypatch):
    """CUDA tensors go to the CUDA C++ backend first, then Triton, then the reference; an op
    the chosen backend lacks comes from the next one in that order that is available and has
    it: with Triton not installed, an op cuda.py lacks comes from the reference, never from
    a triton.py that cannot run (simulated: availability is the registry's to report)."""
    (tmp_path / "refonly" / "reference.py").write_text("def twice(x):\n    return 2 * x\n\ndef thrice(x):\n    return 3 * x\n")
    (tmp_path / "refonly" / "cuda.py").write_text("def twice(x):\n    return ('cuda', 2 * x)\n")
    (tmp_path / "refonly" / "triton.py").write_text("def thrice(x):\n    return ('triton', 3 * x)\n")
    fam = reference_only_family
    monkeypatch.setattr(registry, "available", lambda name: (name != "triton", "" if name != "triton" else "not here"))
    assert registry.backend_for("cuda", fam) == "cuda"
    assert registry.get(fam, "twice", "cuda")(3) == ("cuda", 6)
    assert registry.get(fam, "thrice", "cuda")(3) == 9
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "available", lambda name: (True, ""))  # Triton there: it is next in order
    assert registry.backend_for("cuda", fam) == "cuda"  # CUDA C++ first, Triton after it
    assert registry.get(fam, "twice", "cuda")(3) == ("cuda", 6)
    assert registry.get(fam, "thrice", "cuda")(3) == ("triton", 9)


def test_triton_runs_cpu_tensors_only_in_its_interpreter(monkeypatch):
    """Triton kernels take CPU tensors only under TRITON_INTERPRET=1 (the CI path): without
    it, forcing triton leaves CPU tensors on their default backend (the test session sets the
    variable on a machine without a GPU, so it is removed here)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not registry.supports("triton", "cpu") and registry.supports("triton", "cuda")
    with registry.use_backend("triton"):
        assert registry.backend_for("cpu", "fake_quant") == ("cpu" if native is not None else "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.supports("triton", "cpu")


@pytest.mark.parametrize("archs, caps, bad", [
    ("80,90", [(9, 0)], None), ("80,90", [(8, 6)], None), ("80,90", [(8, 9), (9, 0)], None),
    ("80,90", [(10, 0)], None), ("80,90", [(12, 0)], None),  # PTX: the driver compiles it for newer devices
    ("80,90", [(7, 5)], 0), ("80,90", [(9, 0), (7, 0)], 1),  # a T4, a V100 beside an H100
    ("75,80,90", [(7, 5)], None),
    ("80-real,90-real", [(8, 6)], None), ("80-real,90-real", [(10, 0)], 0),  # machine code only
    ("80-virtual", [(8, 0)], None), ("90-virtual", [(8, 9)], 0),
    ("90a-real", [(9, 0)], None), ("90a", [(10, 0)], 0), ("100f", [(10, 3)], None), ("100f", [(12, 0)], 0),
    ("native", [(7, 5)], None), ("80;90", [(8, 0)], None), ("80,90", [], None),
])
def test_which_devices_the_compiled_architectures_run_on(archs, caps, bad):
    why = registry.arch_problem(archs, caps)
    if bad is None:
        assert why == ""
    else:
        major, minor = caps[bad]
        assert why.startswith(f"fedmpq_kernels._C's CUDA kernels were compiled for sm {archs}, which cannot run on "
                              f"CUDA device {bad} (sm_{major}{minor}); rebuild with FEDMPQ_CUDA_ARCHS including "
                              f"{major}{minor}")


def test_cuda_kernels_that_cannot_run_on_the_device_leave_cuda_tensors_to_triton(monkeypatch):
    """A module built for sm 80/90 on a T4 (sm_75): the CUDA backend is unavailable with the
    reason, and CUDA tensors go to Triton, not to kernels that fail with "no kernel image"."""
    import types

    from fedmpq_kernels import _native

    stub = types.SimpleNamespace(with_cuda=True, cuda_device_count=lambda: 1, cuda_archs=lambda: "80,90")
    monkeypatch.setattr(_native, "native", stub)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(registry, "_cache", {})
    ok, why = registry.available("cuda")
    assert not ok and "cannot run on CUDA device 0 (sm_75)" in why
    assert registry.backend_for("cuda", "fake_quant") == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    assert registry.available("cuda") == (True, "")
    assert registry.backend_for("cuda", "fake_quant") == "cuda"


def test_the_eager_paths_caches_follow_every_backend_change(monkeypatch):
    """fake_quant and relu6_fake_quant keep their backend's functions per device type after
    the first call (registry.derived_cache): a backend forced later, and the default again
    after it, must still be the one that runs."""
    from fedmpq_kernels.fake_quant import reference

    ran = []
    for op in ("fake_quant", "relu6_fake_quant", "fake_quant_backward"):
        real = getattr(reference, op)
        monkeypatch.setattr(reference, op, lambda *a, _op=op, _real=real: ran.append(_op) or _real(*a))
    x = torch.randn(37, requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)

    def calls():
        (fedmpq_kernels.fake_quant(x, 4, s, ste="clipped").sum() + fedmpq_kernels.relu6_fake_quant(x, 3).sum()).backward()
        fedmpq_kernels.fake_quant(x.detach(), 4, s.detach())

    calls()  # the default backend, now cached
    assert ran == []
    with registry.use_backend("reference"):
        calls()
    assert sorted(ran) == ["fake_quant", "fake_quant", "fake_quant_backward", "fake_quant_backward", "relu6_fake_quant"]
    del ran[:]
    calls()
    assert ran == []


def test_the_bitplane_fast_paths_caches_follow_every_backend_change(monkeypatch):
    """binarize, dequantize (with and without gradients), plane_popcounts and bitplane_step
    keep the CPU backend's functions after the first call (registry.derived_cache): a backend
    forced later, and the default again after it, must still be the one that runs."""
    from fedmpq_kernels.bitplane import reference

    ran = []
    for op in ("binarize", "dequantize", "dequantize_backward", "plane_popcounts", "bitplane_step"):
        real = getattr(reference, op)
        monkeypatch.setattr(reference, op, lambda *a, _op=op, _real=real: ran.append(_op) or _real(*a))
    codes, sign, scale = fedmpq_kernels.binarize(torch.randn(37), 3)
    mom, gs = torch.zeros(3, 37, dtype=torch.uint8), torch.zeros(1)

    def calls():
        fedmpq_kernels.binarize(torch.randn(37), 3)
        sc, sink = scale.clone().requires_grad_(), fedmpq_kernels.sink_like((37,)).requires_grad_()
        fedmpq_kernels.dequantize(codes, sign, sc, 3, sink).sum().backward()
        fedmpq_kernels.dequantize(codes, sign, scale, 3, sink.detach())
        fedmpq_kernels.plane_popcounts(codes, 3)
        fedmpq_kernels.bitplane_step(codes, sign, mom, gs, torch.randn(37), torch.zeros(3), scale, 3, 0.1, 0.9, 5)

    calls()  # the default backend, now cached
    assert ran == []
    with registry.use_backend("reference"):
        calls()
    assert sorted(ran) == sorted(["binarize", "dequantize", "dequantize_backward", "dequantize", "plane_popcounts",
                                  "bitplane_step"])
    del ran[:]
    calls()
    assert ran == []


def test_the_backend_case_pins_its_isa_for_the_whole_test(backend):
    """A CPU case's kernels run on its own instruction set outside ``backend.active()`` too
    (a direct call of ``backend.module(...)``'s functions ran cpu-portable on AVX2)."""
    if backend.isa is None:
        pytest.skip("no instruction set of its own")
    assert native.cpu_isa() == backend.isa
    with backend.active():
        assert native.cpu_isa() == backend.isa
    assert native.cpu_isa() == backend.isa


def test_a_lookup_in_flight_during_a_backend_change_does_not_store_the_old_choice(monkeypatch):
    """A thread's first call looked its backend up inside a ``use_backend("reference")``
    block and stored it after the block had ended and emptied the caches: every later call
    in the process ran the reference (a thread audit: 333 of 2,000 blocks). An entry is now
    stored only if no backend change came between its lookup and its store (else it is
    looked up again): after the block, fake_quant runs the CPU backend again."""
    import threading

    import fedmpq_kernels as fk
    from fedmpq_kernels.fake_quant import ops as fq_ops

    if native is None:
        pytest.skip("needs the CPU backend")
    x = torch.randn(8)
    reached, release = threading.Event(), threading.Event()
    real = registry.backend_for
    worker = threading.Thread(target=lambda: fk.fake_quant(x, 4))

    def paused(device_type, family=None):
        name = real(device_type, family)
        if threading.current_thread() is worker and not release.is_set():
            reached.set()  # looked up under the block's choice; stored only after it ends
            release.wait(30)
        return name

    monkeypatch.setattr(registry, "backend_for", paused)
    registry.set_backend(None)  # empty caches: the worker's call looks its backend up
    with registry.use_backend("reference"):
        worker.start()
        assert reached.wait(30)
    release.set()
    worker.join(30)
    assert not worker.is_alive()
    assert fq_ops._EAGER["cpu"][0].__module__ == "fedmpq_kernels.fake_quant.cpu"
    assert registry.get("fake_quant", "fake_quant", "cpu").__module__ == "fedmpq_kernels.fake_quant.cpu"


def test_companions_come_from_the_one_module_of_the_functions_given():
    """registry.companions: a backend's own forms of its ops, from the module that defined
    every function given; None when they come from two modules or it lacks one."""
    from fedmpq_kernels.fake_quant import cpu, reference

    names = ("fake_quant_kept", "fake_quant_backward_kept", "kept_tensor")
    assert registry.companions((cpu.fake_quant, cpu.fake_quant_backward), names) == (
        cpu.fake_quant_kept, cpu.fake_quant_backward_kept, cpu.kept_tensor)
    assert registry.companions((cpu.fake_quant, reference.fake_quant_backward), names) is None
    assert registry.companions((reference.fake_quant, reference.fake_quant_backward), names) is None
    assert registry.companions((cpu.fake_quant,), ("fake_quant_kept", "no_such_form")) is None
