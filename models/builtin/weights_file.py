"""Built-in weights files and their JSON sidecar: read only after the SHA-256 matches the sidecar
(``read_verified``); written under a temporary name, then renamed (``write_weights``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS_NAME = "builtin_v1.pt"


class WeightsIntegrityError(RuntimeError):
    """The weights file has no sidecar, does not match its SHA-256, or is not a plain weights file."""


def verified_sidecar(path) -> dict:
    """The JSON sidecar of ``path`` after checking the file's SHA-256 against it (nothing is unpickled)."""
    from models.weights import sha256_file

    path = Path(path)
    side = path.with_suffix(".json")
    if not side.is_file():
        raise WeightsIntegrityError(f"{path}: no sidecar {side.name} with the SHA-256")
    try:
        meta = json.loads(side.read_text())
    except ValueError as exc:
        raise WeightsIntegrityError(f"{side}: unreadable sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise WeightsIntegrityError(f"{side}: the sidecar is not a JSON object")
    sha = sha256_file(path)
    if sha != meta.get("sha256"):
        raise WeightsIntegrityError(
            f"{path}: SHA-256 {sha} does not match the sidecar ({meta.get('sha256')}); refusing to load")
    return meta


def read_verified(path) -> tuple[dict, dict]:
    """(sidecar, state dict) of a weights file: SHA-256 checked first, then ``torch.load(weights_only=True)``."""
    import torch

    meta = verified_sidecar(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled objects, truncated or foreign files: one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsIntegrityError(
            f"{path}: refused to load: not a plain weights file readable with "
            f"weights_only=True ({type(exc).__name__}: {first})") from None
    return meta, state


def write_json(path, obj) -> Path:
    """``obj`` as indented JSON at ``path`` (``.part`` file, then rename: never half written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_weights(state: dict, out_dir, meta: dict) -> Path:
    """Save ``state`` as ``out_dir/builtin_v1.pt`` and ``meta`` plus the file's SHA-256 (added to
    ``meta`` as ``"sha256"``) as its sidecar ``builtin_v1.json``; return the weights path."""
    import torch

    from models.weights import sha256_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wpath = out / WEIGHTS_NAME
    tmp = wpath.with_name(wpath.name + ".part")
    torch.save(state, tmp)
    os.replace(tmp, wpath)
    meta["sha256"] = sha256_file(wpath)
    write_json(wpath.with_suffix(".json"), meta)
    return wpath
