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


class _SinkOutputSpec(TraitedSpec):
    out_file = traits.Either(traits.Str, traits.List(traits.Str))


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

    def _run_interface(self, runtime):
        ins = self.inputs
        extra = {"suffix": ins.suffix}
        for key in ("desc", "label"):
            if isdefined(getattr(ins, key)):
                extra[key] = getattr(ins, key)
        files = ins.in_file if isinstance(ins.in_file, list) else [ins.in_file]
        outs = []
        for src in files:
            src = Path(src)
            if ins.datatype == "figures":
                # figure files are already named sub-<s>[_ses-<x>]_desc-<d>_<suffix>.<ext>
                out = Path(ins.output_dir) / f"sub-{ins.entities['subject']}" / "figures" / src.name
                atomic_write_bytes(src.read_bytes(), out)
            elif src.name.endswith((".nii", ".nii.gz")):
                out = derivative_path(ins.output_dir, ins.entities, datatype="dwi",
                                      extension=".nii.gz", **extra)
                img = nib.load(str(src))
                if isdefined(ins.reference_file):
                    img = _restamp(img, Path(ins.reference_file), ins.dtype)
                save_nifti_atomic(img, out)
            else:
                out = derivative_path(ins.output_dir, ins.entities, datatype="dwi",
                                      extension="".join(src.suffixes[-1:]), **extra)
                atomic_write_bytes(src.read_bytes(), out)  # unique temporary name, removed on failure
            if isdefined(ins.metadata) and ins.metadata and ins.datatype != "figures":
                sidecar = derivative_path(ins.output_dir, ins.entities, datatype="dwi",
                                          extension=".json", **extra)
                write_json_atomic(ins.metadata, sidecar)
            outs.append(str(out))
        self._results["out_file"] = outs if isinstance(ins.in_file, list) else outs[0]
        return runtime
