"""``init_segmentation_wf``: FLAIR onto the DWI grid (when a member needs it), members, ensemble."""

from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.config import RunConfig


def init_segmentation_wf(members: list[str], config: RunConfig, reportlets: str,
                         name: str = "segmentation_wf"):
    """Run every member on one session and combine them.

    Inputs (``inputnode``): dwi_norm, adc_norm (built-in model channels), trace, adc (preprocessed,
    1e-3 mm2/s), brain_mask, flair (FLAIR in its own space; only used when a member needs it).
    Outputs (``outputnode``): prob, mask (ensemble, DWI grid), member_probs, member_masks,
    member_postprocessing (lists in the order of ``members``; the last: post-processing as applied).
    A member that fails makes the session fail (reported with its crash file); it is never counted
    as an empty mask.
    """
    from models.registry import get
    from nodes.ensemble import EnsembleMembers
    from models.device import wants_gpu
    from nodes.segment import SegmentLesions

    wf = pe.Workflow(name=name)
    fields = ["dwi_norm", "adc_norm", "trace", "adc", "brain_mask", "flair"]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    outputnode = pe.Node(niu.IdentityInterface(fields=["prob", "mask", "member_probs", "member_masks",
                                                       "member_postprocessing"]), name="outputnode")
    flair_source, flair_field = inputnode, "flair"
    if any(get(m).needs_flair for m in members):
        from nodes.register import RegisterFlair

        register = pe.Node(RegisterFlair(mode="nonrigid", reportlets_dir=reportlets),
                           name="register_flair", mem_gb=1.0)
        wf.connect([(inputnode, register, [("flair", "flair_file"), ("trace", "dwi_file"),
                                           ("brain_mask", "brain_mask_file")])])
        flair_source, flair_field = register, "flair_file"

    merge_prob = pe.Node(niu.Merge(len(members)), name="merge_prob", run_without_submitting=True)
    merge_mask = pe.Node(niu.Merge(len(members)), name="merge_mask", run_without_submitting=True)
    merge_post = pe.Node(niu.Merge(len(members)), name="merge_post", run_without_submitting=True)
    ensemble = pe.Node(EnsembleMembers(members=members, reportlets_dir=reportlets),
                       name="ensemble")
    use_gpu = wants_gpu(config.device)
    for index, member in enumerate(members, start=1):
        seg = pe.Node(SegmentLesions(
            member=member, device=config.device, tta=config.tta, threshold=config.threshold,
            contrast_check=config.contrast_check, grow_lesions=config.grow_lesions,
            detect_lesions=config.detect_lesions, mirror_check=config.mirror_check,
            num_threads=config.omp_nthreads, seed=config.random_seed, use_gpu=use_gpu,
            reportlets_dir=reportlets,
            step_name="segment" if len(members) == 1 else f"segment_{member}"),
            name=f"segment_{member}", mem_gb=2.0 if member == "builtin" else 6.0)
        if config.min_lesion_ml is not None:
            seg.inputs.min_lesion_ml = config.min_lesion_ml
        if config.weights_dir:
            seg.inputs.weights_dir = str(config.weights_dir)
        if member == "builtin" and getattr(config, "builtin_weights", None):
            seg.inputs.weights_file = str(config.builtin_weights)
        if getattr(config, "weights_manifest", None):
            seg.inputs.weights_manifest = str(config.weights_manifest)
        # fmt: off
        wf.connect([
            (inputnode, seg, [("dwi_norm", "dwi_norm_file"), ("adc_norm", "adc_norm_file"),
                              ("trace", "trace_file"), ("adc", "adc_file"),
                              ("brain_mask", "brain_mask_file")]),
            (seg, merge_prob, [("prob_file", f"in{index}")]),
            (seg, merge_mask, [("mask_file", f"in{index}")]),
            (seg, merge_post, [("postprocessing", f"in{index}")]),
        ])
        # fmt: on
        if get(member).needs_flair:
            wf.connect(flair_source, flair_field, seg, "flair_file")
    # fmt: off
    wf.connect([
        (merge_prob, ensemble, [("out", "prob_files")]),
        (merge_mask, ensemble, [("out", "mask_files")]),
        (ensemble, outputnode, [("prob_file", "prob"), ("mask_file", "mask")]),
        (merge_prob, outputnode, [("out", "member_probs")]),
        (merge_mask, outputnode, [("out", "member_masks")]),
        (merge_post, outputnode, [("out", "member_postprocessing")]),
    ])
    # fmt: on
    return wf
