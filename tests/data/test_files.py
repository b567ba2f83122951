"""Only regular files are read: a FIFO, a device, a folder named like an image are refused without waiting on them,
and reads are bounded."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from roadwork.data import files
from roadwork.data.files import UnreadableFile, file_problem, open_regular, read_regular

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")


@posix_only
def test_what_is_not_a_regular_file_is_named_from_its_stat(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.jpg")
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "big.jpg").write_bytes(b"x" * 2049)
    (tmp_path / "ok.jpg").write_bytes(b"x" * 2048)
    (tmp_path / "link.jpg").symlink_to(tmp_path / "ok.jpg")  # links are followed to what they name
    assert file_problem(tmp_path / "a.jpg") == "not a regular file (a FIFO); only regular files are read"
    assert file_problem(tmp_path / "z.jpg") == (
        "not a regular file (a character device); only regular files are read"
    )
    assert "(a folder)" in str(file_problem(tmp_path / "dir.jpg"))
    assert file_problem(tmp_path / "empty.jpg") == "zero-byte file"
    assert file_problem(tmp_path / "missing.jpg") == "unreadable: No such file or directory"
    assert file_problem(tmp_path / "big.jpg", max_bytes=2048) == "file too large (0.0 MiB > 0.0 MiB)"
    assert file_problem(tmp_path / "big.jpg") is None
    assert file_problem(tmp_path / "ok.jpg", max_bytes=2048) is None
    assert read_regular(tmp_path / "link.jpg", max_bytes=2048) == b"x" * 2048


@posix_only
def test_a_fifo_is_refused_without_waiting_even_if_it_replaced_the_file_after_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returns_unblocked
) -> None:
    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFile, match=r"a FIFO"):
        returns_unblocked(lambda: read_regular(fifo), [fifo])
    # the stat said "a regular file" (the FIFO came after it): the opened descriptor is checked again, and the
    # open itself does not wait for a writer
    monkeypatch.setattr(files, "file_problem", lambda path, max_bytes=None: None)
    with pytest.raises(UnreadableFile, match=r"a FIFO"):
        returns_unblocked(lambda: open_regular(fifo), [fifo])


@posix_only
def test_dev_zero_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    with pytest.raises(UnreadableFile, match="character device"):
        read_regular(tmp_path / "z.jpg")
    monkeypatch.setattr(files, "file_problem", lambda path, max_bytes=None: None)
    with pytest.raises(UnreadableFile, match="character device"):  # refused on the descriptor, unread
        read_regular(tmp_path / "z.jpg")


def test_a_read_is_bounded_even_if_the_file_grew_after_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "grows.jpg"
    p.write_bytes(b"x" * 100)
    assert read_regular(p, max_bytes=100) == b"x" * 100
    real = files._stat_problem
    monkeypatch.setattr(files, "_stat_problem", lambda st, max_bytes: real(st, None))  # both checks fooled
    with pytest.raises(UnreadableFile, match="file too large"):
        read_regular(p, max_bytes=99)
