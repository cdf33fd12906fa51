"""Checked reading of the SEALS files: hash first, then deserialise *the same bytes*.

Every file is read into memory once, its SHA-256 computed (and compared with a user manifest when
one is given), and only then deserialised from those bytes, so what was checked is what is loaded.

``.model`` checkpoints (``torch.save`` dicts) are loaded in this order:

1. ``torch.load(weights_only=True)``;
2. ``weights_only=True`` with numpy scalars/arrays/dtypes allow-listed (nnU-Net stores numpy
   floats in ``plot_stuff``/``best_stuff``);
3. only if both fail: ``weights_only=False`` through a *stubbing* unpickler. Tensors, storages,
   ``OrderedDict``, torch dtypes/sizes and numpy types resolve normally; every other global
   (optimizer classes, foreign objects) is replaced by an inert stub, so no foreign code is imported
   or called. Only ``state_dict`` is used, and it must hold plain tensors.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import pickle
import types
from pathlib import Path

from bids_app.errors import WeightsError
from models.seals.plans import _ALLOWED, restricted_loads

log = logging.getLogger("deepisles.models.seals")


def read_checked(root: Path, rel: str, manifest: dict | None = None) -> tuple[bytes, str]:
    """Bytes and SHA-256 of ``root/rel``; with ``manifest`` the digest must match its entry."""
    path = Path(root) / rel
    if not path.is_file():
        raise WeightsError(f"{path}: SEALS weights file not found (looked in {path.parent})")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if manifest is not None:
        expected = manifest.get(rel)
        if expected is None:
            raise WeightsError(f"checksum manifest has no entry for {rel}")
        if str(expected).strip().lower() != digest:
            raise WeightsError(f"{path}: SHA-256 mismatch (expected {expected}, got {digest}); "
                               "file not loaded")
    return data, digest


def load_pickle(data: bytes, where: str):
    """A ``plans.pkl`` / ``.model.pkl`` (already checked bytes) through the restricted unpickler."""
    return restricted_loads(data, where)


# ----------------------------------------------------------------------------- .model checkpoints
def _numpy_safe_globals() -> list:
    """(object, qualified name) pairs for torch's allow-list, under numpy 1 and numpy 2 names."""
    out = []
    for (mod, name), obj in _ALLOWED.items():
        if mod.startswith("numpy"):
            out.append((obj, f"{mod}.{name}"))
    return out


class _Stub:
    """Inert stand-in for a refused global: accepts any construction/state, does nothing."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        self._state = state

    def __call__(self, *args, **kwargs):  # a stubbed *function* used in a REDUCE
        return _Stub(*args, **kwargs)


def _stub_for(module: str, name: str):
    return type(f"Stub[{module}.{name}]", (_Stub,), {"__module__": "models.seals.checkpoint._stubs"})


def _torch_allowed(module: str, name: str):
    import torch

    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter",
                                             "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy"):
        return getattr(torch._utils, name, None)
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == "torch" and name == "device":
        return torch.device
    if module == "torch" and name.endswith("Storage") and hasattr(torch, name):
        return getattr(torch, name)  # legacy typed storages (type markers in the persistent ids)
    if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
        return getattr(torch.storage, name)
    return None


def _stubbing_pickle_module(where: str, refused: list):
    class StubbingUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = _ALLOWED.get((module, name)) or _torch_allowed(module, name)
            if obj is not None:
                return obj
            refused.append(f"{module}.{name}")
            return _stub_for(module, name)

    mod = types.ModuleType("seals_stubbing_pickle")
    mod.Unpickler = StubbingUnpickler
    mod.load = lambda f, **kw: StubbingUnpickler(f, **kw).load()
    mod.loads = lambda b, **kw: StubbingUnpickler(io.BytesIO(b), **kw).load()
    mod.__dict__["where"] = where
    return mod


def load_model_checkpoint(data: bytes, where: str) -> dict:
    """The checkpoint dict of a ``.model`` file (bytes already checked). See the module docstring."""
    import torch

    errors = []
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        how = "weights_only"
    except Exception as exc:  # noqa: BLE001 - any failure means "try the next, still safe, way"
        errors.append(_first_line(exc))
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            how = "weights_only+numpy"
        except Exception as exc2:  # noqa: BLE001
            errors.append(_first_line(exc2))
            refused: list[str] = []
            try:
                ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                                  pickle_module=_stubbing_pickle_module(where, refused))
            except Exception as exc3:  # noqa: BLE001
                raise WeightsError(f"{where}: cannot read the checkpoint ({'; '.join(errors)}; "
                                   f"restricted unpickler: {_first_line(exc3)})") from None
            how = "stubbing unpickler"
            if refused:
                log.warning("%s: %d non-weight object(s) replaced by inert stubs: %s", where,
                            len(refused), ", ".join(sorted(set(refused))[:8]))
    log.debug("%s loaded via %s", where, how)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise WeightsError(f"{where}: not an nnU-Net v1 checkpoint (no 'state_dict'; found {keys})")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{where}: 'state_dict' is not a mapping of tensors")
    return ckpt


def _first_line(exc) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if "Unsupported global" in line or "error" in line.lower():
            return line.strip()[:300]
    return (text.splitlines()[0][:300] if text else type(exc).__name__)


def strip_module_prefix(state_dict: dict, where: str) -> "collections.OrderedDict":
    """Keys with or without the DDP ``module.`` prefix -> plain Generic_UNet keys."""
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        new = key[7:] if key.startswith("module.") else key
        if new in out:
            raise WeightsError(f"{where}: state_dict has both {key!r} and {new!r}")
        out[new] = value
    return out


def load_state_dict_strict(net, state_dict: dict, where: str) -> None:
    """Strict load (keys with or without ``module.``) with a readable error."""
    from models.weights import load_state_dict_strict as strict

    strict(net, strip_module_prefix(state_dict, where), where, "Generic_UNet built from the plans")
