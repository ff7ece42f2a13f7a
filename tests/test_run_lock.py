"""The run lock on --output_dir: a second run refuses, a killed run's lock is taken over, release cleans up."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from diffusers_repa.training.run_lock import LOCK_FILE_NAME, OutputDirInUseError, acquire_run_lock

# A second process that holds the lock until it is killed, like a training run in another terminal.
HOLDER = (
    "import sys\n"
    "from diffusers_repa.training.run_lock import acquire_run_lock\n"
    "lock = acquire_run_lock(sys.argv[1], command=['train_repa.py', '--output_dir', sys.argv[1]])\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_lock_records_its_owner_and_release_removes_it(tmp_path):
    with acquire_run_lock(tmp_path, command=["train_repa.py", "--seed", "1"]) as lock:
        owner = json.loads((tmp_path / LOCK_FILE_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["hostname"] == socket.gethostname()
        assert owner["command"] == ["train_repa.py", "--seed", "1"] and owner["started"][:2] == "20"
        assert lock.owner == owner and lock.held
    assert not (tmp_path / LOCK_FILE_NAME).exists() and not lock.held
    lock.release()  # idempotent
    acquire_run_lock(tmp_path).release()  # the folder is free again


def test_a_second_run_on_the_same_folder_refuses_until_the_first_releases(tmp_path):
    lock = acquire_run_lock(tmp_path)
    with pytest.raises(OutputDirInUseError) as error:
        acquire_run_lock(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and f"pid {os.getpid()}" in message and "\n" not in message
    lock.release()
    acquire_run_lock(tmp_path).release()


def test_a_live_run_holds_the_folder_and_a_killed_one_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as error:
            acquire_run_lock(tmp_path)
        message = str(error.value)
        assert f"in use by another training run (pid {holder.pid} on host {socket.gethostname()!r}" in message
        assert "pass another --output_dir" in message and f"delete {tmp_path / LOCK_FILE_NAME}" in message
    finally:
        holder.kill()  # no clean exit: the lock file stays behind, as after a crash or `kill -9`
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["pid"] == holder.pid

    with caplog.at_level(logging.WARNING), acquire_run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE_NAME).read_text())["pid"] == os.getpid()
    assert f"left by a run that is no longer alive (pid {holder.pid}" in caplog.text


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock_file = tmp_path / LOCK_FILE_NAME
    lock_file.write_text(json.dumps({"pid": 1, "hostname": "node-7", "started": "2025-01-01T00:00:00+00:00"}))
    with pytest.raises(OutputDirInUseError, match="host 'node-7'.*another host, so whether it is still alive"):
        acquire_run_lock(tmp_path)
    assert json.loads(lock_file.read_text())["hostname"] == "node-7"


@pytest.mark.parametrize("content", ["", '{"pid": 12', '["not", "an", "owner"]'])
def test_an_unreadable_lock_file_is_refused_not_guessed(tmp_path, content):
    (tmp_path / LOCK_FILE_NAME).write_text(content)
    with pytest.raises(OutputDirInUseError, match="cannot be read .* if no other run uses this folder, delete"):
        acquire_run_lock(tmp_path)
    assert (tmp_path / LOCK_FILE_NAME).read_text() == content


def test_release_never_deletes_another_runs_lock(tmp_path):
    lock = acquire_run_lock(tmp_path)
    replaced = json.dumps({"pid": 1, "hostname": "node-7", "started": "later"})
    (tmp_path / LOCK_FILE_NAME).write_text(replaced)  # e.g. someone deleted ours and another run locked the folder
    lock.release()
    assert (tmp_path / LOCK_FILE_NAME).read_text() == replaced


def test_a_folder_the_lock_created_is_removed_only_if_the_run_left_it_empty(tmp_path):
    acquire_run_lock(tmp_path / "failed-early").release()
    assert not (tmp_path / "failed-early").exists()
    with acquire_run_lock(tmp_path / "wrote" / "nested"):
        (tmp_path / "wrote" / "nested" / "checkpoint-1").mkdir()
    assert sorted(path.name for path in (tmp_path / "wrote" / "nested").iterdir()) == ["checkpoint-1"]


def test_an_output_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(NotADirectoryError, match="--output_dir .*run is a file"):
        acquire_run_lock(tmp_path / "run")
