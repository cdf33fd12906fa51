"""nipype workflows: ``init_deepisles_wf`` over all sessions, ``init_single_subject_wf`` per session."""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from bids_app.config import RunConfig
from bids_app.discovery import SessionInputs
from bids_app.segmentation_wf import init_segmentation_wf
from bids_app.paths import bids_uri, crash_dir, reportlets_dir, session_name


def init_deepisles_wf(sessions: list[SessionInputs], config: RunConfig, members: list[str],
                      provenance: list[dict]):
    """All sessions of the run, each as an independent sub-workflow (one failure costs one session).

    Outputs are written by each session's sinks; the workflow has no outputnode of its own.
    """
    wf = pe.Workflow(name="deepisles_wf", base_dir=str(config.work_dir))
    for session in sessions:
        wf.add_nodes([init_single_subject_wf(session, config, members, provenance)])
    return wf


def _sink(name, config, session, suffix, reference=None, dtype=None, meta=None, **entities):
    from nodes.datasink import DerivativesSink

    node = pe.Node(
        DerivativesSink(output_dir=str(config.output_dir), entities=session.entities, suffix=suffix,
                        **{k: v for k, v in entities.items() if v}),
        name=name, run_without_submitting=True,
    )
    if reference is not None:
        node.inputs.reference_file = str(reference)
    if dtype:
        node.inputs.dtype = dtype
    if meta:
        node.inputs.metadata = meta
    return node


def init_single_subject_wf(session: SessionInputs, config: RunConfig, members: list[str],
                           provenance: list[dict]):
    """One subject/session: load, diffusion, ADC units, grid, brain, members, ensemble, outputs.

    Inputs (``inputnode``): dwi, adc, bval, bvec, flair (paths; missing ones left undefined).
    Outputs (``outputnode``): mask, probseg, stats (paths in the derivative dataset).
    """
    from nodes.adc_units import HarmoniseADCUnits
    from nodes.biomarkers import LesionStats
    from nodes.conform import ConformADC
    from nodes.diffusion import ComputeTraceADC
    from nodes.figures import LesionFigures
    from nodes.load import LoadInputs
    from nodes.normalize import NormalizeIntensity
    from nodes.skullstrip import BrainExtraction

    from models import registry

    members, dropped = registry.members_for_session(members, session.flair is not None)
    if not members:
        raise ValueError(f"no member of the ensemble can run without FLAIR ({', '.join(dropped)})")
    name = session_name(session)
    wf = pe.Workflow(name=f"{name}_wf")
    rdir = str(reportlets_dir(config.work_dir, session))
    Path(rdir).mkdir(parents=True, exist_ok=True)

    inputnode = pe.Node(niu.IdentityInterface(fields=["dwi", "adc", "bval", "bvec", "flair"]),
                        name="inputnode")
    reads_flair = any(registry.get(m).needs_flair for m in members)
    for field in ("dwi", "adc", "bval", "bvec", "flair"):
        value = getattr(session, field)
        if value is not None and (field != "flair" or reads_flair):  # an unused FLAIR is not even loaded
            setattr(inputnode.inputs, field, str(value))
    outputnode = pe.Node(niu.IdentityInterface(fields=["mask", "probseg", "stats"]),
                         name="outputnode")

    def node(interface, node_name, mem_gb=0.3, **kw):
        return pe.Node(interface(reportlets_dir=rdir, **kw), name=node_name, mem_gb=mem_gb)

    load = node(LoadInputs, "load")
    diffusion = node(ComputeTraceADC, "diffusion", mem_gb=1.0)
    units = node(HarmoniseADCUnits, "adc_units")
    conform = node(ConformADC, "conform")
    brain = node(BrainExtraction, "skullstrip", mem_gb=0.5 if config.skull_strip == "otsu" else 3.0,
                 extractor=config.skull_strip)
    normalize = node(NormalizeIntensity, "normalize")
    stats = node(LesionStats, "biomarkers")
    figures = node(LesionFigures, "figures", out_prefix=name)

    # fmt: off
    wf.connect([
        (inputnode, load, [("dwi", "dwi_file"), ("adc", "adc_file"), ("flair", "flair_file"),
                           ("bval", "bval_file")]),
        (inputnode, diffusion, [("bval", "bval_file"), ("bvec", "bvec_file")]),
        (load, diffusion, [("dwi_file", "dwi_file"), ("adc_file", "adc_file")]),
        (diffusion, units, [("adc_file", "adc_file")]),
        (diffusion, conform, [("trace_file", "dwi_file")]),
        (units, conform, [("adc_file", "adc_file")]),
        (diffusion, brain, [("trace_file", "trace_file")]),
        (conform, brain, [("adc_file", "adc_file")]),
        (brain, normalize, [("trace_file", "trace_file"), ("adc_file", "adc_file"),
                            ("mask_file", "mask_file")]),
        (brain, stats, [("adc_file", "adc_file")]),
        (brain, figures, [("trace_file", "trace_file"), ("adc_file", "adc_file")]),
    ])
    # fmt: on

    seg_wf = init_segmentation_wf(members, config, rdir)
    # fmt: off
    wf.connect([
        (normalize, seg_wf, [("dwi_norm_file", "inputnode.dwi_norm"),
                             ("adc_norm_file", "inputnode.adc_norm")]),
        (brain, seg_wf, [("trace_file", "inputnode.trace"), ("adc_file", "inputnode.adc"),
                         ("mask_file", "inputnode.brain_mask")]),
        (load, seg_wf, [("flair_file", "inputnode.flair")]),
        (seg_wf, stats, [("outputnode.mask", "mask_file"), ("outputnode.prob", "prob_file")]),
        (seg_wf, figures, [("outputnode.mask", "mask_file")]),
    ])
    # fmt: on

    _connect_outputs(wf, session, config, members, provenance, brain, seg_wf, stats, figures,
                     outputnode)
    for wf_node in wf._get_all_nodes():
        wf_node.config = {"execution": {"crashdump_dir": str(crash_dir(config, session.subject)),
                                        "crashfile_format": "txt"}}
    return wf


def _connect_outputs(wf, session, config, members, provenance, brain, seg_wf, stats, figures,
                     outputnode):
    """Sinks for every derivative of one session."""
    from nodes.biomarkers import STATS_DICTIONARY
    from nodes.ensemble import rule_text

    ref = session.dwi
    sources = [bids_uri(config.bids_dir, p) for p in (session.dwi, session.adc, session.bval, session.bvec)
               if p is not None]
    spatial = bids_uri(config.bids_dir, session.dwi)
    used = [p for p in provenance if p.get("name") in members]  # the members that ran for this session
    flair = [bids_uri(config.bids_dir, session.flair)] if session.flair is not None else []
    seg_sources = sources + (flair if any(p.get("needs_flair") for p in used) else [])
    mask_meta = {
        "Type": "Lesion", "Description": "Acute ischemic stroke lesion (DWI/ADC), binary",
        "Sources": seg_sources, "SpatialReference": spatial, "Threshold": config.threshold,
        "Models": used,
        "EnsembleRule": rule_text(len(members)),
        # as requested; "auto" = what each model's weights recommend; PostProcessingApplied (written by the
        # sink from the segmentation nodes) holds what was applied, member by member
        "PostProcessing": {"MinLesionMl": config.min_lesion_ml, "ContrastCheck": config.contrast_check,
                           "GrowLesions": config.grow_lesions, "DetectLesions": config.detect_lesions,
                           "MirrorCheck": config.mirror_check},
    }
    prob_meta = {**mask_meta, "Type": "Lesion", "Description": "Lesion probability (ensemble mean)"}
    prob_meta.pop("Threshold")
    prob_meta.pop("PostProcessing")
    sinks = [
        ("ds_mask", seg_wf, "outputnode.mask", dict(label="lesion", suffix="mask", dtype="uint8",
                                                 meta=mask_meta, reference=ref)),
        ("ds_probseg", seg_wf, "outputnode.prob", dict(label="lesion", suffix="probseg",
                                                    dtype="float32", meta=prob_meta, reference=ref)),
        ("ds_trace", brain, "trace_file", dict(desc="preproc", suffix="trace", dtype="float32",
                                               reference=ref, meta={
                                                   "Sources": sources, "SkullStripped": True,
                                                   "SpatialReference": spatial})),
        ("ds_adc", brain, "adc_file", dict(desc="preproc", suffix="ADC", dtype="float32",
                                           reference=ref, meta={
                                               "Sources": sources, "SkullStripped": True,
                                               "Units": "1e-3 mm^2/s", "SpatialReference": spatial})),
        ("ds_brain", brain, "mask_file", dict(desc="brain", suffix="mask", dtype="uint8",
                                              reference=ref, meta={
                                                  "Type": "Brain", "Sources": sources,
                                                  "SpatialReference": spatial})),
        ("ds_stats", stats, "stats_file", dict(desc="lesion", suffix="stats", meta=STATS_DICTIONARY)),
    ]
    for name, src, field, opts in sinks:
        sink = _sink(name, config, session, opts.pop("suffix"), reference=opts.pop("reference", None),
                     dtype=opts.pop("dtype", None), meta=opts.pop("meta", None), **opts)
        wf.connect(src, field, sink, "in_file")
        if name == "ds_mask":
            wf.connect(sink, "out_file", outputnode, "mask")
            wf.connect(seg_wf, "outputnode.member_postprocessing", sink, "applied")
        elif name == "ds_probseg":
            wf.connect(sink, "out_file", outputnode, "probseg")
        elif name == "ds_stats":
            wf.connect(sink, "out_file", outputnode, "stats")
    if len(members) > 1:  # each member's own mask and probability map
        for index, member in enumerate(members):
            own = [p for p in provenance if p["name"] == member]
            member_meta = {**mask_meta, "Models": own,
                           "Sources": sources + (flair if own and own[0].get("needs_flair") else []),
                           "EnsembleRule": "none (single member of the ensemble)"}
            for suffix, field, dtype in (("mask", "member_masks", "uint8"),
                                         ("probseg", "member_probs", "float32")):
                pick = pe.Node(niu.Select(index=index), name=f"pick_{suffix}_{member}",
                               run_without_submitting=True)
                sink = _sink(f"ds_{suffix}_{member}", config, session, suffix, reference=ref,
                             dtype=dtype, meta=member_meta, label="lesion", desc=member)
                wf.connect([(seg_wf, pick, [(f"outputnode.{field}", "inlist")]),
                            (pick, sink, [("out", "in_file")])])
                if suffix == "mask":
                    pick_post = pe.Node(niu.Select(index=index), name=f"pick_post_{member}",
                                        run_without_submitting=True)
                    wf.connect([(seg_wf, pick_post, [("outputnode.member_postprocessing", "inlist")]),
                                (pick_post, sink, [("out", "applied")])])
    ds_figures = _sink("ds_figures", config, session, "figures", datatype="figures")
    wf.connect(figures, "figure_files", ds_figures, "in_file")

