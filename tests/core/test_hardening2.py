"""Issue 21 ("Hardening, round 2"): one test (or a few) per finding, numbered as in the issue.

The command-line parts of findings 5 and 6 are in tests/diffusers/test_hardening2_cli.py.
"""

from __future__ import annotations

import errno
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import random_map
from safetensors import SafetensorError

import act_core.maps as maps
from act_core.errors import ACTError, ACTInputError
from act_core.files import ACTFileWriteError, atomic_write, check_destination, check_writable_output
from act_core.maps import ACTMap

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ 4
@pytest.fixture
def specials(tmp_path):
    """A FIFO, a symlink to it, and a folder, all where a map could be written."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    return {"fifo": fifo, "link": link, "folder": folder}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("fifo", r"it is a named pipe \(FIFO\), not a regular file.*Choose a regular file path"),
        (
            "link",
            r"it is a symlink to '.*pipe.safetensors', which is a named pipe \(FIFO\).*regular file path",
        ),
        ("folder", "it is a folder. Give a file name"),
    ],
)
def test_finding4_atomic_write_refuses_destinations_that_are_not_regular_files(specials, kind, message):
    path = specials[kind]
    written = []
    with pytest.raises(ACTInputError, match=message) as info:
        atomic_write(path, lambda tmp: written.append(tmp.write_bytes(b"new")))
    assert str(path) in str(info.value)
    assert not written, "the check runs before anything is written"
    assert specials["fifo"].is_fifo() and specials["link"].is_symlink() and specials["folder"].is_dir()
    assert not list(path.parent.glob(".*.tmp"))
    with pytest.raises(ACTInputError, match=message):
        random_map({"n": 4}).save(path)  # maps (and LoRA exports, sweep grids) share atomic_write
    assert specials["fifo"].is_fifo() and specials["link"].is_symlink()


def test_finding4_outputs_are_checked_before_any_work(specials, tmp_path):
    with pytest.raises(ACTInputError, match=r"--output: cannot write .*named pipe \(FIFO\)"):
        check_writable_output(specials["fifo"], (".safetensors",), "--output")
    with pytest.raises(ACTInputError, match="symlink to .*named pipe"):
        check_writable_output(specials["link"], (".safetensors",), "--output")
    # A link to a character device (/dev/null) is refused too; checked only, never written to.
    null_link = tmp_path / "null.safetensors"
    null_link.symlink_to(os.devnull)
    with pytest.raises(ACTInputError, match="symlink to '/dev/null', which is a character device"):
        check_destination(null_link)
    # Regular files, links to them and dangling links (the file is created where they point) are fine.
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    good = tmp_path / "good.safetensors"
    good.symlink_to(real)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "later.safetensors")
    assert check_destination(real) == real and check_destination(good) == real
    assert check_destination(dangling) == tmp_path / "later.safetensors"
    random_map({"n": 4}).save(dangling)
    assert dangling.is_symlink() and ACTMap.load(tmp_path / "later.safetensors").equal(random_map({"n": 4}))


# ------------------------------------------------------------------------------------------ 5
def _old_file(tmp_path):
    path = tmp_path / "map.safetensors"
    random_map({"n": 4}, seed=1).save(path)
    return path, path.read_bytes()


def test_finding5_a_full_disk_is_one_clear_error_and_the_old_file_is_intact(tmp_path):
    path, old = _old_file(tmp_path)

    def full(tmp):
        tmp.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(ACTFileWriteError) as info:
        atomic_write(path, full)
    message = str(info.value)
    assert isinstance(info.value, ACTError) and info.value.errno == errno.ENOSPC
    assert f"Could not write {str(path)!r}: no space left on device." in message
    assert "The old file is intact" in message and "Free some space" in message
    assert path.read_bytes() == old and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ACTFileWriteError, match="no space left on device. No file was written"):
        atomic_write(tmp_path / "new.safetensors", full)
    assert not (tmp_path / "new.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))


def test_finding5_safetensors_disk_errors_from_a_map_save_are_translated(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(maps, "save_file", full)
    with pytest.raises(ACTFileWriteError, match="no space left on device. The old file is intact") as info:
        random_map({"n": 4}, seed=2).save(path)
    assert "\n" not in str(info.value) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == old and not list(tmp_path.glob(".*.tmp"))


def test_finding5_other_errors_pass_through_and_a_failed_rename_is_translated(tmp_path, monkeypatch):
    path, old = _old_file(tmp_path)

    def bug(tmp):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(path, bug)

    def refused(tmp):
        raise ACTInputError("fp16 overflows")

    with pytest.raises(ACTInputError, match="fp16 overflows"):
        atomic_write(path, refused)

    def failed_rename(*args):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failed_rename)
        with pytest.raises(ACTFileWriteError, match="input/output error.*intact.*Check the disk"):
            atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == old and not list(tmp_path.glob(".*.tmp"))
    assert ACTMap.load(path).equal(random_map({"n": 4}, seed=1))


def _node_folders():
    """``nodes/folders.py`` (the Save and Export nodes' writer), imported without ComfyUI."""
    spec = importlib.util.spec_from_file_location("act_nodes_folders", REPO / "nodes" / "folders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finding4_the_save_and_export_nodes_refuse_a_fifo_before_any_work(tmp_path, monkeypatch):
    folders = _node_folders()
    monkeypatch.setattr(
        folders, "_folder_paths", lambda: SimpleNamespace(get_folder_paths=lambda k: [str(tmp_path)])
    )
    os.mkfifo(tmp_path / "pipe.safetensors")
    written = []
    for overwrite in (False, True):
        with pytest.raises(ACTInputError, match=r"LoRA file name 'pipe.safetensors'.*named pipe \(FIFO\)"):
            folders.write_into_folder("loras", "pipe", overwrite, "LoRA file name", written.append)
    assert not written and (tmp_path / "pipe.safetensors").is_fifo()
    assert (
        folders.write_into_folder("loras", "sub/ok", False, "LoRA file name", written.append)
        == "sub/ok.safetensors"
    )
    assert written == [tmp_path / "sub" / "ok.safetensors"]
