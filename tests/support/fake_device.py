"""A CPU-only stand-in for "a second device" that fails on any CPU/device mix, as CUDA does.

Real CUDA raises `Expected all tensors to be on the same device` when an op mixes a CUDA tensor
with a CPU tensor of one or more dimensions (0-dim CPU tensors pass as scalars), and rejects a
CPU generator for a CUDA draw. The `meta` device raises too, but cannot run data-dependent ops
(`nonzero`, boolean indexing, `.item()`), so it cannot run a training step or a sampler.

`FakeDeviceTensor` reports `device='meta'` but holds real CPU data: every op unwraps, checks that
no plain CPU tensor of ndim > 0 (and no CPU generator) meets a wrapped one, computes on the CPU
and wraps the result again. Inside `on_fake_device()`, `.to(FAKE)`, `model.to(FAKE)` and factory
calls with `device=FAKE` (or `device=x.device` of a wrapped x) make wrapped tensors; `.cpu()`
returns the plain CPU tensor. Copies between the devices (`.to`, `.cpu()`, `copy_`) are allowed,
like host <-> device copies; everything else that mixes raises `DeviceMixError`.

    with on_fake_device():
        model = tiny_bert().to(FAKE)
        out = diffusion_loss(model_forward, ids.to(FAKE), attn.to(FAKE), ...)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")
aten = torch.ops.aten

# Ops that may legitimately take tensors on both devices: explicit transfers.
_TRANSFERS = {
    aten._to_copy.default,
    aten.copy_.default,
    aten._copy_from.default,
    aten._copy_from_and_resize.default,
}


# Ops that make a real accelerator stop and answer the host: a scalar read (`.item()`, `bool()`,
# `float()`), and ops whose output size depends on the data (`nonzero`, boolean indexing, ...).
_SYNCS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


@dataclass
class Traffic:
    """What crossed between the host and the fake device, in order: `(kind, op)` events with kind
    `sync` (the device must answer the host), `download` (device -> host copy, which waits too) or
    `upload` (host -> device; `blocking_upload` unless asked non-blocking, as a pageable copy
    waits for the device). `mark(label)` starts a new section, e.g. one per training step."""

    events: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {"": []})
    current: str = ""

    def mark(self, label: str) -> None:
        self.current = label
        self.events.setdefault(label, [])

    def record(self, kind: str, func) -> None:
        self.events[self.current].append((kind, str(func)))

    def waits(self, label: str) -> list[tuple[str, str]]:
        """Everything in section `label` that makes the host wait for the device."""
        return [e for e in self.events.get(label, []) if e[0] in ("sync", "download", "blocking_upload")]


_RECORDERS: list[Traffic] = []


def _record(kind: str, func) -> None:
    for traffic in _RECORDERS:
        traffic.record(kind, func)


@contextlib.contextmanager
def recording_traffic():
    """Record host <-> device traffic of the fake device (see `Traffic`) while the context runs."""
    traffic = Traffic()
    _RECORDERS.append(traffic)
    try:
        yield traffic
    finally:
        _RECORDERS.remove(traffic)


def _count_traffic(func, args, kwargs, flat, fakes, target) -> None:
    """Classify one op on the fake device for the active recorders."""
    if func is aten._to_copy.default:
        source_fake = bool(fakes)
        if target is not None and not _is_fake_device(target) and source_fake:
            _record("download", func)
        elif _is_fake_device(target) and not source_fake:
            _record("upload" if kwargs.get("non_blocking") else "blocking_upload", func)
        return
    if func is aten.copy_.default:
        dest, src = args[0], args[1]
        if isinstance(src, FakeDeviceTensor) and not isinstance(dest, FakeDeviceTensor):
            _record("download", func)
        elif isinstance(dest, FakeDeviceTensor) and not isinstance(src, FakeDeviceTensor) and src.dim() > 0:
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            _record("upload" if non_blocking else "blocking_upload", func)
        return
    if func in _SYNCS and fakes:
        _record("sync", func)
        return
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and fakes:
        indices = args[1]
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None):
            _record("sync", func)  # a boolean index is a nonzero underneath


class DeviceMixError(RuntimeError):
    """An op mixed a tensor on the (fake) device with a CPU tensor, or used a CPU generator on it."""


class FakeDeviceTensor(torch.Tensor):
    """A tensor on the fake device: metadata says `meta`, `self.inner` holds the CPU data."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        if isinstance(inner, FakeDeviceTensor) or inner.device.type != "cpu":
            raise TypeError(f"FakeDeviceTensor wraps a plain CPU tensor, got {type(inner).__name__} on {inner.device}")
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=FAKE,
            requires_grad=requires_grad,
        )
        out.inner = inner
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    # Python code that special-cases data-less meta tensors (nn.Module.load_state_dict skips
    # copying into them, Module.to refuses to copy out of them) must treat these as real data.
    is_meta = property(lambda self: False)

    # A traceable wrapper subclass: nn.Module._apply swaps parameters in place (keeps tied weights tied).
    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return FakeDeviceTensor(inner_tensors["inner"])

    def __reduce_ex__(self, protocol):
        # torch.save of a device tensor: its data, read back on the CPU (as map_location="cpu" would).
        return self.inner.__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"FakeDeviceTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_fake_device(device) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    fakes = [a for a in flat if isinstance(a, FakeDeviceTensor)]
    target = kwargs.get("device")
    on_fake = bool(fakes) or _is_fake_device(target)
    if any(
        isinstance(a, torch.Tensor) and not isinstance(a, FakeDeviceTensor) and a.device.type == FAKE.type for a in flat
    ):
        raise DeviceMixError(f"{func}: a real (data-less) meta tensor; create it inside on_fake_device()")
    if not on_fake:
        return func(*args, **kwargs)
    if _RECORDERS:
        _count_traffic(func, args, kwargs, flat, fakes, target)
    if func not in _TRANSFERS:
        cpu = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, FakeDeviceTensor) and a.dim() > 0]
        if fakes and cpu:
            raise DeviceMixError(
                f"{func}: tensors on the device {[tuple(t.shape) for t in fakes]} mixed with CPU tensors "
                f"{[tuple(t.shape) for t in cpu]} (Expected all tensors to be on the same device)"
            )
        gens = [a for a in flat if isinstance(a, torch.Generator)]
        if any(g.device.type == "cpu" for g in gens):
            raise DeviceMixError(f"{func}: a CPU generator used for a draw on the device")
    inners = {id(t.inner): t for t in fakes}
    plain = {id(a) for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, FakeDeviceTensor)}
    args, kwargs = tree_map(lambda a: a.inner if isinstance(a, FakeDeviceTensor) else a, (args, kwargs))
    if _is_fake_device(target):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*args, **kwargs)
    if func is aten._to_copy.default and target is not None and not _is_fake_device(target):
        return out  # device -> host copy: a plain CPU tensor

    def wrap(value):
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeDeviceTensor):
            if id(value) in inners:  # in-place / out= ops return their (wrapped) argument
                return inners[id(value)]
            if id(value) in plain:  # e.g. a device -> host copy_ into a CPU tensor
                return value
            return FakeDeviceTensor(value)
        return value

    return tree_map(wrap, out)


class _FakeDeviceMode(TorchDispatchMode):
    """Routes factory calls and host -> device copies with device=FAKE to the wrapper."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


# Constructors from Python data build their tensor below the dispatcher (C++), so a dispatch mode
# never sees `device=FAKE` there: build on the CPU and move the result instead.
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class _FromDataMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], FakeDeviceTensor):
            _record("download", func)
            return args[0].inner.tolist()  # CUDA tensors allow it (a copy to the host)
        generator = kwargs.get("generator")
        device_draw = isinstance(generator, torch.Generator) and id(generator) in _DEVICE_GENERATORS
        if device_draw and _is_fake_device(kwargs.get("device")):  # a draw "on the device" with its generator
            return FakeDeviceTensor(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        if func in _FROM_DATA:
            device = kwargs.get("device")
            if func is torch.Tensor.new_tensor and device is None:
                device = args[0].device
            if _is_fake_device(device):
                return func(*args, **{**kwargs, "device": "cpu"}).to(FAKE)
        return func(*args, **kwargs)


# Generators "on the fake device": CPU generators that draws on it may use, as a CUDA generator
# serves CUDA draws. Their stream is the CPU's, so the fake device draws the CPU's numbers.
_DEVICE_GENERATORS: dict[int, torch.Generator] = {}


def _device_generator(original):
    def make(device, seed):
        if _is_fake_device(device):
            generator = torch.Generator().manual_seed(seed)
            _DEVICE_GENERATORS[id(generator)] = generator
            return generator
        return original(device, seed)

    return make


@contextlib.contextmanager
def on_fake_device():
    """Inside this context FAKE (`meta`) is a device with real data; see the module docstring.
    The samplers' device generators (`pipeline.diffusion.resident.device_generator`) work on it."""
    from pipeline.diffusion import resident

    original = resident.device_generator
    resident.device_generator = _device_generator(original)
    try:
        with _FromDataMode(), _FakeDeviceMode():
            yield FAKE
    finally:
        resident.device_generator = original


def to_cpu(value):
    """The plain CPU tensor behind a (possibly) wrapped one."""
    return value.inner if isinstance(value, FakeDeviceTensor) else value
