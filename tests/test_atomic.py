"""Atomic file writes: the new text replaces the old whole, and a failed write leaves the old file and no
temp file behind."""
import pytest

from lincompile.atomic import atomic_write


def test_write_replaces_whole_and_leaves_no_temp(usual_umask, tmp_path):
    target = tmp_path / "sub" / "result.json"
    assert atomic_write(target, "first") == target
    atomic_write(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    atomic_write(target, "old")
    with pytest.raises(TypeError):
        atomic_write(target, 12345)  # neither text nor bytes: fails inside the write
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_directory_refuses_to_replace_what_lincompile_did_not_write(tmp_path):
    from lincompile.atomic import atomic_directory

    mine = tmp_path / "export"
    for text in ("first", "second"):  # a directory of this kind (it holds the marker) is replaced whole
        with atomic_directory(mine, "meta.json") as tmp:
            (tmp / "meta.json").write_text(text)
    assert (mine / "meta.json").read_text() == "second" and [p.name for p in mine.iterdir()] == ["meta.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, "meta.json") as tmp:
        (tmp / "meta.json").write_text("new")
    user = tmp_path / "home"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="holds no meta.json"):
        with atomic_directory(user, "meta.json") as tmp:
            (tmp / "meta.json").write_text("x")
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and (user / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(tmp_path / "file", "meta.json"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "export", "file", "home"]  # no temp dirs left


def test_a_target_that_cannot_be_made_is_refused_before_any_work(tmp_path, monkeypatch):
    """Under a file, or in a directory this process may not write: refused by the check commands run first."""
    import os

    from lincompile.atomic import check_replaceable

    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match=r"file is a file, so .*file/sub/out cannot be made there"):
        check_replaceable(tmp_path / "file" / "sub" / "out", "meta.json")
    locked = tmp_path / "locked"
    (locked / "old").mkdir(parents=True)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("locked"))  # root may write anywhere
    with pytest.raises(PermissionError, match="locked is not writable, so .*new/deeper cannot be made there"):
        check_replaceable(locked / "new" / "deeper", "meta.json")
    with pytest.raises(PermissionError, match="locked is not writable, so .*old cannot be replaced"):
        check_replaceable(locked / "old", "meta.json")
    check_replaceable(locked / "old", "meta.json", replaced=False)  # written inside (the demo's): old is writable
    with pytest.raises(PermissionError, match="locked is not writable, so .*locked cannot be written"):
        check_replaceable(locked, "meta.json", replaced=False)
    check_replaceable(tmp_path / "new" / "deeper", "meta.json")


def test_directories_get_ordinary_permissions_whatever_their_writers_did(usual_umask, tmp_path, monkeypatch):
    import os

    import torch
    from safetensors.torch import save_file

    from lincompile.atomic import atomic_directory

    monkeypatch.chdir(tmp_path)
    with atomic_directory("out/../saved", None) as tmp:  # named by its absolute path: "saved"
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors writes 0600
        (tmp / "sub").mkdir(mode=0o700)
    saved = tmp_path / "saved"
    assert os.stat(saved).st_mode & 0o777 == 0o755
    assert (saved / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (saved / "sub").stat().st_mode & 0o777 == 0o755
    for here in (".", ".."):  # never pulled from under the process
        with pytest.raises(ValueError, match="current directory or holds it"):
            with atomic_directory(here, None):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_permissions_follow_the_umask(tmp_path):
    import os

    from lincompile.atomic import atomic_directory

    before = os.umask(0o077)  # a user who keeps their files private
    try:
        with atomic_directory(tmp_path / "private", None) as tmp:
            (tmp / "model.onnx").write_text("x")
        file = atomic_write(tmp_path / "result.json", "{}")
    finally:
        os.umask(before)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "private" / "model.onnx").stat().st_mode & 0o777 == 0o600
    assert file.stat().st_mode & 0o777 == 0o600


def test_a_linked_target_replaces_what_the_link_points_to(tmp_path):
    from lincompile.atomic import atomic_directory

    real = tmp_path / "exports" / "v1"
    real.mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(real)
    for text in ("first", "second"):
        with atomic_directory(link, "meta.json") as tmp:
            (tmp / "meta.json").write_text(text)
    assert link.is_symlink() and (link / "meta.json").read_text() == "second"
    assert [p.name for p in real.iterdir()] == ["meta.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "exports"]
    assert [p.name for p in real.parent.iterdir()] == ["v1"]  # no temp or .old sibling left


def test_a_leftover_old_file_does_not_block_the_swap(tmp_path):
    from lincompile.atomic import atomic_directory

    (tmp_path / ".out.old").write_text("left by a crash")
    for _ in range(2):
        with atomic_directory(tmp_path / "out", "meta.json") as tmp:
            (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_swap_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Where the system can exchange two paths in one step the swap does, with no rename that would leave the
    target missing for a moment (a crash there used to leave no export at all)."""
    from lincompile import atomic

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not atomic._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system or file system cannot exchange two paths in one step")
    for name in ("a", "b"):
        (tmp_path / name).rmdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("old")
    renames = []
    monkeypatch.setattr(atomic.os, "replace", lambda *args: renames.append(args))
    with atomic.atomic_directory(out, "meta.json") as tmp:
        (tmp / "meta.json").write_text("new")
    assert (out / "meta.json").read_text() == "new" and renames == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_crash_between_the_two_renames_is_undone_by_the_next_write(tmp_path, monkeypatch):
    """Where the swap takes two renames, a crash between them leaves the old directory parked as `.out.old`; the
    next write to `out` puts it back before it starts (a reader sees it meanwhile) and names the crashed write's
    temp directory, which it does not delete (another process may be writing it)."""
    from lincompile import atomic
    from lincompile.diagnostics import LincompileWarning

    monkeypatch.setattr(atomic, "_exchange", lambda source, target: False)
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "meta.json").write_text("old")
    (tmp_path / ".out.tmp-crashed").mkdir()
    with pytest.warns(LincompileWarning) as caught:
        with atomic.atomic_directory(tmp_path / "out", "meta.json") as tmp:
            assert (tmp_path / "out" / "meta.json").read_text() == "old"
            (tmp / "meta.json").write_text("new")
    assert (tmp_path / "out" / "meta.json").read_text() == "new"
    messages = " ".join(str(w.message) for w in caught)
    assert "put back the previous directory" in messages and ".out.tmp-crashed" in messages
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-crashed", "out"]


def test_a_linked_file_is_replaced_where_it_points(tmp_path):
    real = tmp_path / "results" / "history.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "history.json"
    link.symlink_to(real)
    atomic_write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_bytes_are_written_whole_too(tmp_path):
    from lincompile.atomic import atomic_write

    picture = tmp_path / "plot.png"
    atomic_write(picture, b"\x89PNG old")
    atomic_write(picture, b"\x89PNG new")
    assert picture.read_bytes() == b"\x89PNG new" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
