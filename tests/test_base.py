"""Atomic writes of nodes/base.py."""

from nodes import base


def test_outputs_follow_the_umask(tmp_path):
    """Files are written as open() would write them: 0666 minus the umask (group projects use 002);
    mkstemp's 0600 must not leak into the outputs, and nothing is left under a temporary name."""
    path = base.write_json_atomic({"a": 1}, tmp_path / "x.json")
    assert path.stat().st_mode & 0o777 == 0o666 & ~base._UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
