"""Reading the official FACTORIZER Lightning ``.ckpt`` files without the ``factorizer`` package.

A checkpoint is a ``torch.save`` dict (``state_dict`` with ``net.``-prefixed keys, plus Lightning's
``hyper_parameters``, ``optimizer_states``, ...). ``hyper_parameters`` pickles references to classes
of ``factorizer``, ``pytorch_lightning``, ``monai``, ``torch.nn`` and ``torch.optim``, so the file
cannot be read with ``weights_only=True`` and must not be read with plain pickle.

Order of operations (:func:`read_checkpoint`):

1. the file is read into memory once and its SHA-256 computed on those bytes; if an expected
   digest is given (from a manifest) a mismatch raises before anything is deserialised;
2. the same bytes are unpickled by ``torch.load(..., pickle_module=restricted_pickle)``, whose
   :class:`RestrictedUnpickler` resolves only an allow-list of globals (tensor/storage rebuilding,
   ``torch.Size``/dtypes/devices, numpy array/dtype/scalar reconstruction, ``collections``
   containers and inert builtins); globals of the training stack (``factorizer.*``,
   ``pytorch_lightning.*``, ``lightning*``, ``monai.*``, ``torchmetrics.*``, ``torch.optim.*``,
   ``torch.nn.*``) become inert :class:`Stub` classes that only record what they were given;
   anything else (``os.system``, ``builtins.eval``, ``subprocess.*``...) raises
   :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import types
from pathlib import Path

from bids_app.errors import WeightsError

#: module prefixes whose globals are replaced by inert stubs
STUB_PREFIXES = ("factorizer", "pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities",
                 "monai", "torchmetrics", "torch.optim", "torch.nn", "torchvision", "yaml", "omegaconf",
                 "__main__", "functools")
_TORCH_REBUILD = {
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                     "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy",
                     "_rebuild_meta_tensor_no_storage"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch": {"Size", "device", "Tensor", "strided", "sparse_coo"},
    "torch.nn.parameter": {"Parameter"},
}
_NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer"}
_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                  "numpy._core.numeric")
_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "slice", "range", "complex", "int", "float",
             "bool", "str", "bytes", "bytearray", "object", "NoneType", "Ellipsis"}
_COLLECTIONS = {"OrderedDict", "defaultdict", "deque", "Counter"}


class UnsafeCheckpointError(WeightsError, pickle.UnpicklingError):
    """A checkpoint referenced a global outside the allow-list."""


class Stub:
    """Inert stand-in for a foreign class: accepts any construction/state, does nothing else."""

    _stub_module = "?"
    _stub_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_stub_args"] = args
        obj.__dict__["_stub_kwargs"] = kwargs
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_stub_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def __getitem__(self, key):
        return self.__dict__.get("_stub_items", {})[key]

    def append(self, value):
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def __repr__(self):
        return f"<stub {self._stub_module}.{self._stub_name}>"


_STUBS: dict[tuple[str, str], type] = {}


def stub_class(module: str, name: str) -> type:
    """The (cached) inert stub class standing for ``module.name``."""
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name.replace(".", "_") or "Stub", (Stub,),
                           {"_stub_module": module, "_stub_name": name, "__module__": "stub." + module})
    return _STUBS[key]


def _stub_reconstructor(cls, base, state=None):  # copyreg._reconstructor for protocol 0/1 pickles
    obj = Stub.__new__(cls if isinstance(cls, type) and issubclass(cls, Stub) else stub_class("?", "?"))
    if state is not None:
        obj.__dict__["_stub_state"] = state
    return obj


def _is_stub_module(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in STUB_PREFIXES)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler with an allow-list of globals; the training stack's globals become stubs."""

    def find_class(self, module, name):
        import torch

        if module in _TORCH_REBUILD and name in _TORCH_REBUILD[module]:
            return getattr(__import__(module, fromlist=[name]), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
            return getattr(torch, name)
        if module in _NUMPY_MODULES and name in _NUMPY:
            return getattr(__import__(module, fromlist=[name]), name)
        if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            import numpy.dtypes

            return getattr(numpy.dtypes, name)
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            import builtins

            return getattr(builtins, name, type(None) if name == "NoneType" else None)
        if module == "collections" and name in _COLLECTIONS:
            return getattr(collections, name)
        if module == "copyreg" and name == "_reconstructor":
            return _stub_reconstructor
        if _is_stub_module(module):
            return stub_class(module, name)
        raise UnsafeCheckpointError(f"checkpoint references the global '{module}.{name}', which is not "
                                    "allowed (only tensors, plain containers and inert stubs are loaded)")


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


#: a module object usable as ``torch.load(..., pickle_module=restricted_pickle)``
restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = _restricted_load
restricted_pickle.loads = _restricted_loads
restricted_pickle.UnpicklingError = pickle.UnpicklingError
restricted_pickle.__version__ = "1"


def load_bytes(data: bytes, where: str = "checkpoint"):
    """Deserialise checkpoint bytes with the restricted unpickler (CPU tensors)."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                          pickle_module=restricted_pickle)
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(f"{where}: {exc}") from None
    except Exception as exc:
        raise WeightsError(f"{where}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


def read_checkpoint(path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """``(checkpoint dict, sha256 hex)``: hash the bytes, check them if a digest is given, then load."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (looked in {path.parent})")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != str(expected_sha256).strip().lower():
        raise WeightsError(f"{path}: SHA-256 mismatch (expected {str(expected_sha256).lower()}, got {sha})")
    ckpt = load_bytes(data, str(path))
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict)")
    return ckpt, sha


def net_state_dict(ckpt: dict, where: str = "checkpoint") -> "collections.OrderedDict":
    """``ckpt['state_dict']`` with the ``net.`` prefix removed; other keys are an error."""
    import torch

    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{where}: no 'state_dict' in the checkpoint (keys: {sorted(ckpt)[:8]})")
    out = collections.OrderedDict()
    foreign = []
    for key, value in sd.items():
        if not str(key).startswith("net."):
            foreign.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{where}: state_dict entry {key!r} is not a tensor")
        out[key[4:]] = value
    if foreign:
        raise WeightsError(f"{where}: state_dict keys without the 'net.' prefix: {foreign[:5]}")
    return out


def detect_architecture(sd: dict) -> str:
    """'swin-factorizer' if the state dict holds Factorizer sub-blocks, else 'resunet'."""
    return "swin-factorizer" if any(".blocks.nmf." in k for k in sd) else "resunet"


def infer_widths(sd: dict) -> tuple[int, ...]:
    """Level widths from the stem and the encoder downsampling convs of a (stripped) state dict."""
    try:
        widths = [int(sd["stem.weight"].shape[0])]
        i = 1
        while f"encoder.blocks.{i}.blocks.0.weight" in sd:
            widths.append(int(sd[f"encoder.blocks.{i}.blocks.0.weight"].shape[0]))
            i += 1
    except (KeyError, AttributeError, IndexError) as exc:
        raise WeightsError(f"state dict does not look like a FACTORIZER U-Net ({exc})") from None
    return tuple(widths)


def build_network(sd: dict, where: str = "checkpoint"):
    """Build the architecture the state dict belongs to and load it strictly; returns (net, arch, widths)."""
    from models.factorizer.resunet import ResUNet
    from models.factorizer.swin_factorizer import SwinFactorizer

    arch = detect_architecture(sd)
    widths = infer_widths(sd)
    try:
        net = SwinFactorizer(widths) if arch == "swin-factorizer" else ResUNet(widths)
    except ValueError as exc:
        raise WeightsError(f"{where}: unsupported {arch} widths {widths} ({exc})") from None
    load_strict(net, sd, where)
    return net, arch, widths


def load_strict(net, sd: dict, where: str = "checkpoint") -> None:
    """``load_state_dict(strict=True)`` with a readable :class:`WeightsError` (names, shapes)."""
    from models.weights import load_state_dict_strict

    load_state_dict_strict(net, sd, where)
