"""The BIDS-App command-line contract: options, labels, refusals and exit codes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bids_app.cli import main, parse_config
from bids_app.config import parse_memory_gb
from bids_app.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bids_app" / "data" / "demo" / "isles22-sample"


def test_version_via_run_py():
    out = subprocess.run([sys.executable, str(ROOT / "run.py"), "--version"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0
    assert out.stdout.startswith("deepisles-bids ")


def test_unknown_analysis_level_is_17(tmp_path):
    assert main([str(DEMO), str(tmp_path / "out"), "session"]) == 17


def test_output_equal_to_bids_dir_is_refused(tmp_path, capsys):
    assert main([str(DEMO), str(DEMO), "participant"]) == 64
    assert "output_dir must differ" in capsys.readouterr().err


def test_output_inside_bids_dir_is_refused():
    assert main([str(DEMO), str(DEMO / "derivatives" / "x"), "participant"]) == 64


def test_work_dir_inside_bids_dir_is_refused(tmp_path, capsys):
    code = main([str(DEMO), str(tmp_path / "out"), "participant", "-w", str(DEMO / "work")])
    assert code == 64
    assert "work directory is inside bids_dir" in capsys.readouterr().err
    assert not (DEMO / "work").exists()


def test_missing_bids_dir_is_66(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 66
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_bad_option_is_usage_error(tmp_path):
    assert main([str(DEMO), str(tmp_path / "out"), "participant", "--nprocs", "x"]) == 64
    assert main([str(DEMO), str(tmp_path / "out"), "participant", "--device", "tpu"]) == 64


def test_labels_split_and_options(tmp_path):
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--participant-label",
                        "sub-01", "02,s060", "--session_label", "ses-1", "--nprocs", "3",
                        "--mem", "3000MB", "--models", "builtin", "-vv", "-w", str(tmp_path / "w")])
    assert cfg.participant_labels == ["sub-01", "02", "s060"]
    assert cfg.session_labels == ["ses-1"]
    assert cfg.nprocs == 3 and cfg.omp_nthreads == 3
    assert cfg.mem_gb == pytest.approx(3000 / 1024)
    assert cfg.models == ["builtin"] and cfg.verbose == 2
    assert cfg.work_dir == tmp_path / "w"
    assert cfg.contrast_check == "auto"
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--contrast-check", "on"])
    assert cfg.contrast_check == "on"
    assert parse_config([str(DEMO), str(tmp_path / "o"), "participant"]).grow_lesions == "auto"
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--grow-lesions", "off"])
    assert cfg.grow_lesions == "off"
    assert parse_config([str(DEMO), str(tmp_path / "o"), "participant"]).detect_lesions == "auto"
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--detect-lesions", "on"])
    assert cfg.detect_lesions == "on" and cfg.mirror_check == "off"
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--mirror-check", "on"])
    assert cfg.mirror_check == "on"


@pytest.mark.parametrize("option", ["--participant-label", "--session-label", "--models"])
def test_empty_label_is_a_usage_error(tmp_path, option):
    """An empty shell variable must not select nothing (it gave 'no diffusion data', exit 18)."""
    with pytest.raises(UsageError, match=f"{option}: no label given"):
        parse_config([str(DEMO), str(tmp_path / "o"), "participant", option, ""])


def test_recorded_command_line_names_the_installed_command(tmp_path):
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--participant-label", "a b"])
    assert cfg.command_line.startswith("deepisles ") and "'a b'" in cfg.command_line  # as typed, quoted


def test_config_file_gives_defaults(tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text('{"nprocs": 4, "random_seed": 7}')
    cfg = parse_config([str(DEMO), str(tmp_path / "o"), "participant", "--config-file", str(conf)])
    assert cfg.nprocs == 4 and cfg.random_seed == 7


@pytest.mark.parametrize("text,gb", [("8192", 8), ("16000", 16000 / 1024), ("8G", 8), ("8GB", 8), ("512MB", 0.5),
                                     ("1T", 1024)])
def test_parse_memory(text, gb):
    assert parse_memory_gb(text) == pytest.approx(gb)


def test_parse_memory_rejects_garbage():
    with pytest.raises(UsageError):
        parse_memory_gb("lots")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_is_73(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main([str(DEMO), str(out), "participant", "-w", str(tmp_path / "w")]) == 73
    finally:
        out.chmod(0o700)


def test_uncreatable_output_dir_is_73(tmp_path, capsys):
    """/proc refuses new folders even to root: the run stops with 73 and one line."""
    code = main([str(DEMO), "/proc/deepisles-out", "participant", "-w", str(tmp_path / "w")])
    assert code == 73
    assert "/proc/deepisles-out" in capsys.readouterr().err


def test_group_level_writes_nothing_in_the_current_directory(tmp_path):
    from tests.test_group import _session

    bids = tmp_path / "bids"
    bids.mkdir()
    out = tmp_path / "out"
    _session(out, "01", None, "1\t1\t1\t0.6\t0.001")
    here = tmp_path / "cwd"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "bids_app.cli", str(bids), str(out), "group"], cwd=str(here),
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "group_lesions.tsv").is_file() and not list(here.iterdir())



def test_sigterm_stops_the_run_with_143(monkeypatch):
    """`kill`, `timeout` or a batch system's warning signal: exit 143, processes stopped, handler restored."""
    import signal
    import time

    from bids_app import cli

    stopped = []

    def run_until_terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "_main", run_until_terminated)
    monkeypatch.setattr(cli, "stop_descendants", lambda: stopped.append(True))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["x", "y", "participant"]) == 143 and stopped == [True]
    assert signal.getsignal(signal.SIGTERM) is before
