"""A second device on a CPU-only machine, so that a test can catch a tensor left on the wrong device.

`OnFakeDevice()` is a dispatch mode in which `FAKE` (reported as the `meta` device, which autograd
and every tensor factory understand) is a real device: a tensor created on it or moved to it
(`.to(FAKE)`, `model.to(FAKE)`) is a `DeviceTensor` whose data lives on the CPU but which says it
lives on `FAKE`, and every op on it computes for real. An op that mixes a `DeviceTensor` with an
ordinary CPU tensor raises `MixedDevices`, as CUDA does ("Expected all tensors to be on the same
device"), with the same exceptions CUDA makes: 0-dim CPU tensors (scalars), copies between devices,
and CPU index tensors. `.item()`, `.tolist()` and `.cpu()` work, as on a GPU.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

FAKE = torch.device("meta")

# Ops that take tensors on two devices on a real GPU too.
_CROSS_DEVICE = {"_to_copy.default", "copy_.default", "_local_scalar_dense.default", "lift_fresh.default"}
# Ops whose CPU index tensors CUDA accepts.
_INDEXING = {"index.Tensor", "index_put_.default", "index_put.default", "_index_put_impl_.default"}


class MixedDevices(RuntimeError):
    """An op mixed tensors of the fake device with ordinary CPU tensors."""


class DeviceTensor(torch.Tensor):
    """CPU data that reports `FAKE` as its device."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            layout=data.layout, device=FAKE, requires_grad=data.requires_grad,
        )  # fmt: skip
        tensor.data_ = data
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a fake-device tensor outside OnFakeDevice()")

    def tolist(self):
        return self.data_.tolist()

    def __repr__(self) -> str:
        return f"DeviceTensor({self.data_!r})"


def _unwrap(x):
    return x.data_ if isinstance(x, DeviceTensor) else x


def _wrap(x):
    return DeviceTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) else x


class _FromPythonData(TorchFunctionMode):
    """`torch.tensor(...)` / `torch.as_tensor(...)` on the fake device: they build their tensor below
    the dispatcher, where a meta tensor would come out without data, so they are built on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and target is not None and torch.device(target) == FAKE:
            return DeviceTensor(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


class OnFakeDevice(TorchDispatchMode):
    """While active, `FAKE` is a real device whose tensors must not meet ordinary CPU tensors."""

    def __enter__(self):
        self._python_data = _FromPythonData()
        self._python_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._python_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        on_device = any(isinstance(x, DeviceTensor) for x in tensors)
        if on_device and name not in _CROSS_DEVICE:
            checked = tree_leaves((args[:1], kwargs)) if name in _INDEXING else tensors
            host = [x for x in checked if isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor)]
            if any(x.dim() > 0 for x in host):
                shapes = [(type(x).__name__, tuple(x.shape)) for x in tensors]
                raise MixedDevices(f"{func} mixes the device with the host: {shapes}")
        target = kwargs.get("device")
        wrap = on_device
        if target is not None:
            wrap = torch.device(target).type == FAKE.type  # created on, or moved to, the fake device
            kwargs = {**kwargs, "device": torch.device("cpu")}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if name == "_local_scalar_dense.default":
            return out
        if func._schema.is_mutable and isinstance(args[0], DeviceTensor):
            return args[0]  # an in-place op returns the tensor it changed
        return tree_map(_wrap, out) if wrap else out


def is_on_fake(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DeviceTensor)
