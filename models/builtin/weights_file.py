"""Writing built-in weights and their JSON sidecar: each file under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS_NAME = "builtin_v1.pt"


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
