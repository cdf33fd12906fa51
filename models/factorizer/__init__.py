"""FACTORIZER / SWAN ensemble member (ISLES'22 rank 3): 5 Res-U-Nets + 5 Swin-Factorizers.

- :mod:`.resunet`, :mod:`.swin_factorizer`: the two architectures, parameter names equal to the
  official checkpoints (without ``net.``);
- :mod:`.checkpoint`: SHA-256 check then restricted unpickling of the Lightning ``.ckpt`` files
  (no ``factorizer``/``pytorch_lightning`` package needed), strict loading;
- :mod:`.predictor`: the inference recipe and the registry hooks below.

Registry wiring (``models/registry.py``): ``factory=build_factorizer``,
``checksum=factorizer_checksums``, ``inputs=("trace", "adc", "flair")``.
"""

from __future__ import annotations


def build_factorizer(weights_dir, device="cpu", options=None):
    """Registry factory (lazy import: torch loads here). See :func:`.predictor.build_factorizer`."""
    from models.factorizer.predictor import build_factorizer as _build

    return _build(weights_dir, device, options)


def factorizer_checksums(weights_dir):
    """``{relpath: sha256}`` of the present FACTORIZER checkpoints, or None."""
    from models.factorizer.predictor import factorizer_checksums as _sums

    return _sums(weights_dir)


__all__ = ["build_factorizer", "factorizer_checksums"]
