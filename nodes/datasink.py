"""DerivativesSink: copy one result into the output dataset under its BIDS name, atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_app.derivatives import derivative_path
from nodes.base import atomic_write_bytes, new_image, save_nifti_atomic, write_json_atomic


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = traits.Either(File(exists=True), traits.List(File(exists=True)), mandatory=True)
    output_dir = traits.Str(mandatory=True, desc="root of the derivative dataset")
    entities = traits.Dict(mandatory=True, desc="subject/session entities")
    suffix = traits.Str(mandatory=True)
    desc = traits.Str()
    label = traits.Str()
    datatype = traits.Enum("dwi", "figures", usedefault=True)
    # not exists=True: the value is set when the workflow is built, and an input that cannot be read
    # (a DataLad file not fetched) must fail its session in 'load', not the building of every session
    reference_file = File(desc="input image whose grid (shape, affine) the output must have")
    dtype = traits.Enum(None, "uint8", "float32", usedefault=True)
    metadata = traits.Dict(desc="sidecar JSON content")
    applied = traits.Either(traits.Dict, traits.List(traits.Dict),
                            desc="post-processing as each member applied it (SegmentLesions' postprocessing "
                                 "output, with 'member'): the sidecar's PostProcessingApplied")


class _SinkOutputSpec(TraitedSpec):
    out_file = traits.Either(traits.Str, traits.List(traits.Str))
    written = traits.List(traits.Str, desc="every file written (outputs and sidecars)")


def _restamp(img: nib.Nifti1Image, reference: Path, dtype) -> nib.Nifti1Image:
    """Put ``img``'s data on exactly the header geometry of ``reference`` (same shape required)."""
    ref = nib.load(str(reference))
    ref_shape = tuple(ref.shape[:3])
    data = np.asanyarray(img.dataobj)
    if tuple(data.shape) != ref_shape:
        raise ValueError(f"output grid {data.shape} differs from input grid {ref_shape} of {reference}")
    if not np.allclose(img.affine, ref.affine, atol=1e-4):
        raise ValueError(f"output affine differs from the affine of {reference}")
    return new_image(data.astype(dtype or data.dtype), ref, dtype=dtype or data.dtype)


class DerivativesSink(SimpleInterface):
    """Write ``in_file`` under its BIDS-derivatives name (temporary name first, then rename)."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec

    def _extra(self) -> dict:
        extra = {"suffix": self.inputs.suffix}
        for key in ("desc", "label"):
            if isdefined(getattr(self.inputs, key)):
                extra[key] = getattr(self.inputs, key)
        return extra

    def _target(self, src: Path, extra: dict) -> Path:
        ins = self.inputs
        if ins.datatype == "figures":  # already named sub-<s>[_ses-<x>]_desc-<d>_<suffix>.<ext>
            return Path(ins.output_dir) / f"sub-{ins.entities['subject']}" / "figures" / src.name
        ext = ".nii.gz" if src.name.endswith((".nii", ".nii.gz")) else "".join(src.suffixes[-1:])
        return derivative_path(ins.output_dir, ins.entities, datatype="dwi", extension=ext, **extra)

    def _run_interface(self, runtime):
        ins = self.inputs
        extra = self._extra()
        files = ins.in_file if isinstance(ins.in_file, list) else [ins.in_file]
        outs, written = [], []
        for src in files:
            src = Path(src)
            out = self._target(src, extra)
            if ins.datatype != "figures" and src.name.endswith((".nii", ".nii.gz")):
                img = nib.load(str(src))
                if isdefined(ins.reference_file):
                    img = _restamp(img, Path(ins.reference_file), ins.dtype)
                save_nifti_atomic(img, out)
            else:
                atomic_write_bytes(src.read_bytes(), out)  # unique temporary name, removed on failure
            meta = dict(ins.metadata) if isdefined(ins.metadata) else {}
            entries = [] if not isdefined(ins.applied) else ins.applied if isinstance(ins.applied, list) \
                else [ins.applied]
            entries = [e for e in entries if isinstance(e, dict) and e.get("member")]  # none from older caches
            if entries:
                meta["PostProcessingApplied"] = {e["member"]: {k: v for k, v in e.items() if k != "member"}
                                                 for e in entries}
            if meta and ins.datatype != "figures":
                sidecar = derivative_path(ins.output_dir, ins.entities, datatype="dwi",
                                          extension=".json", **extra)
                write_json_atomic(meta, sidecar)
                written.append(str(sidecar))
            outs.append(str(out))
        self._results["out_file"] = outs if isinstance(ins.in_file, list) else outs[0]
        self._results["written"] = outs + written
        return runtime


def forget_missing_outputs(work_dir) -> list[Path]:
    """Make the sinks of earlier runs in ``work_dir`` whose written files are gone (deleted from the
    output folder since) run again: their hash files are removed, so nipype writes those outputs anew
    from the cached results of the steps before them. Sinks whose files are all there stay cached.
    Returns the node folders concerned."""
    from nipype.utils.filemanip import loadpkl

    forgotten = []
    for result in sorted(Path(work_dir).glob("deepisles_wf/**/result_ds_*.pklz")):
        try:
            outputs = loadpkl(str(result)).outputs
            files = outputs.written if isdefined(getattr(outputs, "written", None)) else outputs.out_file
        except Exception:  # unreadable or from another version: nipype decides by itself
            continue
        files = [files] if isinstance(files, str) else list(files or [])
        if files and not all(Path(f).exists() for f in files):
            for hashfile in result.parent.glob("_0x*.json"):
                hashfile.unlink()
            forgotten.append(result.parent)
    return forgotten
