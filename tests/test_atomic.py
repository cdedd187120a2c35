"""Atomic file writes: the new text replaces the old whole, and a failed write leaves the old file and no
temp file behind."""
import pytest

from lincompile.atomic import atomic_write_text


def test_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "result.json"
    assert atomic_write_text(target, "first") == target
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, b"not text")  # fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
