"""Registry of ensemble members: what each needs (channels, FLAIR, weight files) and how to build it.

A member is a :class:`MemberSpec` whose ``factory(weights_dir, device, options)`` returns a
*predictor*: an object with ``predict(*images) -> np.ndarray`` (float32 lesion probability on the
grid of the first image) and a ``weights_sha256`` attribute (a hex string, or a ``{relpath: hex}``
dict for members made of several files). ``inputs`` names the images ``predict`` receives, in order:

- ``"dwi_norm"``, ``"adc_norm"``: DWI and ADC after ``nodes/normalize.py`` (DWI grid, 0 outside brain);
- ``"trace"``, ``"adc"``: un-normalised trace DWI and ADC (1e-3 mm2/s) on the DWI grid, for members
  with their own normalisation; ``"flair"``: FLAIR on the DWI grid.

Adding a member = one module in ``models/`` plus one :func:`register` call at the end of this file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bids_app.citations import cite
from bids_app.errors import DeepIslesError, UsageError, WeightsError
from models.weights import missing_files

log = logging.getLogger("deepisles.models")

DEEPISLES_CITATION = cite("DeepISLES")
INPUT_NAMES = ("dwi_norm", "adc_norm", "trace", "adc", "flair")


@dataclass(frozen=True)
class MemberSpec:
    """One ensemble member.

    ``required_files`` are paths relative to ``weights_dir`` (empty for members shipping their own
    weights). ``official`` members come from the DeepISLES weights release and are picked by default
    when their files are present; ``implemented`` is False for declared members whose inference is
    not written yet.
    """

    name: str
    description: str
    needs_flair: bool = False
    required_files: tuple[str, ...] = ()
    citation: str = ""
    factory: Callable[[Path | None, str, dict], Any] | None = None
    inputs: tuple[str, ...] = ("dwi_norm", "adc_norm")
    official: bool = True
    implemented: bool = True
    options: dict = field(default_factory=dict)
    checksum: Callable[[Path], Any] | None = None  # weights_dir -> hex, {relpath: hex} or None

    def missing(self, weights_dir) -> list[str]:
        """Required files absent from ``weights_dir``."""
        return missing_files(weights_dir, self.required_files) if self.required_files else []

    def build(self, weights_dir=None, device: str = "cpu", **options):
        """Build the predictor (raises :class:`DeepIslesError` for members not implemented yet)."""
        if not self.implemented or self.factory is None:
            raise not_implemented(self.name)
        return self.factory(Path(weights_dir) if weights_dir else None, device, {**self.options, **options})


_REGISTRY: dict[str, MemberSpec] = {}


def register(spec: MemberSpec, replace: bool = False) -> MemberSpec:
    """Add a member. Names are lower case; re-registering a name needs ``replace=True``."""
    name = spec.name.lower()
    if name != spec.name or not name.isidentifier():
        raise ValueError(f"member name must be a lower-case identifier: {spec.name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"member {name!r} is already registered")
    bad = [i for i in spec.inputs if i not in INPUT_NAMES]
    if bad:
        raise ValueError(f"member {name!r}: unknown inputs {bad}; choose from {INPUT_NAMES}")
    if spec.needs_flair and "flair" not in spec.inputs:
        raise ValueError(f"member {name!r}: needs_flair=True but 'flair' is not in inputs")
    _REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a member (used by tests that register stand-ins)."""
    _REGISTRY.pop(name.lower(), None)


def get(name: str) -> MemberSpec:
    """The spec of ``name``; :class:`UsageError` listing the valid names if unknown."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise UsageError(f"unknown ensemble member {name!r}; valid members: {', '.join(names())}")
    return _REGISTRY[key]


def names() -> list[str]:
    """All registered member names, in registration order."""
    return list(_REGISTRY)


def default_weights_dir() -> Path:
    """``<repo>/weights``, where the official archive is unpacked by default."""
    return Path(__file__).resolve().parents[1] / "weights"


def available_members(weights_dir) -> list[str]:
    """Official members whose required files are all present (``None`` = :func:`default_weights_dir`)."""
    weights_dir = default_weights_dir() if weights_dir is None else Path(weights_dir)
    if not weights_dir.is_dir():
        return []
    return [n for n, s in _REGISTRY.items() if s.official and s.required_files and not s.missing(weights_dir)]


def resolve_members(requested: list[str] | None, weights_dir) -> list[str]:
    """The members to run.

    Default (``requested`` None or empty): every official, implemented member whose weights are all
    present, else ``['builtin']``. Explicit names are checked: unknown -> :class:`UsageError`;
    missing weight files -> :class:`WeightsError` naming them and the folder searched; a declared
    but unimplemented member -> :class:`DeepIslesError`. Duplicates are dropped, order is kept.
    ``requested`` items may be comma-separated. ``weights_dir=None`` means :func:`default_weights_dir`.
    """
    weights_dir = default_weights_dir() if weights_dir is None else Path(weights_dir)
    if not requested:
        present = available_members(weights_dir)
        ready = [n for n in present if _REGISTRY[n].implemented]
        skipped = [n for n in present if n not in ready]
        if skipped:
            log.warning("weights found for %s, but not implemented in this version; skipped",
                        ", ".join(skipped))
        return ready or ["builtin"]
    out: list[str] = []
    for raw in requested:
        for item in str(raw).split(","):
            if item.strip():
                spec = get(item)
                if spec.name not in out:
                    out.append(spec.name)
    if not out:
        raise UsageError(f"no ensemble member given; valid members: {', '.join(names())}")
    for name in out:
        spec = _REGISTRY[name]
        missing = spec.missing(weights_dir)
        if missing:
            shown = ", ".join(missing[:6]) + (f" ... and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise WeightsError(
                f"member {name!r}: {len(missing)} of {len(spec.required_files)} weight file(s) missing "
                f"in {weights_dir.absolute()}: {shown}"
            )
        if not spec.implemented:
            raise not_implemented(name)
    return out


def members_for_session(members: list[str], has_flair: bool) -> tuple[list[str], list[str]]:
    """Split ``members`` into (runnable, dropped because they need a FLAIR that is absent)."""
    if has_flair:
        return list(members), []
    keep = [m for m in members if not get(m).needs_flair]
    return keep, [m for m in members if m not in keep]


def build_predictor(name: str, weights_dir=None, device: str = "cpu", **options):
    """Build the predictor of member ``name``."""
    return get(name).build(weights_dir, device, **options)


def provenance(name: str, weights_dir=None) -> dict:
    """What to record about a member in dataset_description.json / sidecars (cheap: no model built).

    ``weights_sha256`` is included when the member's ``checksum`` hook can give it.
    """
    spec = get(name)
    weights_dir = default_weights_dir() if weights_dir is None else Path(weights_dir)
    out = {"name": spec.name, "description": spec.description, "needs_flair": spec.needs_flair,
           "citation": spec.citation}
    if spec.required_files:
        out["weights_dir"] = str(weights_dir.absolute())
        out["weights_files"] = len(spec.required_files)
    if spec.checksum is not None:
        try:
            sha = spec.checksum(weights_dir)
        except Exception as exc:  # provenance must never stop a run
            log.warning("member %s: weights checksum unavailable (%s)", name, exc)
            sha = None
        if sha:
            out["weights_sha256"] = sha
    return out


def not_implemented(name: str) -> DeepIslesError:
    return DeepIslesError(f"member {name!r} is not implemented yet in this version")


def _lazy(module: str, attr: str):
    """A factory/checksum hook that imports ``module`` only when the member is used."""

    def call(*args):
        import importlib

        return getattr(importlib.import_module(module), attr)(*args)

    call.__name__ = f"{module}.{attr}"
    return call


# ----------------------------------------------------------------------------- members
def _builtin_factory(weights_dir, device, options):
    from models.builtin import predictor as bp  # lazy: torch and the network load here

    try:
        return bp.BuiltinPredictor(weights=options.get("weights"), device=device,
                                   tta=bool(options.get("tta", False)))
    except (getattr(bp, "WeightsIntegrityError", OSError), FileNotFoundError) as exc:
        raise WeightsError(f"built-in model: {exc}") from None


def _builtin_checksum(weights_dir):
    """SHA-256 of the built-in model's default weights (from their JSON sidecar when present)."""
    try:
        import models.builtin.predictor as bp
    except ImportError:
        return None
    path = getattr(bp, "DEFAULT_WEIGHTS", None)
    if path is None or not Path(path).is_file():
        return None
    side = Path(path).with_suffix(".json")
    if side.is_file():
        try:
            sha = json.loads(side.read_text(encoding="utf-8")).get("sha256")
        except (OSError, ValueError, AttributeError):
            sha = None
        if isinstance(sha, str) and sha:
            return sha
    from models.weights import sha256_file

    return sha256_file(path)


_SEALS_ROOT = ("SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/"
               "nnUNetTrainerV2_DDP__nnUNetPlansv2.1")
SEALS_FILES = (f"{_SEALS_ROOT}/plans.pkl",) + tuple(
    f"{_SEALS_ROOT}/fold_{k}/model_final_checkpoint.model{ext}" for k in range(5) for ext in ("", ".pkl")
)
NVAUTO_FILES = tuple(f"NVAUTO/ts/model{k}.ts" for k in range(15))
FACTORIZER_FILES = tuple(
    f"FACTORIZER/logs/isles2022_dwi-adc-flair/fold{k}/{net}/version_0/checkpoints/epoch=1999-step=99999.ckpt"
    for k in range(5) for net in ("resunet", "swin-factorizer")
)

register(MemberSpec(
    name="builtin",
    description="Built-in 3-D U-Net (DWI + ADC), CPU-friendly, weights shipped with the app",
    needs_flair=False,
    # its own model, not DeepISLES: cite the app and its model card (synthetic training data, one held-out case)
    citation="DeepISLES-BIDS built-in model: models/builtin/MODEL_CARD.md of this software (cite the software "
             "version); not the DeepISLES ensemble",
    factory=_builtin_factory,
    inputs=("dwi_norm", "adc_norm"),
    official=False,
    checksum=_builtin_checksum,
))
register(MemberSpec(
    name="seals",
    description="SEALS (ISLES'22 rank 1): nnU-Net v1 3d_fullres, 5 folds, DWI + ADC",
    needs_flair=False,
    required_files=SEALS_FILES,
    citation=DEEPISLES_CITATION,
    factory=_lazy("models.seals", "build_seals"),
    checksum=_lazy("models.seals", "seals_checksums"),
    inputs=("trace", "adc"),
))
register(MemberSpec(
    name="nvauto",
    description="NVAUTO (ISLES'22 rank 2): MONAI Auto3DSeg SegResNet, 15 TorchScript models, ADC + DWI",
    needs_flair=False,
    required_files=NVAUTO_FILES,
    citation=DEEPISLES_CITATION,
    factory=_lazy("models.nvauto", "build_nvauto"),
    checksum=_lazy("models.nvauto", "nvauto_checksums"),
    inputs=("trace", "adc"),
))
register(MemberSpec(
    name="factorizer",
    description="FACTORIZER/SWAN (ISLES'22 rank 3): Res-U-Net + Swin-Factorizer, 5 folds, DWI + ADC + FLAIR",
    needs_flair=True,
    required_files=FACTORIZER_FILES,
    citation=DEEPISLES_CITATION,
    factory=_lazy("models.factorizer", "build_factorizer"),
    checksum=_lazy("models.factorizer", "factorizer_checksums"),
    inputs=("trace", "adc", "flair"),
))
