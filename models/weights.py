"""Locating model weights, SHA-256 checks and safe loading.

Every weight file is checked *before* it is deserialised: a file that fails its checksum is never
handed to ``torch.load``. Loading uses ``weights_only=True`` (no arbitrary pickled objects) unless
the caller explicitly opts in with ``allow_pickle=True`` for files it trusts.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from bids_app.errors import WeightsError

_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (looked in {path.parent})")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hex(value: str, where: str) -> str:
    value = str(value).strip().lower()
    if not _HEX64.match(value):
        raise WeightsError(f"{where}: not a SHA-256 hex digest: {value!r}")
    return value


def verify(path, expected_sha256: str) -> str:
    """Raise :class:`WeightsError` unless ``path`` has the SHA-256 ``expected_sha256``.

    Returns the digest (lower-case hex).
    """
    expected = _check_hex(expected_sha256, f"{path}: expected checksum")
    got = sha256_file(path)
    if got != expected:
        raise WeightsError(f"{path}: SHA-256 mismatch (expected {expected}, got {got})")
    return got


def load_checksum_manifest(path) -> dict[str, str]:
    """Read a checksum manifest: ``{relative path: sha256 hex}``.

    Two formats are accepted: ``sha256sum`` output (``<hex>  <path>`` or ``<hex> *<path>``, blank
    lines and ``#`` comments ignored) and a JSON object ``{"relpath": "hex", ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checksum manifest not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    manifest: dict[str, str] = {}
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{path}: invalid JSON checksum manifest ({exc})") from None
        if not isinstance(data, dict):
            raise WeightsError(f"{path}: JSON checksum manifest must be an object {{relpath: sha256}}")
        for rel, hexd in data.items():
            manifest[_norm_rel(rel)] = _check_hex(hexd, f"{path}: entry {rel!r}")
        return manifest
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise WeightsError(f"{path}:{lineno}: expected '<sha256>  <relative path>', got {line!r}")
        hexd, rel = parts
        rel = rel.strip()
        if rel.startswith("*"):  # sha256sum binary-mode marker
            rel = rel[1:]
        manifest[_norm_rel(rel)] = _check_hex(hexd, f"{path}:{lineno}")
    if not manifest:
        raise WeightsError(f"{path}: checksum manifest lists no files")
    return manifest


def _norm_rel(rel: str) -> str:
    rel = str(rel).replace("\\", "/").strip()
    while rel.startswith("./"):
        rel = rel[2:]
    return rel


def missing_files(root, relpaths) -> list[str]:
    """The entries of ``relpaths`` that are not regular files under ``root``."""
    root = Path(root) if root is not None else None
    if root is None:
        return list(relpaths)
    return [rel for rel in relpaths if not (root / rel).is_file()]


def require_files(root, relpaths, what: str = "weights") -> list[Path]:
    """Raise :class:`WeightsError` listing every missing file and the folder searched."""
    relpaths = list(relpaths)
    missing = missing_files(root, relpaths)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(
            f"{what}: {len(missing)} of {len(relpaths)} file(s) missing in {root}: {shown}"
        )
    return [Path(root) / rel for rel in relpaths]


def verify_manifest(root, manifest: dict[str, str], only=None) -> dict[str, str]:
    """Check files under ``root`` against ``manifest`` (all entries, or those in ``only``).

    Returns ``{relpath: sha256}`` of the checked files; raises on the first missing file or mismatch.
    """
    root = Path(root)
    rels = [_norm_rel(r) for r in (only if only is not None else manifest)]
    unknown = [r for r in rels if r not in manifest]
    if unknown:
        raise WeightsError(f"checksum manifest has no entry for: {', '.join(unknown[:5])}")
    require_files(root, rels)
    return {rel: verify(root / rel, manifest[rel]) for rel in rels}


def safe_torch_load(path, expected_sha256: str | None = None, allow_pickle: bool = False):
    """Load a PyTorch checkpoint on the CPU, checking its SHA-256 first when one is given.

    With ``allow_pickle=False`` (default) only tensors and plain containers are accepted
    (``weights_only=True``); a file holding other pickled objects is refused with a clear error.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (looked in {path.parent})")
    if expected_sha256:
        verify(path, expected_sha256)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except Exception as exc:
        if allow_pickle:
            raise WeightsError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused to load: not a plain weights file readable with weights_only=True "
            f"({first}); it may contain arbitrary pickled Python objects. Load it with "
            "allow_pickle=True only if you trust its origin and its checksum is verified"
        ) from None


def load_state_dict_strict(net, state_dict: dict, where: str, what: str | None = None) -> None:
    """``net.load_state_dict(strict=True)`` with one readable :class:`WeightsError`.

    The error names ``where`` (the file) and lists missing and unexpected keys and shape mismatches.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs network {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]

    def listed(keys, n=4):
        return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")

    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({listed(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s) ({listed(extra)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:3])})")
        raise WeightsError(f"{where}: weights do not match the {what or type(net).__name__}: "
                           + ", ".join(parts))
    net.load_state_dict(state_dict, strict=True)
