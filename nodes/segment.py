"""Lesion segmentation by one ensemble member (``models/registry.py``): probability + mask, DWI grid.

The predictor of a member is built once per process and cached by (member, weights, device, TTA),
so a MultiProc worker that segments several sessions loads the network only once. ``use_gpu`` is
the flag nipype's MultiProc reads (``Node.is_gpu_node``) to count this node against
``n_gpu_procs``; set it with :func:`wants_gpu` when the workflow is built.

Post-processing, the same for every member, in this order (``auto`` = the member's recommendation):
``mask = prob >= threshold``; components under ``min_lesion_ml`` removed; the contrast check
(``contrast_check``: brighter trace and darker ADC than the tissue around, ``models/contrast_filter.py``);
the mirror check (``mirror_check``, off by default: trace >= ``mirror_ratio`` x the mirror partner across
the midline, ``models/mirror_check.py``); detection (``detect_lesions``: components of probability >= ``detect_low``
apart from the mask that pass the contrast test, and 1.3 x their partners with the mirror check on,
``models/detect_lesions.py``); growth (``grow_lesions``: connected voxels of probability >= ``grow_low``
that pass the contrast test, ``models/grow_lesions.py``).
The probability map is kept as the member returned it, clipped to [0, 1].
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, isdefined, traits

from bids_app.errors import DeepIslesError, InputError, UsageError
from models import registry
from models.contrast_filter import MAX_ADC_RATIO, MIN_DWI_RATIO, contrast_filter
from models.detect_lesions import DETECT_LOW, detect_lesions
from models.device import resolve_device
from models.grow_lesions import GROW_LOW, grow_lesions
from models.mirror_check import DETECT_MIRROR_RATIO, MASK_MIRROR_RATIO, mirror_filter, mirror_maps
from models.postprocess import postprocess
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)

#: built predictors of this process: (member, weights_dir, weights_file, device, tta) -> predictor
_PREDICTORS: dict[tuple, object] = {}
#: which input trait carries each image a member may ask for (see models/registry.py)
#: the settings of the post-processing as applied (``auto`` resolved), for the mask's sidecar
APPLIED_KEYS = ("member", "threshold", "min_lesion_ml", "contrast_check", "mirror_check", "mirror_ratio",
                "detect_lesions", "detect_low", "grow_lesions", "grow_low", "tta")
_INPUT_TRAITS = {"dwi_norm": "dwi_norm_file", "adc_norm": "adc_norm_file", "trace": "trace_file",
                 "adc": "adc_file", "flair": "flair_file"}


def _on_off_auto(choice: str, given, recommended, default: float) -> tuple[str, float]:
    """``(on|off, threshold)`` of a post-processing step: ``auto`` follows the member's recommended
    threshold (``None``: off); the threshold is the one given, else the recommended one, else ``default``."""
    if choice == "auto":
        choice = "on" if recommended is not None else "off"
    if isdefined(given):
        return choice, float(given)
    return choice, default if recommended is None else float(recommended)


def get_predictor(member: str, weights_dir=None, device: str = "cpu", tta: bool = False, weights_file=None,
                  manifest=None):
    """The cached predictor of ``member`` (built on first use in this process).

    ``manifest`` ({relpath: sha256}) is handed to the member, which checks its files against it
    before loading anything.
    """
    key = _cache_key(member, weights_dir, device, tta, weights_file)
    if key not in _PREDICTORS:
        options = {"tta": bool(tta)}
        if weights_file:
            options["weights"] = weights_file
        if manifest:
            options["manifest"] = dict(manifest)
        _PREDICTORS[key] = registry.build_predictor(member, weights_dir, device, **options)
    return _PREDICTORS[key]


def _cache_key(member, weights_dir, device, tta, weights_file) -> tuple:
    return (member, str(Path(weights_dir).absolute()) if weights_dir else None,
            str(Path(weights_file).absolute()) if weights_file else None, device, bool(tta))


def clear_predictor_cache() -> None:
    _PREDICTORS.clear()


def format_checksums(sha) -> str:
    """A hex digest as is; a ``{relpath: hex}`` dict as ``sha256sum`` lines (``sha256sum -c`` ready)."""
    if isinstance(sha, dict):
        return "\n".join(f"{h}  {rel}" for rel, h in sorted(sha.items()))
    return "" if sha is None else str(sha)


class _SegmentInputSpec(DecisionInputSpec):
    member = traits.Str("builtin", usedefault=True, desc="ensemble member (models/registry.py)")
    dwi_norm_file = File(exists=True, desc="normalised DWI (DWI grid, zero outside the brain)")
    adc_norm_file = File(exists=True, desc="normalised ADC (DWI grid, zero outside the brain)")
    trace_file = File(exists=True, desc="un-normalised trace DWI, DWI grid")
    adc_file = File(exists=True, desc="un-normalised ADC in 1e-3 mm2/s, DWI grid")
    flair_file = File(exists=True, desc="FLAIR on the DWI grid (members that need it)")
    brain_mask_file = File(exists=True, desc="brain mask (DWI grid): no lesion outside it")
    weights_dir = traits.Str(desc="folder of the official weights (SEALS/, NVAUTO/, FACTORIZER/)")
    weights_file = File(exists=True, desc="alternative weights file for the built-in model")
    weights_manifest = File(exists=True, desc="checksum manifest (sha256sum lines or JSON) of the "
                                              "official weights; mismatches are refused before loading")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True, desc="auto = cuda if available")
    tta = traits.Bool(False, usedefault=True, desc="test-time augmentation (mirroring)")
    threshold = traits.Range(0.0, 1.0, 0.5, usedefault=True, desc="lesion where probability >= threshold")
    min_lesion_ml = traits.Float(desc="drop components smaller than this (ml); default: the member's "
                                      "recommendation, else 0")
    contrast_check = traits.Enum("auto", "on", "off", usedefault=True,
                                 desc="drop components without bright trace and low ADC against the "
                                      "tissue around them; auto = the member's recommendation")
    grow_lesions = traits.Enum("auto", "on", "off", usedefault=True,
                               desc="grow kept components into connected voxels of probability >= "
                                    "grow_low that pass the contrast test; auto = the member's "
                                    "recommendation")
    grow_low = traits.Range(0.0, 1.0, desc="low (hysteresis) threshold of the growth; default: the "
                                           f"member's recommendation, else {GROW_LOW}")
    detect_lesions = traits.Enum("auto", "on", "off", usedefault=True,
                                 desc="add components of probability >= detect_low, apart from the mask, "
                                      "that pass the contrast test; auto = the member's recommendation")
    detect_low = traits.Range(0.0, 1.0, desc="threshold of the detection; default: the member's "
                                             f"recommendation, else {DETECT_LOW}")
    mirror_check = traits.Enum("off", "on", usedefault=True,
                               desc="drop components not brighter on the trace than their mirror partners "
                                    f"across the midline by mirror_ratio (detected ones: by {DETECT_MIRROR_RATIO})")
    mirror_ratio = traits.Range(1.0, 10.0, MASK_MIRROR_RATIO, usedefault=True,
                                desc="least trace ratio of a mask component to its mirror partner")
    # scheduling only (results are identical for any thread count): kept out of the node hash so that
    # a run resumed with another --nprocs/--omp-nthreads reuses the finished segmentations
    num_threads = traits.Int(0, usedefault=True, nohash=True,
                             desc="torch CPU threads (0 = leave torch's default)")
    seed = traits.Int(42, usedefault=True, desc="torch random seed")
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc="read by MultiProc: counts against n_gpu_procs")
    step_name = traits.Str(desc="report step name; default 'segment' (use segment_<member> for several)")


class _SegmentOutputSpec(DecisionOutputSpec):
    prob_file = File(exists=True, desc="float32 lesion probability in [0, 1], DWI grid")
    mask_file = File(exists=True, desc="uint8 lesion mask, DWI grid")
    member = traits.Str(desc="member that produced the outputs")
    weights_sha256 = traits.Str(desc="SHA-256 of the weights (sha256sum lines for several files)")
    device = traits.Str(desc="device actually used")
    postprocessing = traits.Dict(desc="post-processing applied (settings and counts): the mask sidecar's record")


class SegmentLesions(DecisionInterface):
    """Run one ensemble member on one session."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec
    step = "segment"
    title = "Lesion segmentation"

    def _image(self, key):
        name = _INPUT_TRAITS[key]
        path = getattr(self.inputs, name)
        if not path:
            raise UsageError(f"member {self.inputs.member!r} needs the input {name!r} ({key}), not given")
        img, data = load_nifti(path)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
        return path, new_image(data, img, dtype=np.float32)

    def _run_step(self, runtime):
        member = str(self.inputs.member).strip().lower()
        if self.inputs.step_name:
            self.step = str(self.inputs.step_name)
        spec = registry.get(member)
        self.title = f"Lesion segmentation ({member})"
        images = [self._image(k) for k in spec.inputs]
        ref_path, ref = images[0]
        for path, img in images[1:]:
            if img.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
                raise InputError(path, f"not on the grid of {Path(ref_path).name} "
                                       f"(shape {img.shape} vs {ref.shape}); conform it first")

        device = resolve_device(self.inputs.device)
        weights_dir = self.inputs.weights_dir or None
        weights_file = self.inputs.weights_file or None
        cached = _cache_key(member, weights_dir, device, self.inputs.tta, weights_file) in _PREDICTORS
        t0 = time.perf_counter()
        manifest = None
        if isdefined(self.inputs.weights_manifest):
            from models.weights import load_checksum_manifest

            manifest = load_checksum_manifest(self.inputs.weights_manifest)
        predictor = get_predictor(member, weights_dir, device, bool(self.inputs.tta), weights_file,
                                  manifest)
        t_build = time.perf_counter() - t0

        import torch

        threads_before = torch.get_num_threads()
        if self.inputs.num_threads and self.inputs.num_threads > 0:
            torch.set_num_threads(int(self.inputs.num_threads))
        threads = torch.get_num_threads()
        torch.manual_seed(int(self.inputs.seed))
        t1 = time.perf_counter()
        try:
            prob = predictor.predict(*[img for _, img in images])
        finally:
            torch.set_num_threads(threads_before)
        t_pred = time.perf_counter() - t1

        prob = self._check_prob(prob, ref.shape)
        brain = None
        if isdefined(self.inputs.brain_mask_file):
            brain = np.asarray(nib.load(self.inputs.brain_mask_file).dataobj) > 0
            prob = np.where(brain, prob, np.float32(0.0)).astype(np.float32)
        zooms = ref.header.get_zooms()[:3]
        voxel_ml = float(np.prod(zooms)) / 1000.0
        min_ml = self.inputs.min_lesion_ml
        if not isdefined(min_ml):
            min_ml = float(getattr(predictor, "recommended_min_lesion_ml", None)
                           or getattr(predictor, "min_lesion_ml", None) or 0.0)
        min_vox = int(np.ceil(min_ml / voxel_ml - 1e-9)) if min_ml > 0 else 0
        threshold = float(self.inputs.threshold)
        mask, removed = postprocess(prob, threshold, min_vox)
        check = self.inputs.contrast_check
        if check == "auto":
            check = "on" if getattr(predictor, "recommended_contrast_check", False) else "off"
        loaded = dict(zip(spec.inputs, (im for _, im in images)))
        n_failed = self._contrast_check(mask, check, brain, loaded)
        mirror, mirror_ratio = self.inputs.mirror_check, float(self.inputs.mirror_ratio)
        n_mirrored = self._mirror_check(mask, mirror, mirror_ratio, brain, loaded, ref.affine)
        detect, detect_low = _on_off_auto(self.inputs.detect_lesions, self.inputs.detect_low,
                                          getattr(predictor, "recommended_detect_low", None), DETECT_LOW)
        n_detected = self._detect(mask, prob, detect, detect_low, brain, loaded, mirror == "on", ref.affine)
        grow, low = _on_off_auto(self.inputs.grow_lesions, self.inputs.grow_low,
                                 getattr(predictor, "recommended_grow_low", None), GROW_LOW)
        n_added = self._grow(mask, prob, grow, low, brain, loaded)

        cwd = Path(runtime.cwd)
        prob_file = save_nifti_atomic(new_image(prob, ref, dtype=np.float32), cwd / f"{member}_prob.nii.gz")
        mask_file = save_nifti_atomic(new_image(mask, ref, dtype=np.uint8), cwd / f"{member}_mask.nii.gz")
        sha = getattr(predictor, "weights_sha256", None)
        sha_text = format_checksums(sha)

        self.decide(f"Member '{member}' ({spec.description}) on {device} "
                    f"(requested {self.inputs.device}), {threads} CPU thread(s), "
                    f"TTA {'on' if self.inputs.tta else 'off'}, seed {self.inputs.seed}.")
        self.decide(f"Model {'reused from this process' if cached else 'built'} in {t_build:.1f} s; "
                    f"inference {t_pred:.1f} s.")
        steps = [n for n, v in (("contrast check", check), ("mirror check", mirror), ("detection", detect),
                                ("growth", grow)) if v == "on"]
        self.decide(f"Mask = probability >= {threshold:g}" + (f", then {', '.join(steps)}" if steps else "")
                    + (f"; {removed} component(s) under {min_ml:g} ml removed." if min_vox > 1 else "."))
        n_vox = int(mask.sum())
        if n_vox == 0:
            self.decide(f"Member '{member}' found no lesion (empty mask).", "warning")
        else:
            self.decide(f"{n_vox} lesion voxels ({n_vox * voxel_ml:.2f} ml).")
        if not sha_text:
            self.decide(f"Member '{member}' did not report a weights checksum.", "warning")
        values = {
            "member": member, "device": device, "device_requested": self.inputs.device,
            "num_threads": threads, "tta": bool(self.inputs.tta), "seed": int(self.inputs.seed),
            "threshold": threshold, "min_lesion_ml": float(min_ml), "components_removed": removed,
            "contrast_check": check, "components_failing_contrast_check": n_failed,
            "detect_lesions": detect, "detect_low": detect_low if detect == "on" else None,
            "components_detected": n_detected, "mirror_check": mirror,
            "mirror_ratio": mirror_ratio if mirror == "on" else None,
            "components_failing_mirror_check": n_mirrored,
            "grow_lesions": grow, "grow_low": low if grow == "on" else None, "voxels_added_by_growth": n_added,
            "weights_sha256": sha if isinstance(sha, dict) else sha_text,
            "build_seconds": round(t_build, 3), "inference_seconds": round(t_pred, 3),
            "lesion_voxels": n_vox, "lesion_ml": round(n_vox * voxel_ml, 4),
        }
        for key, value in values.items():
            self.record(key, value)
        applied = {k: values[k] for k in APPLIED_KEYS if values[k] is not None}
        self._results.update(prob_file=str(prob_file), mask_file=str(mask_file), member=member,
                             weights_sha256=sha_text, device=device, postprocessing=applied)
        return runtime

    def _contrast_pair(self, loaded):
        """(trace, ADC) arrays for the contrast test: the raw pair when given, else the normalised one
        (ratios are unit-free; the normalised pair is clipped). Images already in ``loaded`` (what the
        member read) are reused; the pair is kept there for the next step."""
        if "contrast_pair" not in loaded:
            pairs = [keys for keys in (("trace", "adc"), ("dwi_norm", "adc_norm"))
                     if all(isdefined(getattr(self.inputs, _INPUT_TRAITS[k])) for k in keys)]
            if not pairs:
                raise UsageError("the contrast check, lesion detection and growth need the trace and ADC images "
                                 "(trace_file, adc_file)")
            loaded["contrast_pair"] = tuple(
                np.asarray((loaded[k] if k in loaded else self._image(k)[1]).dataobj, dtype=np.float32)
                for k in pairs[0])
        return loaded["contrast_pair"]

    def _contrast_check(self, mask, check, brain, loaded) -> int:
        """Apply ``contrast_filter`` in place; number of components removed."""
        if check != "on" or not mask.any():
            return 0
        trace, adc = self._contrast_pair(loaded)
        kept, rows = contrast_filter(mask, trace, adc, trace > 0 if brain is None else brain)
        n_failed = sum(not r["kept"] for r in rows)
        mask[...] = kept
        self.decide(f"Contrast check: {n_failed} of {len(rows)} component(s) removed (trace under "
                    f"{MIN_DWI_RATIO:g} x or ADC over {MAX_ADC_RATIO:g} x the tissue around them).")
        return n_failed

    def _mirror_maps(self, brain, loaded, affine):
        """``mirror_check.mirror_maps`` of the contrast pair's trace, computed once per run."""
        if "mirror_maps" not in loaded:
            trace = self._contrast_pair(loaded)[0]
            loaded["mirror_maps"] = mirror_maps(trace, trace > 0 if brain is None else brain, affine)
        return loaded["mirror_maps"]

    def _mirror_check(self, mask, mirror, ratio, brain, loaded, affine) -> int:
        """Apply ``mirror_filter`` to the mask's components in place; number removed."""
        if mirror != "on" or not mask.any():
            return 0
        maps = self._mirror_maps(brain, loaded, affine)
        kept, rows = mirror_filter(mask, self._contrast_pair(loaded)[0], *maps, ratio)
        n_failed = sum(not r["kept"] for r in rows)
        mask[...] = kept
        self.decide(f"Mirror check: {n_failed} of {len(rows)} component(s) removed (trace under {ratio:g} x "
                    "their mirror partners across the midline).")
        return n_failed

    def _detect(self, mask, prob, detect, low, brain, loaded, mirror=False, affine=None) -> int:
        """Apply ``detect_lesions`` in place (with the mirror check at ``DETECT_MIRROR_RATIO`` when
        ``mirror``); number of components added."""
        if detect != "on":
            return 0
        trace, adc = self._contrast_pair(loaded)
        brain = trace > 0 if brain is None else brain
        kwargs = {}
        if mirror:
            kwargs = {"mirror": lambda: self._mirror_maps(brain, loaded, affine),
                      "min_mirror_ratio": DETECT_MIRROR_RATIO}
        found, rows = detect_lesions(mask, prob, trace, adc, brain, low, **kwargs)
        added = sum(r["kept"] for r in rows)
        mask[...] = found
        mirror_text = f" and >= {DETECT_MIRROR_RATIO:g} x their mirror partners" if mirror else ""
        self.decide(f"Lesion detection: {added} of {len(rows)} component(s) of probability >= {low:g} "
                    f"apart from the mask added (trace >= {MIN_DWI_RATIO:g} x and ADC <= "
                    f"{MAX_ADC_RATIO:g} x the tissue around them{mirror_text}).")
        return added

    def _grow(self, mask, prob, grow, low, brain, loaded) -> int:
        """Apply ``grow_lesions`` in place; number of voxels added."""
        if grow != "on" or not mask.any():
            return 0
        trace, adc = self._contrast_pair(loaded)
        grown, rows = grow_lesions(mask, prob, trace, adc, trace > 0 if brain is None else brain, low)
        added = int(sum(r["added"] for r in rows))
        mask[...] = grown
        self.decide(f"Lesion growth: {added} voxel(s) added to {sum(r['added'] > 0 for r in rows)} of "
                    f"{len(rows)} component(s) (connected, probability >= {low:g}, trace >= "
                    f"{MIN_DWI_RATIO:g} x and ADC <= {MAX_ADC_RATIO:g} x the tissue around them).")
        return added

    def _check_prob(self, prob, shape) -> np.ndarray:
        prob = np.asarray(prob, dtype=np.float32)
        if prob.ndim > 3:
            prob = np.squeeze(prob)
        if prob.shape != tuple(shape):
            raise DeepIslesError(f"member {self.inputs.member!r} returned a probability map of shape "
                                 f"{prob.shape}, expected the DWI grid {tuple(shape)}")
        bad = ~np.isfinite(prob)
        if bad.any():
            self.decide(f"{int(bad.sum())} non-finite probabilities set to 0.", "warning")
            prob = np.where(bad, 0.0, prob).astype(np.float32)
        if prob.min() < -1e-6 or prob.max() > 1 + 1e-6:
            self.decide(f"Probabilities outside [0, 1] (range {prob.min():.3g}..{prob.max():.3g}) clipped.",
                        "warning")
        return np.clip(prob, 0.0, 1.0).astype(np.float32)
