"""Atomic writes of nodes/base.py."""

from nodes import base


def test_outputs_follow_the_umask(tmp_path, monkeypatch):
    """Files are written as open() would write them: 0666 minus the umask (a group project's 002 gives
    0664; they were always 0644); mkstemp's 0600 must not leak into the outputs, and nothing is left
    under a temporary name."""
    assert base._UMASK == base._read_umask()  # the process's umask, read at import
    monkeypatch.setattr(base, "_UMASK", 0o002)
    path = base.write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert path.stat().st_mode & 0o777 == 0o664
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
