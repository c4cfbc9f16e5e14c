"""Issue 21 ("Hardening, round 2"): one test (or a few) per finding, numbered as in the issue.

The command-line parts of findings 5 and 6 are in tests/diffusers/test_hardening2_cli.py.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import random_map
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import act_core.maps as maps
from act_core.errors import ACTError, ACTInputError, ACTMapFileError
from act_core.estimators import ModuleEstimator, robust_linear_act
from act_core.files import ACTFileWriteError, atomic_write, check_destination, check_writable_output
from act_core.maps import ACTMap, ModuleMap
from act_core.validation import (
    check_max_sequence_length,
    check_omega_guard,
    check_parts,
    check_sampling,
    check_seed,
)

REPO = Path(__file__).resolve().parents[2]
WIDTHS = {"unet.a.norm": 8, "unet.b.norm": 4, "text_encoder.layer_norm1": 6}


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


# ------------------------------------------------------------------------------------------ 1
LEVELS = (0.999, 0.5, 0.05)


def _module(shape, seed=0, bounded=False):
    generator = torch.Generator().manual_seed(seed)
    omega = 1 + 0.5 * torch.rand(shape, generator=generator)
    beta = 0.3 * torch.randn(shape, generator=generator)
    if bounded:
        low, high = -torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    else:
        low, high = torch.full(shape, -math.inf), torch.full(shape, math.inf)
    return ModuleMap(omega, beta, low, high)


def mixed_map(**metadata):
    """A time-aware map as the default SDXL preset with text encoders fits it: one bucket for the text
    encoder (it runs once per image), three noise-level buckets for the UNet's modules."""
    modules = {
        "text_encoder.layer_norm1": _module((6,), seed=1),
        "unet.a.norm": _module((len(LEVELS), 8), seed=2, bounded=True),
        "unet.b.norm": _module((len(LEVELS), 4), seed=3),
    }
    return ACTMap(modules, {"method": "linear", "family": "sdxl", **metadata}, LEVELS)


def test_finding1_a_mixed_map_is_described_restricted_and_saved(tmp_path):
    act_map = mixed_map()
    summary = act_map.summary()
    assert "noise-level buckets: 3, noise levels 0.999 .. 0.050" in summary
    assert "part text_encoder: 1 modules, foldable=True" in summary
    assert "part unet: 2 modules, foldable=False" in summary
    text = act_map.restrict(parts=["text_encoder"])
    assert list(text.modules) == ["text_encoder.layer_norm1"] and text.buckets is None and text.foldable
    assert text.modules["text_encoder.layer_norm1"].equal(act_map.modules["text_encoder.layer_norm1"])
    unet = act_map.restrict(parts=["unet"])
    assert list(unet.modules) == ["unet.a.norm", "unet.b.norm"] and unet.buckets == LEVELS
    assert act_map.restrict(patterns=["*.b.*", "text_encoder.*"]).buckets == LEVELS
    assert act_map.restrict(names=["text_encoder.layer_norm1"]).buckets is None
    loaded = ACTMap.load(act_map.save(tmp_path / "mixed.safetensors"))
    assert loaded.equal(act_map) and loaded.summary() == summary
    assert loaded.restrict(parts=["text_encoder"]).equal(text)


# ------------------------------------------------------------------------------------------ 3
def test_finding3_compose_keeps_family_and_cfg_rows(tmp_path):
    first, second = random_map(WIDTHS, seed=1), random_map(WIDTHS, seed=2)
    for act_map, family, rows in ((first, "flux", "all"), (second, "flux", "all")):
        act_map.metadata.update(family=family, cfg_rows=rows)
    composed = first.compose(second)
    assert composed.metadata["family"] == "flux" and composed.metadata["cfg_rows"] == "all"
    assert composed.metadata["composed_of"] == [first.metadata, second.metadata]
    loaded = ACTMap.load(composed.save(tmp_path / "composed.safetensors"))
    assert loaded.metadata["family"] == "flux" and loaded.metadata["cfg_rows"] == "all"
    # Maps without the keys (older files) stay without them: SDXL's and "cond" by every reader's default.
    plain = random_map(WIDTHS, seed=1).compose(random_map(WIDTHS, seed=2))
    assert "family" not in plain.metadata and "cfg_rows" not in plain.metadata
    old, new = random_map(WIDTHS, seed=1), random_map(WIDTHS, seed=2).with_metadata({"family": "sdxl"})
    assert old.compose(new).metadata["family"] == "sdxl"


def test_finding3_compose_refuses_other_families_and_cfg_rows():
    sdxl = random_map(WIDTHS, seed=1).with_metadata({"family": "sdxl", "cfg_rows": "cond"})
    flux = random_map(WIDTHS, seed=2).with_metadata({"family": "flux", "cfg_rows": "cond"})
    with pytest.raises(ACTInputError, match="fitted on sdxl with one fitted on flux.*same model family"):
        sdxl.compose(flux)
    with pytest.raises(ACTInputError, match="fitted on flux with one fitted on sdxl"):
        flux.compose(random_map(WIDTHS, seed=3))  # no family: an SDXL map
    every_row = random_map(WIDTHS, seed=3).with_metadata({"family": "sdxl", "cfg_rows": "all"})
    with pytest.raises(ACTInputError, match="cfg_rows='cond' with one with cfg_rows='all'"):
        sdxl.compose(every_row)
    with pytest.raises(ACTInputError, match="cfg_rows='all' with one with cfg_rows='cond'"):
        every_row.compose(random_map(WIDTHS, seed=4))  # no cfg_rows: "cond"
    # A text-encoder-only map's cfg_rows ("all", as fits record it) does not touch the UNet's rows.
    text = sdxl.restrict(parts=["text_encoder"]).with_metadata({"cfg_rows": "all"})
    unet = sdxl.restrict(parts=["unet"])
    for composed in (text.compose(unet), unet.compose(text)):
        assert composed.metadata["cfg_rows"] == "cond" and composed.metadata["family"] == "sdxl"


# ------------------------------------------------------------------------------------------ 7
def test_finding7_restrict_refuses_a_bare_string_and_unknown_parts():
    act_map = random_map(WIDTHS)
    with pytest.raises(ACTInputError, match=r"not the single str 'unet'.*give a list, e.g. \['unet'\]"):
        act_map.restrict(parts="unet")
    with pytest.raises(
        ACTInputError, match="No module part named 'vae'; the known module parts are 'text_enc"
    ):
        act_map.restrict(parts=["unet", "vae"])
    with pytest.raises(ACTInputError, match="names are strings, got 3"):
        act_map.restrict(parts=[3])
    assert list(act_map.restrict(parts=("unet", "unet")).modules) == ["unet.a.norm", "unet.b.norm"]


def test_finding7_check_parts():
    known = ("unet", "text_encoder", "text_encoder_2")
    assert check_parts(["text_encoder_2", "unet", "unet"], known) == ("text_encoder_2", "unet")
    assert check_parts({"unet"}, known) == ("unet",)
    for bad, message in (
        ("unet", r"give a list, e.g. \['unet'\]"),
        (b"unet", "single bytes"),
        (None, "must be a list of names, e.g. \\['unet'\\], got NoneType"),
        ([], "at least one part; the known ones are 'unet', 'text_encoder', 'text_encoder_2'"),
        (["transformer"], "No part named 'transformer'; the known parts are 'unet', 'text_encoder'"),
    ):
        with pytest.raises(ACTInputError, match=message):
            check_parts(bad, known)


@pytest.mark.parametrize(
    "buckets, message",
    [
        ('["0.999", "0.5"]', "Noise level 0 of the buckets is str '0.999', not a number"),
        ("[true, false, 0.5]", "Noise level 0 of the buckets is bool True, not a number"),
        ("[0.9, false]", "Noise level 1 of the buckets is bool False"),
        ('"0.5"', "buckets must be a list of noise levels"),
        ('{"0.5": 1}', "buckets must be a list of noise levels"),
    ],
)
def test_finding7_bucket_headers_must_be_numbers(tmp_path, buckets, message):
    path = tmp_path / "timed.safetensors"
    good = mixed_map().save(path)
    with safe_open(str(good), framework="pt") as handle:
        header = handle.metadata()
    tensors = load_file(str(good))
    save_file(tensors, str(path), metadata={**header, "buckets": buckets})
    with pytest.raises(ACTMapFileError, match=f"timed.safetensors: {message}"):
        ACTMap.load(path)
    for bad in (["0.999", "0.5", "0.05"], [True, 0.5, 0.05]):
        with pytest.raises(ACTInputError, match="not a number"):
            ACTMap(mixed_map().modules, {}, bad)


# ------------------------------------------------------------------------------------------ 6
@pytest.mark.parametrize("seed", [0, 7, 2**63 - 1, 2**64 - 1, np.int64(5)])
def test_finding6_check_seed_accepts_whole_numbers_a_generator_takes(seed):
    assert check_seed(seed) == seed and type(check_seed(seed)) is int
    torch.Generator().manual_seed((check_seed(seed) + 1000) % 2**64)  # prompt pair i uses seed + i


@pytest.mark.parametrize(
    "seed, message",
    [
        (
            2**64,
            "seed 18446744073709551616 is out of range: seeds are whole numbers from 0 to 18446744073709551615",
        ),
        (2**70, "out of range.*2\\*\\*64 - 1"),
        (-1, "seed -1 is out of range"),
        (
            1.5,
            "seed must be a whole number from 0 to 18446744073709551615 \\(2\\*\\*64 - 1\\), got float 1.5",
        ),
        (2.0, "got float 2.0"),
        (True, "got bool True"),
        ("3", "got str '3'"),
        (None, "got NoneType None"),
    ],
)
def test_finding6_check_seed_refuses(seed, message):
    with pytest.raises(ACTInputError, match=message):
        check_seed(seed)


def test_finding6_check_max_sequence_length():
    assert check_max_sequence_length(1) == 1 and check_max_sequence_length(512) == 512
    assert check_max_sequence_length(77, maximum=77) == 77
    for bad in (0, 513, -1, True, 256.0, "256", None):
        with pytest.raises(
            ACTInputError, match=f"max_sequence_length must be an integer from 1 to 512.*got {bad!r}"
        ):
            check_max_sequence_length(bad)
    with pytest.raises(ACTInputError, match="from 1 to 256"):
        check_max_sequence_length(300, maximum=256)


# ------------------------------------------------------------------------------------------ 7
def test_finding7_the_omega_guard_must_be_finite_and_in_range():
    generator = torch.Generator().manual_seed(0)
    source, target = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator) + 1
    for shrinkage, max_omega, message in (
        (math.nan, 10.0, "shrinkage must be finite, got nan"),
        (math.inf, 10.0, "shrinkage must be finite, got inf"),
        (1.0, math.nan, "max_omega must be finite, got nan"),
        (1.0, math.inf, "max_omega must be finite"),
        (-0.5, 10.0, "shrinkage must be >= 0"),
        (1.0, 1.0, "max_omega must be above 1 and at most 10000"),
        (1.0, 1e5, "max_omega must be above 1 and at most 10000"),
        (True, 10.0, "shrinkage must be a number, got True"),
        (1.0, "10", "max_omega must be a number, got '10'"),
    ):
        with pytest.raises(ACTInputError, match=message):
            ModuleEstimator("linear", shrinkage=shrinkage, max_omega=max_omega)
        with pytest.raises(ACTInputError, match=message):
            robust_linear_act(source, target, shrinkage, max_omega)
    assert check_omega_guard(0, 1e4) == (0.0, 1e4)  # the paper's plain estimator (demo.protocols)
    omega, _ = robust_linear_act(source, target, 0.0, 1e4)
    assert torch.isfinite(omega).all()


def test_finding7_check_sampling_refuses_bools_and_keeps_its_messages():
    assert check_sampling(20, 5) == (20, 5.0)
    for guidance in (True, False):
        with pytest.raises(ACTInputError, match=f"^guidance_scale must be a number, got {guidance}.$"):
            check_sampling(20, guidance)
    with pytest.raises(ACTInputError, match="^guidance_scale must be a number, got 'x'.$"):
        check_sampling(20, "x")
    with pytest.raises(ACTInputError, match="^guidance_scale must be a finite number >= 0, got -1.$"):
        check_sampling(20, -1)
    with pytest.raises(ACTInputError, match="^num_inference_steps must be an integer >= 1, got True.$"):
        check_sampling(True, 5.0)


def test_finding5_the_save_node_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    folders = _node_folders()
    monkeypatch.setattr(
        folders, "_folder_paths", lambda: SimpleNamespace(get_folder_paths=lambda k: [str(tmp_path)])
    )
    monkeypatch.setattr(folders, "register_act_maps_folder", lambda: True)
    path, old = _old_file(tmp_path)

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(maps, "save_file", full)
    with pytest.raises(
        ACTFileWriteError, match="map.safetensors': no space left on device. The old file is intact"
    ):
        folders.write_into_folder("act_maps", "map", True, "map file name", random_map({"n": 4}, seed=3).save)
    assert path.read_bytes() == old
