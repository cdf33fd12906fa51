"""Safe reading of nnU-Net v1 pickles (``plans.pkl``, ``*.model.pkl``) and the plan of the network.

The pickles hold plain containers, numpy arrays/scalars and ``OrderedDict``\\ s. They are read with
:class:`RestrictedUnpickler`, which resolves only an allow-list of numpy / collections / builtins
names: any other global (a class, a function) is refused with :class:`~bids_app.errors.WeightsError`
and never imported or called. Callers hash the bytes first and unpickle those same bytes (no window
between checking and reading a file).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import numpy as np

from bids_app.errors import WeightsError


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _numpy_numeric():
    try:
        from numpy._core import numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric
    return numeric


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs
    import collections

    ma = _numpy_multiarray()
    allowed: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
        allowed[(mod, "scalar")] = ma.scalar
    frombuffer = getattr(_numpy_numeric(), "_frombuffer", None)
    if frombuffer is not None:
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # numpy >= 1.25 may name the concrete dtype classes (numpy.dtypes.Float64DType, ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                allowed[("numpy.dtypes", name)] = obj
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("collections", "defaultdict")] = collections.defaultdict
    allowed[("_codecs", "encode")] = codecs.encode  # protocol-2 bytes (encodes a str; harmless)
    for name in ("set", "frozenset", "slice", "complex", "range", "bytearray", "list", "dict", "tuple",
                 "int", "float", "bool", "str", "bytes"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
        allowed[("__builtin__", name)] = allowed[("builtins", name)]  # python-2 era pickles
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy / collections / builtins types (no arbitrary classes)."""

    where = "pickle"

    def find_class(self, module, name):  # noqa: D401 - pickle API
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise WeightsError(f"{self.where}: refused to unpickle global {module}.{name} "
                               "(only numpy arrays/scalars, OrderedDict and builtin types are allowed)")
        return obj

    def persistent_load(self, pid):
        raise WeightsError(f"{self.where}: refused persistent id in a plain pickle")


def restricted_loads(data: bytes, where: str = "pickle"):
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; errors become :class:`WeightsError`."""
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    unpickler.where = where
    try:
        return unpickler.load()
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{where}: not a readable nnU-Net pickle ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class SealsPlan:
    """What inference needs from an nnU-Net v1 plans dict (one stage)."""

    num_input_channels: int
    num_classes: int  # network output channels (= plans num_classes + 1)
    base_num_features: int
    conv_per_stage: int
    pool_op_kernel_sizes: tuple[tuple[int, ...], ...]
    conv_kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    current_spacing: tuple[float, ...]
    stage: int = 0
    max_num_features: int = 320

    @property
    def num_pool(self) -> int:
        return len(self.pool_op_kernel_sizes)

    @property
    def preprocessing_key(self) -> tuple:
        """Everything that decides the preprocessed input (folds sharing it share preprocessing)."""
        return (self.normalization_schemes, self.use_mask_for_norm, self.transpose_forward)


def _per_channel(value, n: int, what: str, cast):
    if isinstance(value, dict):
        try:
            return tuple(cast(value[k]) for k in range(n))
        except KeyError as exc:
            raise WeightsError(f"plans: {what} has no entry for channel {exc}") from None
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == n:
        return tuple(cast(v) for v in value)
    if isinstance(value, (bool, np.bool_, str)):
        return tuple(cast(value) for _ in range(n))
    raise WeightsError(f"plans: cannot read {what} for {n} channels from {value!r}")


def _int_tuple(v) -> tuple[int, ...]:
    return tuple(int(x) for x in np.asarray(v).ravel())


def plan_from_dict(plans: dict, stage: int | None = None, where: str = "plans") -> SealsPlan:
    """Build a :class:`SealsPlan` from a v1 plans dict.

    ``stage=None`` uses the last stage (what ``3d_fullres`` trains on). The network needs the plan's
    spacing to be the 1 mm grid the recipe resamples to; any other spacing is refused.
    """
    if not isinstance(plans, dict):
        raise WeightsError(f"{where}: expected a dict, got {type(plans).__name__}")
    try:
        stages = plans["plans_per_stage"]
        keys = sorted(stages.keys())
        if stage is None or stage not in stages:
            stage = keys[-1]
        sp = stages[stage]
        n_in = int(plans["num_modalities"])
        pool = tuple(_int_tuple(k) for k in sp["pool_op_kernel_sizes"])
        conv = tuple(_int_tuple(k) for k in sp["conv_kernel_sizes"])
        plan = SealsPlan(
            num_input_channels=n_in,
            num_classes=int(plans["num_classes"]) + 1,
            base_num_features=int(plans["base_num_features"]),
            conv_per_stage=int(plans.get("conv_per_stage", 2) or 2),
            pool_op_kernel_sizes=pool,
            conv_kernel_sizes=conv,
            patch_size=_int_tuple(sp["patch_size"]),
            normalization_schemes=_per_channel(plans["normalization_schemes"], n_in, "normalization_schemes", str),
            use_mask_for_norm=_per_channel(plans["use_mask_for_norm"], n_in, "use_mask_for_norm", bool),
            transpose_forward=_int_tuple(plans["transpose_forward"]),
            transpose_backward=_int_tuple(plans["transpose_backward"]),
            current_spacing=tuple(float(x) for x in np.asarray(sp["current_spacing"]).ravel()),
            stage=int(stage),
        )
    except WeightsError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise WeightsError(f"{where}: not an nnU-Net v1 plans dict ({type(exc).__name__}: {exc})") from None
    _check_plan(plan, where)
    return plan


def _check_plan(p: SealsPlan, where: str) -> None:
    problems = []
    if len(p.patch_size) != 3:
        problems.append(f"patch_size {p.patch_size} is not 3-D")
    if len(p.conv_kernel_sizes) != p.num_pool + 1:
        problems.append(f"{len(p.conv_kernel_sizes)} conv kernels for {p.num_pool} pooling steps (need +1)")
    if any(len(k) != 3 for k in p.pool_op_kernel_sizes + p.conv_kernel_sizes):
        problems.append("kernels are not 3-D")
    if sorted(p.transpose_forward) != [0, 1, 2] or sorted(p.transpose_backward) != [0, 1, 2]:
        problems.append(f"bad transpose_forward/backward {p.transpose_forward}/{p.transpose_backward}")
    elif tuple(p.transpose_forward[i] for i in p.transpose_backward) != (0, 1, 2):
        problems.append("transpose_backward is not the inverse of transpose_forward")
    if p.conv_per_stage < 2:
        problems.append(f"conv_per_stage {p.conv_per_stage} < 2")
    for s in p.normalization_schemes:
        if s not in ("nonCT", "noNorm"):
            problems.append(f"normalisation scheme {s!r} not supported (only nonCT, noNorm)")
    if p.current_spacing and not np.allclose(p.current_spacing, 1.0, atol=1e-3):
        problems.append(f"plan spacing {p.current_spacing} is not 1 mm isotropic (the DeepISLES recipe "
                        "resamples to 1 mm; other spacings are not supported)")
    if problems:
        raise WeightsError(f"{where}: unsupported plan: " + "; ".join(problems))
