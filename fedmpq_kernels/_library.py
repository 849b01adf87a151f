"""The one ``fedmpq`` torch.library namespace that every op family defines its ops in.

Ops are defined with ``torch.library.Library(...).define/.impl`` rather than
``custom_op``: the call costs a few microseconds instead of tens (ARCHITECTURE.md), and
a client step makes about a hundred of them.
"""
from __future__ import annotations

import torch

lib = torch.library.Library("fedmpq", "DEF")

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_functorch_active = torch._C._are_functorch_transforms_active
# TorchDispatchModes in force (FlopCounterMode, a logging or recording mode): ~40 ns a call
_dispatch_modes = torch._C._len_torch_dispatch_stack


# Plain tensors: a Parameter is one too (its __torch_function__ is disabled), and the
# layers' scales and sinks are Parameters; before 2026-12-04 they sent every bit-plane
# layer's dequantize through the dispatcher and torch.library's autograd wrapper.
PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(x: torch.Tensor) -> bool:
    """Whether a public function may skip the dispatcher: a plain tensor (or Parameter), not being traced
    (anything traced, fake or a subclass must take the registered ``torch.ops.fedmpq`` op),
    no functorch transform around it or left over in it (vmap takes the registered op, through
    torch's per-sample fallback; torch.func.grad and jvp refuse it, as they refuse any op whose
    autograd is torch.library's on torch 2.13), and no TorchDispatchMode in force (a mode sees
    every op as ``fedmpq.<name>``, as it would see an aten op, not the native kernels' work
    unseen)."""
    # is_compiling first: dynamo cannot trace the dispatch-mode count
    return (type(x) in PLAIN and not torch.compiler.is_compiling() and not _dispatch_modes()
            and not _functorch_active() and not _is_wrapped(x))


def direct_apply(fn_cls):
    """``fn_cls.apply`` without ``torch.autograd.Function.apply``'s Python wrapper, which
    binds default arguments and looks for functorch transforms and dead wrappers on every
    call (1-2 µs). Only for calls :func:`_eager` admitted (its checks are those)."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, fn_cls)


# An op that writes into a tensor must tell autograd, as torch's own in-place ops do: a graph
# that saved the tensor (dequantize saves the codes and signs for its backward) then refuses
# to run backward on the overwritten values instead of giving a wrong gradient.
# torch._C._increment_version takes a sequence of tensors (a lone tensor would be iterated
# over its elements); ~45 ns a tensor. Inference tensors have no counter and are left alone.
bump_versions = torch._C._increment_version


def register_inplace(name: str, mutated: tuple) -> None:
    """Register ``fedmpq::name``'s ADInplaceOrView kernel: bump the version of the arguments
    ``mutated`` (their names in the schema) and go on to the backend, as
    ``torch.library.custom_op`` does for the ops it defines with mutated arguments. This
    serves ``torch.ops.fedmpq.name`` called directly and compiled graphs; the public
    functions' direct paths bump the versions themselves."""
    op = getattr(torch.ops.fedmpq, name).default
    names = [a.name for a in op._schema.arguments]
    where = [(names.index(m), m) for m in mutated]
    after = torch._C._after_ADInplaceOrView_keyset

    def impl(keyset, *args, **kwargs):
        bump_versions([args[i] if i < len(args) else kwargs[m] for i, m in where])
        return op.redispatch(keyset & after, *args, **kwargs)

    lib.impl(name, impl, "ADInplaceOrView", with_keyset=True)
