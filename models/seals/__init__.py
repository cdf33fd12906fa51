"""SEALS (ISLES'22 rank 1): nnU-Net v1 ``3d_fullres`` Generic_UNet, 5 folds, channels [DWI, ADC].

Pure-PyTorch re-implementation of the official inference recipe (no ``nnunet`` package):
see :mod:`models.seals.predictor` for the recipe, :mod:`models.seals.network` for the network and
:mod:`models.seals.plans` / :mod:`models.seals.checkpoint` for safe reading of the official files.

Public API (wired into ``models/registry.py`` by the lead):

- :func:`build_seals(weights_dir, device, options) <build_seals>` -> :class:`~models.seals.predictor.SealsPredictor`
- :func:`seals_checksums(weights_dir) <seals_checksums>` -> ``{relpath: sha256}`` of the 11 files.

This module stays light (no torch import) so that the registry can import it cheaply.
"""

from __future__ import annotations

from pathlib import Path

SEALS_ROOT = ("SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_Ischemic_Stroke_TM_Fullset/"
              "nnUNetTrainerV2_DDP__nnUNetPlansv2.1")
PLANS_FILE = f"{SEALS_ROOT}/plans.pkl"
FOLDS = (0, 1, 2, 3, 4)


def fold_files(fold: int) -> tuple[str, str]:
    """(checkpoint, checkpoint pickle) of one fold, relative to ``weights_dir``."""
    base = f"{SEALS_ROOT}/fold_{int(fold)}/model_final_checkpoint.model"
    return base, base + ".pkl"


SEALS_FILES = (PLANS_FILE,) + tuple(rel for k in FOLDS for rel in fold_files(k))

_CHECKSUM_CACHE: dict[tuple, str] = {}


def seals_checksums(weights_dir) -> dict[str, str]:
    """``{relpath: sha256}`` of the 11 SEALS files under ``weights_dir`` (missing -> WeightsError).

    Digests are cached per (path, size, mtime) within the process, so repeated provenance calls
    do not re-read 1+ GB of checkpoints.
    """
    from models.weights import require_files, sha256_file

    root = Path(weights_dir)
    require_files(root, SEALS_FILES, what="SEALS weights")
    out = {}
    for rel in SEALS_FILES:
        path = root / rel
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _CHECKSUM_CACHE:
            _CHECKSUM_CACHE[key] = sha256_file(path)
        out[rel] = _CHECKSUM_CACHE[key]
    return out


def build_seals(weights_dir, device: str = "cpu", options: dict | None = None):
    """Build the SEALS predictor (all 5 folds loaded once). See :class:`SealsPredictor` for options."""
    from models.seals.predictor import SealsPredictor

    return SealsPredictor.from_weights_dir(weights_dir, device=device, **dict(options or {}))


__all__ = ["SEALS_ROOT", "PLANS_FILE", "SEALS_FILES", "FOLDS", "fold_files", "seals_checksums", "build_seals"]
