"""Atomic folders: the first writer wins a race, and no writer leaves a temp folder behind."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from mmpref.io import atomic_dir


def test_keep_first_writer_when_another_lands_during_the_block(tmp_path):
    target = tmp_path / "set"
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "f.txt").write_text("ours")
        target.mkdir()  # another process finishes first, while we are still writing
        (target / "f.txt").write_text("theirs")
    assert (target / "f.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_keep_first_writer_when_another_lands_just_before_our_rename(tmp_path, monkeypatch):
    """The race CI met: the other writer's folder appears after any check we could make, before our rename."""
    import os

    import mmpref.io

    target = tmp_path / "set"
    real_replace = os.replace

    def other_writer_lands_first(src, dst):
        if str(dst) == str(target) and not target.exists():
            target.mkdir()
            (target / "f.txt").write_text("theirs")
        return real_replace(src, dst)

    monkeypatch.setattr(mmpref.io.os, "replace", other_writer_lands_first)
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "f.txt").write_text("ours")
    assert (target / "f.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_replace_swaps_in_the_new_folder(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "f.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (target / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "set") as tmp:
        (tmp / "f.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _write_after_barrier(target: str, barrier, tag: str) -> None:
    barrier.wait()
    with atomic_dir(target, replace=False) as tmp:
        (tmp / "f.txt").write_text(tag)


def test_concurrent_writers_do_not_fail(tmp_path):
    """Four processes released together write the same folder: none raises, one set survives, no temp is left."""
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        target = tmp_path / f"set{round_}"
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_write_after_barrier, args=(str(target), barrier, str(i))) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert (target / "f.txt").read_text() in {"0", "1", "2", "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set0", "set1", "set2"]
