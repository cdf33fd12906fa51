import pytest

from bids_app.errors import UsageError
from models import device as D


def test_device_resolution_and_gpu_flag(monkeypatch):
    monkeypatch.setattr(D, "cuda_available", lambda: False)
    assert D.resolve_device("auto") == "cpu" and D.resolve_device("cpu") == "cpu"
    assert not D.wants_gpu("auto") and D.wants_gpu("cuda") and not D.wants_gpu("cpu")
    with pytest.raises(UsageError, match="cuda"):
        D.resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        D.resolve_device("tpu")
    monkeypatch.setattr(D, "cuda_available", lambda: True)
    assert D.resolve_device("auto") == "cuda" and D.wants_gpu("auto")
