"""Trace (b~1000) and ADC from a raw multi-volume DWI, or pass-through of a given trace/ADC pair.

The numeric core, :func:`compute_trace_adc`, is a pure function; :class:`ComputeTraceADC` wraps it
in a nipype interface that reads the files, writes float32 NIfTI images on the DWI grid and records
its decisions for the report.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, isdefined, traits

from bids_app.errors import InputError
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    check_readable,
    load_nifti,
    new_image,
    save_nifti_atomic,
)

B0_MAX = 50.0  # volumes with b <= B0_MAX are b=0 volumes
SHELL_TOL = 100.0  # a shell spans at most 2*SHELL_TOL (+-SHELL_TOL around its centre)
TARGET_B = 1000.0
B_RANGE = (600.0, 1600.0)  # acceptable shells for a b~1000 trace
ADC_MAX = 10.0  # 1e-3 mm2/s
EPS = 1e-6


class DiffusionError(ValueError):
    """A problem with the diffusion data; ``source`` is 'dwi', 'bval' or 'bvec' (the file to blame)."""

    def __init__(self, problem: str, source: str = "dwi"):
        super().__init__(problem)
        self.problem = problem
        self.source = source


def _fmt_b(values) -> str:
    uniq = sorted({float(round(v)) for v in np.asarray(values, dtype=float).ravel()})
    return ", ".join(f"{v:g}" for v in uniq)


def read_bvals(path) -> np.ndarray:
    """Read an FSL-style ``.bval`` file (whitespace separated, one or several lines)."""
    path = check_readable(path)
    try:
        vals = np.array(path.read_text(encoding="utf-8").split(), dtype=float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"not a readable b-value file ({exc})") from None
    if vals.size == 0:
        raise InputError(path, "empty b-value file")
    return vals


def read_bvecs(path) -> np.ndarray:
    """Read an FSL-style ``.bvec`` file as a 2-D array (shape not checked here)."""
    path = check_readable(path)
    try:
        rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        arr = np.array(rows, dtype=float)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"not a readable b-vector file (rows of numbers expected: {exc})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise InputError(path, "not a readable b-vector file (rows of equal length expected)")
    return arr


def group_shells(bvals) -> list[tuple[float, np.ndarray]]:
    """Group b-values > B0_MAX into shells: ``[(mean b, indices), ...]`` sorted by b."""
    bvals = np.asarray(bvals, dtype=float)
    idx = [int(i) for i in np.argsort(bvals, kind="stable") if bvals[i] > B0_MAX]
    shells: list[list[int]] = []
    for i in idx:
        if shells and bvals[i] - bvals[shells[-1][0]] <= 2 * SHELL_TOL:
            shells[-1].append(i)
        else:
            shells.append([i])
    return [(float(np.mean(bvals[s])), np.array(sorted(s))) for s in shells]


def _unit_misfit(vecs: np.ndarray, bvals) -> float:
    """How far the vectors of the diffusion-weighted volumes are from unit length (0 for a perfect table)."""
    weighted = np.asarray(bvals, dtype=float) > B0_MAX
    return float(np.abs(np.linalg.norm(vecs[weighted], axis=1) - 1.0).sum()) if weighted.any() else 0.0


def _check_bvecs(bvecs, n: int, bvals=None) -> np.ndarray | None:
    """The b-vectors as ``n x 3`` rows; a file may store them 3 x n (BIDS, FSL) or n x 3. With exactly 3
    volumes both read; the layout whose diffusion-weighted vectors are closer to unit length wins."""
    if bvecs is None:
        return None
    bvecs = np.asarray(bvecs, dtype=float)
    if n == 3 and bvecs.shape == (3, 3) and bvals is not None:
        return min((bvecs.T, bvecs), key=lambda v: _unit_misfit(v, bvals))  # ties: 3 x n, the standard
    if bvecs.ndim == 2 and bvecs.shape[0] == 3 and bvecs.shape[1] == n:
        return bvecs.T
    if bvecs.ndim == 2 and bvecs.shape == (n, 3):
        return bvecs
    if bvecs.ndim == 2 and 3 in bvecs.shape:
        raise DiffusionError(
            f"b-vectors have shape {bvecs.shape[0]} x {bvecs.shape[1]}, expected 3 x {n} "
            f"(one column per volume of the DWI)", "bvec")
    raise DiffusionError(
        f"b-vectors have shape {' x '.join(map(str, bvecs.shape))}, expected 3 x {n} or {n} x 3", "bvec")


def compute_trace_adc(data4d, bvals, bvecs=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Trace image of the shell nearest b=1000 and ADC in 1e-3 mm2/s from a 4-D DWI.

    Returns ``(trace, adc_1e3, info)``; ``info`` holds the chosen b value, the number of directions,
    b=0 volumes, shells present and warnings. Raises :class:`DiffusionError` on unusable input.
    """
    data4d = np.asarray(data4d)
    if data4d.ndim != 4 or data4d.shape[3] < 2:
        raise DiffusionError(f"expected a 4-D DWI with at least 2 volumes, got shape {data4d.shape}")
    n = data4d.shape[3]
    bvals = np.asarray(bvals, dtype=float).ravel()
    if bvals.size != n:
        raise DiffusionError(f"{bvals.size} b-values for {n} volumes in the DWI", "bval")
    if not np.all(np.isfinite(bvals)) or np.any(bvals < 0):
        raise DiffusionError("b-values must be finite and non-negative", "bval")
    vecs = _check_bvecs(bvecs, n, bvals)
    b0_idx = np.flatnonzero(bvals <= B0_MAX)
    if b0_idx.size == 0:
        raise DiffusionError(f"no b=0 volume (b <= {B0_MAX:g}); b-values present: {_fmt_b(bvals)}", "bval")
    shells = [s for s in group_shells(bvals) if B_RANGE[0] <= s[0] <= B_RANGE[1]]
    if not shells:
        raise DiffusionError(
            f"no diffusion shell between {B_RANGE[0]:g} and {B_RANGE[1]:g} s/mm2 "
            f"(b-values present: {_fmt_b(bvals)})", "bval")
    b_shell, idx = min(shells, key=lambda s: (abs(s[0] - TARGET_B), s[0]))
    warnings = []
    if vecs is not None:
        norms = np.linalg.norm(vecs[idx], axis=1)
        if np.any(norms < 0.5):
            warnings.append(f"{int(np.sum(norms < 0.5))} volume(s) of the b={b_shell:g} shell have a null b-vector")
        unit = vecs[idx] / np.maximum(norms, EPS)[:, None]
        if len(idx) >= 3 and np.linalg.matrix_rank(unit, tol=1e-3) < 3:
            warnings.append("the b-vectors of the chosen shell do not span 3-D space: "
                            "the trace is not rotation invariant")
    if len(idx) < 3:
        warnings.append(f"only {len(idx)} diffusion direction(s) at b={b_shell:g}: "
                        "the trace is direction dependent")

    s0 = data4d[..., b0_idx].astype(np.float64).mean(axis=3)
    shell = data4d[..., idx].astype(np.float64)
    trace = np.exp(np.log(np.maximum(shell, EPS)).mean(axis=3))
    # background (no signal in any direction) stays exactly 0: brain extraction reads exact zeros as
    # "already skull-stripped", as for a trace given directly (exp(log(EPS)) is a hair above EPS)
    trace = np.where(np.any(shell > 0, axis=3), trace, 0.0)
    valid = np.isfinite(s0) & (s0 > 0) & np.isfinite(trace) & (trace > EPS)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.where(valid, np.log(s0 / np.where(valid, trace, 1.0)) / b_shell, 0.0) * 1000.0
    adc = np.clip(np.nan_to_num(adc, nan=0.0, posinf=ADC_MAX, neginf=0.0), 0.0, ADC_MAX)
    trace = np.where(np.isfinite(trace) & (trace > EPS), trace, 0.0)
    info = {
        "b_value": float(b_shell),
        "n_directions": int(len(idx)),
        "n_b0": int(b0_idx.size),
        "n_volumes": int(n),
        "shells": [round(s[0], 1) for s in group_shells(bvals)],
        "b_values_present": _fmt_b(bvals),
        "warnings": warnings,
    }
    return trace.astype(np.float32), adc.astype(np.float32), info


# ----------------------------------------------------------------------------- interface
class ComputeTraceADCInputSpec(DecisionInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="3-D trace image or 4-D raw DWI")
    bval_file = File(desc="FSL .bval of a raw DWI")
    bvec_file = File(desc="FSL .bvec of a raw DWI (3 x N or N x 3)")
    adc_file = File(desc="ADC given with a trace image (passed through)")


class ComputeTraceADCOutputSpec(DecisionOutputSpec):
    trace_file = File(desc="3-D trace image (b~1000) on the DWI grid")
    adc_file = File(desc="ADC (1e-3 mm2/s when computed here); undefined if neither given nor computed")
    b_value = traits.Float(desc="b value of the trace (computed case only)")


class ComputeTraceADC(DecisionInterface):
    """Compute trace and ADC from a raw DWI (with .bval), or pass a trace/ADC pair through."""

    input_spec = ComputeTraceADCInputSpec
    output_spec = ComputeTraceADCOutputSpec
    step = "diffusion"
    title = "Diffusion: trace and ADC"

    def _run_step(self, runtime):
        dwi_path = Path(self.inputs.dwi_file)
        bval = self.inputs.bval_file if isdefined(self.inputs.bval_file) else None
        bvec = self.inputs.bvec_file if isdefined(self.inputs.bvec_file) else None
        adc_in = self.inputs.adc_file if isdefined(self.inputs.adc_file) else None
        try:
            img = nib.load(str(check_readable(dwi_path)))
            shape = img.shape
        except InputError:
            raise
        except Exception as exc:
            raise InputError(dwi_path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
        nvol = shape[3] if len(shape) == 4 else 1
        if len(shape) > 4 or len(shape) < 3:
            raise InputError(dwi_path, f"expected a 3-D or 4-D image, got shape {shape}")
        self.record("dwi_shape", list(shape))
        cwd = Path(runtime.cwd)
        if bval and nvol > 1:
            self._compute(dwi_path, bval, bvec, adc_in, cwd)
        else:
            self._pass_through(dwi_path, shape, nvol, bval, adc_in, cwd)
        return runtime

    def _compute(self, dwi_path, bval, bvec, adc_in, cwd):
        img, data = load_nifti(dwi_path)
        bvals = read_bvals(bval)
        bvecs = read_bvecs(bvec) if bvec else None
        try:
            trace, adc, info = compute_trace_adc(data, bvals, bvecs)
        except DiffusionError as exc:
            blame = {"bval": bval, "bvec": bvec}.get(exc.source) or dwi_path
            raise InputError(blame, exc.problem) from None
        del data
        grid = img.slicer[..., 0]
        for key, arr, name in (("trace_file", trace, "dwi_trace.nii.gz"), ("adc_file", adc, "dwi_adc.nii.gz")):
            self._results[key] = str(save_nifti_atomic(new_image(arr, grid, np.float32), cwd / name))
        self._results["b_value"] = info["b_value"]
        self.decide(
            f"Raw DWI with {info['n_volumes']} volumes (b-values: {info['b_values_present']}): trace computed as the "
            f"geometric mean of the {info['n_directions']} direction(s) of the b={info['b_value']:g} shell, "
            f"ADC = ln(S0/trace)/b from {info['n_b0']} b=0 volume(s), in 1e-3 mm2/s, clipped to [0, {ADC_MAX:g}]."
        )
        if not bvec:
            self.decide("No .bvec file: directions were not checked.", "warning")
        for text in info["warnings"]:
            self.decide(text[0].upper() + text[1:] + ".", "warning")
        if adc_in:
            self.decide(f"The given ADC {Path(adc_in).name} was ignored: "
                        "the ADC was computed from the raw DWI.", "warning")
        for key, value in info.items():
            if key != "warnings":
                self.record(key, value)
        self.record("computed", True)

    def _pass_through(self, dwi_path, shape, nvol, bval, adc_in, cwd):
        self.record("computed", False)
        if nvol > 1 or len(shape) == 4:
            img, data = load_nifti(dwi_path)
            out = new_image(data[..., -1], img.slicer[..., 0], np.float32)
            self._results["trace_file"] = str(save_nifti_atomic(out, cwd / "dwi_trace.nii.gz"))
            self.decide(
                f"4-D DWI with {nvol} volume(s) and no b-values: the last volume is used as the trace image "
                "(as the official DeepISLES does).", "warning" if nvol > 1 else "info")
        else:
            self._results["trace_file"] = str(dwi_path)
            self.decide("The DWI is a 3-D trace image: used as it is.")
            if bval:
                self.decide(f"The b-value file {Path(bval).name} was ignored: the DWI has one volume.", "warning")
        if adc_in:
            self._results["adc_file"] = str(adc_in)
            self.decide(f"ADC taken from {Path(adc_in).name}.")
        else:
            self.decide("No ADC given and none could be computed (no raw DWI with b-values).", "warning")
