"""shared.data prepare replaces its output directory whole: shards of an earlier run never survive,
files it did not write stop it, a crash at any moment leaves the old or the new directory, and
prepares run at once do not collide."""

import functools
import os
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared import data
from shared.data import MARKER, DataError, prepare, prepare_dataset, write_shard

BIG = "The quick brown fox jumps over the lazy dog. " * 30  # 301 tokens: 6 train shards
SMALL = "A second, smaller corpus. " * 4  # 25 tokens: 1 train shard
SPLIT = {"val_fraction": 0.1, "shard_tokens": 50}
MAKERS = {"prepare": prepare, "prepare_dataset": functools.partial(prepare_dataset, num_proc=1)}


def files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def names(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def prepared(tmp_path, text, out, make=prepare) -> dict[str, bytes]:
    """The files `make` writes for `text`, always read from the same input path (MARKER names it)."""
    (tmp_path / "in.txt").write_text(text)
    return files(make(tmp_path / "in.txt", out, **SPLIT))


@pytest.mark.parametrize(
    "maker, swap", [("prepare", "exchange"), ("prepare", "two renames"), ("prepare_dataset", "exchange")]
)
def test_smaller_run_leaves_no_stale_shards(tmp_path, monkeypatch, maker, swap):
    if swap == "two renames":  # the fallback where the system cannot swap two names at once
        monkeypatch.setattr(data, "exchange", lambda a, b: False)
    make = MAKERS[maker]
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "o"
    big = prepared(tmp_path, BIG, out, make)
    assert sum("_train_" in n for n in big) == 6
    small = prepared(tmp_path, SMALL, out, make)
    assert list(small) == ["in_train_000000.bin", "in_val_000000.bin", MARKER]  # the big run's shards are gone
    assert small == prepared(tmp_path, SMALL, tmp_path / "fresh", make)  # as if written into a new directory
    assert names(tmp_path / "w") == ["o"]  # nothing left beside it


def test_exchange_swaps_two_directories(tmp_path):
    # Where Linux's renameat2 is available (it is on the CI machines), the swap really happens
    # in one step; otherwise prepare uses two renames and a crash between them loses out_dir.
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux's")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    assert data.exchange(tmp_path / "a", tmp_path / "b")
    assert names(tmp_path / "a") == [] and names(tmp_path / "b") == ["from_a"]


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_refuses_a_directory_holding_other_files(tmp_path, monkeypatch, make):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    write_shard(out / "x_train_000000.bin", [1, 2, 3])
    before = files(out)
    (tmp_path / "in.txt").write_text(SMALL)

    def not_reached(*args, **kwargs):
        raise AssertionError("tokenized although out_dir cannot be replaced")

    monkeypatch.setattr(data, "write_split", not_reached)  # refused before the tokenizing
    with pytest.raises(DataError, match=r"/o: not empty, and holds files prepare did not write \(notes\.txt\); choose"):
        make(tmp_path / "in.txt", out)
    (out / "notes.txt").unlink()  # shards alone, but not prepare's: e.g. downloaded fineweb shards
    with pytest.raises(DataError, match=rf"/o: holds shards without a {MARKER} \(downloaded, or made by an older"):
        make(tmp_path / "in.txt", out)
    assert files(out) == {k: v for k, v in before.items() if k != "notes.txt"}
    with pytest.raises(DataError, match=r"in\.txt: exists and is not a directory"):
        make(tmp_path / "in.txt", tmp_path / "in.txt")
    assert names(tmp_path) == ["in.txt", "o"]


def test_refuses_a_file_that_appears_while_it_writes(tmp_path, monkeypatch):
    out = tmp_path / "o"
    old = prepared(tmp_path, BIG, out)
    write_split = data.write_split

    def meanwhile(*args, **kwargs):
        (out / "notes.txt").write_text("written by hand during the run")
        write_split(*args, **kwargs)

    monkeypatch.setattr(data, "write_split", meanwhile)
    with pytest.raises(DataError, match=r"holds files prepare did not write \(notes\.txt\)"):
        prepared(tmp_path, SMALL, out)
    assert files(out) == {**old, "notes.txt": b"written by hand during the run"}
    assert names(tmp_path) == ["in.txt", "o"]  # its new shards were deleted


# --- crashes ---------------------------------------------------------------------------------

DIED = 17  # the exit status of a child killed at the chosen point


def die(*args, **kwargs):
    os._exit(DIED)  # as kill -9: no cleanup runs, and the kernel releases the staging lock


def on_second_call(real):
    calls = []

    def wrapper(*args, **kwargs):
        if calls:
            die()
        calls.append(args)
        return real(*args, **kwargs)

    return wrapper


def kill_writing():
    data.write_shard = on_second_call(data.write_shard)


def kill_before_swap():
    data.swap_in = die


def kill_before_deleting_old():
    data.shutil.rmtree = die


def no_exchange():
    data.exchange = lambda a, b: False


def kill_between_renames():
    no_exchange()
    rename = os.rename
    os.rename = lambda src, dst: die() if os.path.basename(dst) == "o" else rename(src, dst)


def kill_after_renames():
    no_exchange()
    kill_before_deleting_old()


KILLS = {  # where the child dies -> what out_dir holds afterwards
    "while writing shards": (kill_writing, "old"),
    "before the swap": (kill_before_swap, "old"),
    "after the swap": (kill_before_deleting_old, "new"),
    "two renames, after both": (kill_after_renames, "new"),
    # Only without renameat2: no out_dir for a moment; both complete directories are beside it.
    "two renames, between them": (kill_between_renames, None),
}


def prepare_killed(tmp_path, out, kill) -> int:
    """Run prepare in a forked child that dies where `kill` says; its exit status."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.alarm(60)  # a child that hangs must not hang the suite
            kill()
            prepare(tmp_path / "in.txt", out, **SPLIT)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("where", KILLS)
def test_killed_prepare_leaves_old_or_new_and_the_next_run_recovers(tmp_path, where):
    kill, expected = KILLS[where]
    new = prepared(tmp_path, SMALL, tmp_path / "new")
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "o"
    old = prepared(tmp_path, BIG, out)
    (tmp_path / "in.txt").write_text(SMALL)
    assert prepare_killed(tmp_path, out, kill) == DIED
    after = {"old": old, "new": new, None: None}[expected]
    assert (files(out) if out.exists() else None) == after
    left = [n for n in names(tmp_path / "w") if n != "o"]
    assert left and all(n.startswith(".o.prepare-") for n in left)  # what the dead prepare left
    if expected is None:  # the old shards are whole beside out_dir
        assert old in [files(tmp_path / "w" / n) for n in left]
    assert prepared(tmp_path, SMALL, out) == new  # the next run succeeds, and deletes the leftovers
    assert names(tmp_path / "w") == ["o"]


def test_leftovers_of_a_running_prepare_are_kept(tmp_path):
    target = tmp_path / "o"
    running, fd = data.make_staging(target)
    dead, dead_fd = data.make_staging(target)
    os.close(dead_fd)  # as its process ending would
    data.remove_abandoned(target)
    assert running.exists() and not dead.exists()
    os.close(fd)


def test_concurrent_prepares_do_not_collide(tmp_path, monkeypatch):
    # Both have written all their shards before either swaps: on a shared temporary name, one
    # would have failed or overwritten the other's.
    expected = [prepared(tmp_path, text, tmp_path / f"ref{i}") for i, text in enumerate([BIG, SMALL])]
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "in.txt").write_text(BIG)
    (tmp_path / "in.txt").write_text(SMALL)
    swap_in, staged, barrier = data.swap_in, [], threading.Barrier(2, timeout=60)

    def swap_together(staging, target, shown):
        staged.append(staging)
        barrier.wait()
        return swap_in(staging, target, shown)

    monkeypatch.setattr(data, "swap_in", swap_together)
    inputs = [tmp_path / "big" / "in.txt", tmp_path / "in.txt"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda path: prepare(path, tmp_path / "o", **SPLIT), inputs))
    assert len(set(staged)) == 2
    result = files(tmp_path / "o")
    result[MARKER] = result[MARKER].replace(b"big/", b"")  # the big run's input was big/in.txt
    assert result in expected  # the whole output of one of them, whichever swapped last
    assert names(tmp_path) == sorted(["big", "in.txt", "o", "ref0", "ref1"])
