"""A second device on a CPU-only machine, for tests: tensors and models moved to ``FOREIGN`` still compute on the CPU,
but report ``device`` = FOREIGN and refuse what CUDA refuses — an op between them and (non-scalar) CPU tensors, a CPU
tensor indexed by them, a CPU generator drawing for them, ``.numpy()`` without ``.cpu()``."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FOREIGN = torch.device("meta")  # the name the foreign tensors report; nothing is ever allocated there


class MixedDevices(RuntimeError):
    pass


class Foreign(torch.Tensor):
    """A CPU tensor that says it lives on FOREIGN."""

    @property
    def device(self):
        return FOREIGN

    def __deepcopy__(self, memo):  # copy.deepcopy(model): a Foreign copy, a parameter again if this was one
        if id(self) not in memo:
            with torch._C.DisableTorchFunctionSubclass():
                new = self.detach().clone()
            new = new.as_subclass(Foreign).requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                new._is_param = True
            memo[id(self)] = new
        return memo[id(self)]


_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put}
_NOT_COMPUTE = {"_has_compatible_shallow_copy_type", "is_same_size", "__get__", "__set__", "__len__", "dim", "size",
                "numel", "requires_grad_", "detach", "item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                "__format__", "__repr__", "__reduce_ex__", "__hash__", "data_ptr", "element_size", "stride",
                "is_floating_point", "is_complex", "storage_offset", "untyped_storage", "_is_view", "is_contiguous"}
_TO_PYTHON = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__len__", "dim", "size", "numel",
              "__format__", "__repr__", "__hash__"}


def _device_arg(func, args, kwargs):
    """The device a call asks for (factories, .to, .new_*), or None."""
    d = kwargs.get("device")
    if func is torch.Tensor.to:
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                d = a
            elif isinstance(a, torch.Tensor):
                d = a.device
    return None if d is None or isinstance(d, int) else torch.device(d)


def _cpu_args(args, kwargs):
    def swap(a):
        return torch.device("cpu") if isinstance(a, (str, torch.device)) and torch.device(a) == FOREIGN else a
    return [swap(a) for a in args], {k: swap(v) for k, v in kwargs.items()}


def _wrap(t):
    return t.as_subclass(Foreign) if isinstance(t, torch.Tensor) and not isinstance(t, Foreign) else t


class ForeignDevice(TorchFunctionMode):
    """``with ForeignDevice(): model.to(FOREIGN) ...``: see the module docstring. Module parameters become Foreign
    (``torch.__future__.set_overwrite_module_params_on_conversion(True)`` while the mode is on)."""

    def __enter__(self):
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        foreign = any(isinstance(t, Foreign) for t in tensors)
        target = _device_arg(func, args, kwargs)
        if target == FOREIGN:  # a move or a factory onto the foreign device
            args, kwargs = _cpu_args(args, kwargs)
            with torch._C.DisableTorchFunctionSubclass():
                return tree_map(_wrap, func(*args, **kwargs))
        if func is torch.Tensor.cpu or (target is not None and target.type == "cpu" and func is torch.Tensor.to):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out if out is not args[0] else out.as_subclass(torch.Tensor)
        if foreign and name == "numpy":
            raise TypeError("can't convert a tensor on another device to numpy; use .cpu() first (as on CUDA)")
        if foreign and name not in _NOT_COMPUTE:
            gen = kwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                raise MixedDevices(f"{name}: a CPU generator for tensors on another device")
            cpu = [t for t in tensors if not isinstance(t, Foreign) and t.dim() > 0]
            if func in _INDEXING:
                if not isinstance(args[0], Foreign):
                    raise MixedDevices(f"{name}: a CPU tensor indexed with tensors on another device")
                # CUDA accepts CPU index tensors for a CUDA tensor; a CPU value written into it must be a scalar
                values = tree_flatten(args[2:] + tuple(kwargs.values()))[0] if func is not torch.Tensor.__getitem__ else []
                cpu = [t for t in values if isinstance(t, torch.Tensor) and not isinstance(t, Foreign) and t.dim() > 0]
            if cpu:
                raise MixedDevices(f"{name}: tensors on two devices ({[tuple(t.shape) for t in cpu]} on the CPU)")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        return tree_map(_wrap, out) if foreign and name not in _TO_PYTHON else out


def transform_keeps_device(transform):
    """torch.func transforms return plain tensors from Foreign inputs; this wrapper gives their outputs the device
    of their inputs back (as on CUDA), so that code after a vmap is checked too."""

    def wrapped(fn, *a, **kw):
        inner = transform(fn, *a, **kw)

        def call(*args, **kwargs):
            out = inner(*args, **kwargs)
            if any(isinstance(t, Foreign) for t in tree_flatten((args, kwargs))[0]):
                out = tree_map(_wrap, out)
            return out
        return call
    return wrapped
