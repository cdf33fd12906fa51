"""A full participant run in a hostile environment: no network, read-only HOME, a non-root user,
a read-only input dataset, a minimal environment (no cache variables set).

One run of ``run.py`` (one subject, ``--nprocs 2`` so that MultiProc worker processes are covered)
under all conditions at once:

- network: a ``sitecustomize`` module (loaded by every Python process of the run, workers included)
  records and refuses every AF_INET/AF_INET6 ``connect``/``sendto``, ``create_connection`` and name
  lookup; when possible the run is also inside a new network namespace (``unshare -n``: loopback
  only). The test fails if any attempt was recorded.
- HOME: a read-only folder (owned by root, mode 0555) when the run is unprivileged, else a path under
  /proc that even root cannot create; MPLCONFIGDIR, TEMPLATEFLOW_HOME, XDG_* unset: the app must
  put its caches outside HOME (``bids_app.cli._prepare_environment``).
- user: uid/gid 65534 (``setpriv``) when the test runs as root; outputs in a world-writable folder.
- input: the dataset is made read-only (mode a-w) and hashed (content, mode, mtime) before and
  after: nothing in it may change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from models.builtin import predictor as bp
from tests.datasets import make_isles22

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

SITECUSTOMIZE = r'''
import json, os, socket, sys

_LOG = os.environ.get("DEEPISLES_TEST_NET_LOG")
_INET = (socket.AF_INET, socket.AF_INET6)


def _record(what, detail):
    if _LOG:
        with open(_LOG, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "what": what, "detail": repr(detail)[:300]}) + "\n")
    raise OSError(101, f"network disabled by the test ({what})")


_connect, _connect_ex, _sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto


def connect(self, address):
    if self.family in _INET:
        _record("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in _INET:
        _record("connect_ex", address)
    return _connect_ex(self, address)


def sendto(self, *args):
    if self.family in _INET:
        _record("sendto", args[-1])
    return _sendto(self, *args)


socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = connect, connect_ex, sendto
socket.create_connection = lambda address, *a, **k: _record("create_connection", address)
socket.getaddrinfo = lambda host, *a, **k: _record("getaddrinfo", host)
socket.gethostbyname = lambda host: _record("gethostbyname", host)
socket.gethostbyname_ex = lambda host: _record("gethostbyname_ex", host)


class _TemplateFlowWatch:
    """Record TEMPLATEFLOW_HOME at the moment anything imports templateflow."""

    def find_spec(self, name, path=None, target=None):
        if name == "templateflow" and _LOG:
            with open(_LOG + ".imports", "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "TEMPLATEFLOW_HOME":
                                     os.environ.get("TEMPLATEFLOW_HOME")}) + "\n")
        return None


sys.meta_path.insert(0, _TemplateFlowWatch())
'''


def _tree_state(root: Path) -> dict:
    """Content hash, mode and mtime of every entry under ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (digest, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return state


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode & ~0o222 | (0o555 if path.is_dir() else 0o444))


def _can_run_as_nobody() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", "import torch, nipype"],
                           env={"PATH": os.environ.get("PATH", ""), "HOME": "/proc/deepisles-no-home"},
                           capture_output=True, timeout=120, cwd="/")
    return probe.returncode == 0


def _can_unshare_net() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def hostile_run():
    if not bp.DEFAULT_WEIGHTS.is_file():
        pytest.skip("built-in weights not present")
    as_nobody = _can_run_as_nobody()
    netns = _can_unshare_net()
    base = Path(tempfile.mkdtemp(prefix="deepisles-hostile-"))  # not under pytest's 0700 tmp root
    try:
        base.chmod(0o755)
        bids = make_isles22(base / "bids", subjects=("01",), sessions=True, step=2)
        _make_read_only(bids)
        before = _tree_state(bids)
        site = base / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        scratch = base / "scratch"  # outputs, work dir and logs: world-writable
        scratch.mkdir()
        scratch.chmod(0o1777)
        net_log = scratch / "net.log"
        if as_nobody:
            home = base / "home"
            home.mkdir()
            home.chmod(0o555)  # owned by root: read-only for uid 65534
        else:
            home = Path("/proc/deepisles-no-home")  # cannot be created, even by root
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
               "PYTHONPATH": str(site), "DEEPISLES_TEST_NET_LOG": str(net_log),
               "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, str(ROOT / "run.py"), str(bids), str(scratch / "out"), "participant",
               "-w", str(scratch / "work"), "--nprocs", "2"]
        if as_nobody:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        if netns:
            cmd = ["unshare", "-n", *cmd]
        proc = subprocess.run(cmd, env=env, cwd=str(scratch), capture_output=True, text=True, timeout=400)
        yield {"proc": proc, "bids": bids, "before": before, "out": scratch / "out", "home": home,
               "net_log": net_log, "as_nobody": as_nobody, "netns": netns, "scratch": scratch}
    finally:
        for path in [base, *base.rglob("*")]:  # let root (or the owner) delete everything
            try:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
            except OSError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def test_run_succeeds(hostile_run):
    proc = hostile_run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = hostile_run["out"]
    mask = out / "sub-01/ses-0001/dwi/sub-01_ses-0001_label-lesion_mask.nii.gz"
    assert mask.is_file() and (out / "sub-01.html").is_file()
    assert "Traceback" not in proc.stderr
    for text in ("Permission denied", "Read-only file system", "not writable", "temporary cache"):
        assert text not in proc.stderr, f"{text!r} in the run's messages:\n{proc.stderr[-3000:]}"


def test_network_guard_detects_attempts(tmp_path):
    """The guard itself works: a lookup and a connection from a child process are recorded."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.log"
    code = ("import socket, urllib.request\n"
            "for f in (lambda: urllib.request.urlopen('http://example.org', timeout=2),\n"
            "          lambda: socket.getaddrinfo('example.org', 80),\n"
            "          lambda: socket.socket().connect(('127.0.0.1', 9))):\n"
            "    try:\n        f()\n    except OSError:\n        pass\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), "DEEPISLES_TEST_NET_LOG": str(log)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60, check=True)
    whats = [json.loads(line)["what"] for line in log.read_text().splitlines()]
    assert {"create_connection", "getaddrinfo", "connect"} <= set(whats)


def test_no_network_access(hostile_run):
    log = hostile_run["net_log"]
    attempts = log.read_text().splitlines() if log.exists() else []
    assert attempts == [], "network access attempted:\n" + "\n".join(attempts)


def test_input_dataset_unchanged(hostile_run):
    assert _tree_state(hostile_run["bids"]) == hostile_run["before"]


def test_caches_outside_home(hostile_run):
    home = hostile_run["home"]
    if home.is_dir():
        assert list(home.iterdir()) == []
    imports = Path(str(hostile_run["net_log"]) + ".imports")
    for line in (imports.read_text().splitlines() if imports.exists() else []):
        tf_home = json.loads(line)["TEMPLATEFLOW_HOME"]
        assert tf_home and not tf_home.startswith(str(home)), line
    work_cache = hostile_run["scratch"] / "work" / ".cache"
    if work_cache.exists():  # whatever caches were made live in the work directory
        assert work_cache.is_dir()


def test_ran_unprivileged(hostile_run):
    if not hostile_run["as_nobody"]:
        pytest.skip("cannot switch to an unprivileged user here (not root, or no setpriv)")
    mask = hostile_run["out"] / "sub-01/ses-0001/dwi/sub-01_ses-0001_label-lesion_mask.nii.gz"
    assert mask.stat().st_uid == NOBODY


def test_prepare_environment_sets_caches_before_templateflow(tmp_path):
    """Without TEMPLATEFLOW_HOME/MPLCONFIGDIR and with an unusable HOME, the CLI's environment step
    points templateflow and matplotlib at the work directory before either is imported."""
    code = (
        "import sys, os\n"
        "from bids_app.cli import parse_config, _prepare_environment\n"
        f"cfg = parse_config([{str(ROOT / 'bids_app/data/demo/isles22-sample')!r}, "
        f"{str(tmp_path / 'out')!r}, 'participant', '-w', {str(tmp_path / 'work')!r}])\n"
        "assert 'templateflow' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "_prepare_environment(cfg)\n"
        "import templateflow.conf, matplotlib\n"
        "print(templateflow.conf.TF_HOME)\n"
        "print(matplotlib.get_configdir())\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/proc/deepisles-no-home", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tf_home, mpl = proc.stdout.split()[-2:]
    assert Path(tf_home).is_relative_to(tmp_path / "work")
    assert Path(mpl).is_relative_to(tmp_path / "work")


def test_unusable_matplotlib_cache_is_replaced(tmp_path):
    """The images set MPLCONFIGDIR=/tmp/.cache/matplotlib; on a shared node another user may own it.
    A cache folder that cannot be made is replaced by one in the work directory (no warnings)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = (
        "import os\n"
        "from bids_app.cli import parse_config, _prepare_environment\n"
        f"cfg = parse_config([{str(ROOT / 'bids_app/data/demo/isles22-sample')!r}, "
        f"{str(tmp_path / 'out')!r}, 'participant', '-w', {str(tmp_path / 'work')!r}])\n"
        "_prepare_environment(cfg)\n"
        "print(os.environ['MPLCONFIGDIR'])\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "MPLCONFIGDIR": str(blocker / "mpl")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.split()[-1]).is_relative_to(tmp_path / "work")


def test_unreadable_home_as_non_root(tmp_path):
    """HOME=/root-like (exists, mode 0700, owned by root) for an unprivileged user, as with
    ``docker run -u $(id -u)``: the app must start, discover and stop cleanly (exit 18: the label
    selects nothing), not crash at ``import bids`` (pybids stats ~/pybids_config.json at import)."""
    if not _can_run_as_nobody():
        pytest.skip("cannot switch to an unprivileged user here (not root, or no setpriv)")
    base = Path(tempfile.mkdtemp(prefix="deepisles-home-"))
    try:
        base.chmod(0o755)
        home = base / "root-home"
        home.mkdir(mode=0o700)
        scratch = base / "scratch"
        scratch.mkdir()
        scratch.chmod(0o1777)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "LANG": "C.UTF-8"}
        demo = ROOT / "bids_app/data/demo/isles22-sample"
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
             str(ROOT / "run.py"), str(demo), str(scratch / "out"), "participant", "-w", str(scratch / "work"),
             "--participant-label", "nobodyhere"],
            env=env, cwd=str(scratch), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 18, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "nobodyhere" in proc.stderr
        assert list(home.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
