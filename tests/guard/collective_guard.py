"""A check the multi-rank tests run in every rank: each tensor handed to a torch.distributed
collective must live on the engine's device, as NCCL demands on GPUs.

On a CPU machine the engine's device *is* the host, so ``tensor.device`` alone cannot tell a
tensor that was put on the accelerator from one that never left the host. The guard therefore
tracks where each tensor came from (a ``TorchFunctionMode`` sees every torch call in Python):

- *host-built*: made by a factory (``torch.tensor``, ``zeros``, ``full``, ``arange``,
  ``from_numpy``, ...) without naming a device, or moved back with ``.cpu()``; the result of
  an operation whose tensor inputs are all host-built is host-built too (on a GPU machine all
  of these are CPU tensors);
- placed: created with a ``device=`` argument, or moved with ``.to(...)``/``.cuda()``; and
  tensors the tracking never saw (parameters, gradients, autograd results) are not suspected.

A collective fails when any tensor it gets is host-built, or when its ``device.type`` differs
from the accelerator's (``torch.device(get_accelerator().device_name())``; a ``meta`` tensor, say).
What it cannot see: a tensor created with ``device="cpu"`` spelled out, which on this machine is
indistinguishable from the CPU engine's own device.

``install()`` is called at interpreter start by ``sitecustomize.py`` in this folder when
``INSTRUCTRETRO_COLLECTIVE_GUARD=1`` (the multi-rank tests put the folder on PYTHONPATH).
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import weakref

import torch
from torch.overrides import TorchFunctionMode

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "_all_gather_base", "_reduce_scatter_base", "send", "recv", "isend", "irecv")
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye, torch.zeros_like,
             torch.ones_like, torch.full_like, torch.empty_like}
_host: dict[int, weakref.ref] = {}
calls = {"checked": 0}


def is_host_built(t: torch.Tensor) -> bool:
    ref = _host.get(id(t))
    return ref is not None and ref() is t


def _mark(t, host: bool) -> None:
    if not isinstance(t, torch.Tensor):
        return
    key = id(t)
    if host:
        _host[key] = weakref.ref(t, lambda _, key=key: _host.pop(key, None))
    else:
        _host.pop(key, None)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class _Provenance(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in FACTORIES:
            host = kwargs.get("device") is None
            if host and func in (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like):
                host = is_host_built(args[0])
        elif name in ("to", "cuda"):
            host = False
        elif name == "cpu":
            host = True
        else:
            inputs = list(_tensors(args)) + list(_tensors(kwargs))
            host = bool(inputs) and all(is_host_built(t) for t in inputs)
        for t in _tensors(out):
            _mark(t, host)
        return out


def expected_device_type() -> str:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name()).type


def check(name: str, args, kwargs) -> None:
    want = expected_device_type()
    for t in _tensors(list(args) + list(kwargs.values())):
        if t.device.type != want:
            raise RuntimeError(f"collective guard: {name} got a tensor on {t.device}, the engine's device is {want}")
        if is_host_built(t):
            raise RuntimeError(f"collective guard: {name} got a host-built tensor {tuple(t.shape)} {t.dtype} "
                               f"(never put on the engine's device; NCCL refuses it)")
    calls["checked"] += 1


def _wrap(name: str, fn):
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        check(name, args, kwargs)
        return fn(*args, **kwargs)

    guarded.__guarded__ = True
    return guarded


_original_from_numpy = torch.from_numpy


def _from_numpy(array):
    out = _original_from_numpy(array)
    _mark(out, True)
    return out


def install() -> None:
    """Track tensor provenance and guard every collective in this process."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    if getattr(dist.all_reduce, "__guarded__", False):
        return
    for module in (dist, c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                setattr(module, name, _wrap(name, getattr(module, name)))
    torch.from_numpy = _from_numpy
    _Provenance().__enter__()  # stays on for the life of the process
    atexit.register(_report)


def _report() -> None:
    """One line per process that made collectives, so a test can see the guard was on."""
    if calls["checked"]:
        print(f"collective guard: rank {os.environ.get('RANK', '0')} checked {calls['checked']} collectives",
              file=sys.stderr)
