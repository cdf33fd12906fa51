"""Which torch device a run uses: ``auto`` resolves to CUDA when torch can use a GPU, else the CPU."""

from __future__ import annotations

from bids_app.errors import UsageError


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken torch install
        return False


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' if available else 'cpu'; 'cuda' without a GPU -> :class:`UsageError`."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise UsageError("device 'cuda' requested but no CUDA GPU is usable by torch "
                         "(torch.cuda.is_available() is False); use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return device


def wants_gpu(device: str) -> bool:
    """Value for the ``use_gpu`` input: True when ``device`` resolves to CUDA."""
    device = (device or "auto").lower()
    return device == "cuda" or (device == "auto" and cuda_available())
