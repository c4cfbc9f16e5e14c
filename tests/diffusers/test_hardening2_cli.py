"""Issue 21 ("Hardening, round 2"), the command line: findings 1 (mixed maps), 5 (a full disk) and 6
(seeds, T5 length, damaged LoRA headers). Each user mistake exits 2 with one line on stderr and no traceback."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from helpers import random_map
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file

import act_core.lora as lora
import act_core.maps as maps
from act_core.cli import main
from act_core.maps import ACTMap, ModuleMap

FAST = ["--steps", "2", "--height", "32", "--width", "32"]


def run_error(argv, capsys) -> str:
    """Run the CLI expecting a user error: exit status 2, one error line on stderr, no traceback.

    Warnings printed before it (one line each: the tiny tokenizer does not know the prompts' words) are
    not part of the error."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def no_model_load(monkeypatch):
    import act_core.diffusers.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.fixture
def prompts(tmp_path):
    source, target = tmp_path / "source.txt", tmp_path / "target.txt"
    source.write_text("a red circle\na small red circle\na red circle on grey\n")
    target.write_text("a blue square, striped\na small blue square, striped\na blue square on grey\n")
    return source, target


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------ 5
def test_finding5_a_full_disk_exits_2_with_one_line_and_keeps_the_old_files(
    tiny_sdxl_dir, prompts, tmp_path, monkeypatch, capsys
):
    source, target = prompts
    model = ["--model", str(tiny_sdxl_dir)]
    fit = ["fit", "-q", *model, "--source", str(source), "--target", str(target), *FAST]
    fit += ["--preset", "unet_norms_foldable", "--batch-size", "3"]
    output = tmp_path / "map.safetensors"
    assert main([*fit, "--output", str(output)]) == 0
    old_map = output.read_bytes()

    def safetensors_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(maps, "save_file", safetensors_full)
        err = run_error([*fit, "--seed", "1", "--output", str(output)], capsys)
    assert err.startswith(f"act fit: error: Could not write {str(output)!r}: no space left on device.")
    assert "The old file is intact" in err and output.read_bytes() == old_map

    lora_path = tmp_path / "lora.safetensors"
    export = ["export-lora", "-q", *model, "--map", str(output), "--output", str(lora_path)]
    assert main(export) == 0
    old_lora = lora_path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(lora, "save_file", full_disk)
        err = run_error([*export, "--strength", "0.5"], capsys)
    assert err.startswith("act export-lora: error: Could not write") and "no space left on device" in err
    assert lora_path.read_bytes() == old_lora

    grid = tmp_path / "grid.png"
    sweep = ["sweep", "-q", *model, "--map", str(output), "--prompt", "a red circle", "--lambdas", "0,1"]
    sweep += ["--steps", "1", "--height", "32", "--width", "32", "--output", str(grid)]
    grid.write_bytes(b"an old grid")
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", full_disk)
        err = run_error(sweep, capsys)
    assert err.startswith("act sweep: error: Could not write") and "no space left on device" in err
    assert grid.read_bytes() == b"an old grid"
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------ 6
@pytest.mark.parametrize("seed", ["18446744073709551616", "99999999999999999999", str(2**70), "-1"])
def test_finding6_out_of_range_seeds_exit_2_before_loading(prompts, tmp_path, monkeypatch, capsys, seed):
    no_model_load(monkeypatch)
    source, target = prompts
    fit = ["fit", "--model", str(tmp_path), "--source", str(source), "--target", str(target)]
    err = run_error([*fit, "--seed", seed, "--output", str(tmp_path / "m.safetensors")], capsys)
    assert f"act fit: error: --seed {int(seed)} is out of range" in err and "0 to 18446744073709551615" in err
    path = random_map({"unet.a": 4}).save(tmp_path / "m.safetensors")
    sweep = ["sweep", "--model", str(tmp_path), "--map", str(path), "--prompt", "a cat"]
    err = run_error([*sweep, "--seed", seed, "--output", str(tmp_path / "g.png")], capsys)
    assert f"act sweep: error: --seed {int(seed)} is out of range" in err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("length", ["0", "513", "-4"])
def test_finding6_max_sequence_length_must_be_1_to_512(prompts, tmp_path, monkeypatch, capsys, length):
    no_model_load(monkeypatch)
    source, target = prompts
    fit = ["fit", "--model", str(tmp_path), "--source", str(source), "--target", str(target)]
    err = run_error(
        [*fit, "--max-sequence-length", length, "--output", str(tmp_path / "m.safetensors")], capsys
    )
    assert "--max-sequence-length must be an integer from 1 to 512" in err and f"got {int(length)}" in err


def _lora_file(path, **header):
    base = {
        "format": "act_lora",
        "act_version": "0",
        "strength": "1.0",
        "dtype": "fp32",
        "modules": "1",
        "parts": "unet",
        "note": "a note",
        "act_map_metadata": json.dumps({"family": "sdxl"}),
    }
    save_file({"unet.a.diff": torch.zeros(2)}, str(path), metadata={**base, **header})
    return path


@pytest.mark.parametrize(
    "header, message",
    [
        ({"modules": "many"}, "'modules' is 'many', not a number of modules"),
        ({"modules": "-1"}, "'modules' is '-1'"),
        ({"act_map_metadata": "{not json"}, "'act_map_metadata' is not valid JSON"),
        ({"act_map_metadata": "[1, 2]"}, "'act_map_metadata' is a JSON list, not an object"),
    ],
)
def test_finding6_info_refuses_a_lora_with_a_damaged_header(tmp_path, capsys, header, message):
    path = _lora_file(tmp_path / "lora.safetensors", **header)
    for flags in (["--json"], []):
        err = run_error(["info", str(path), *flags], capsys)
        assert err.startswith("act info: error: lora.safetensors is an ACT LoRA export with a damaged header")
        assert message in err and "act export-lora" in err


def test_finding6_info_reads_a_sound_lora_header(tmp_path, capsys):
    path = _lora_file(tmp_path / "lora.safetensors")
    assert main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "lora" and report["modules"] == 1
    assert report["act_map_metadata"] == {"family": "sdxl"}


# ------------------------------------------------------------------------------------------ 1
def test_finding1_info_describes_a_mixed_map(tmp_path, capsys):
    """One-bucket text-encoder modules beside time-aware UNet modules (what the default SDXL preset with
    text encoders fits): `act info` used to exit 2 on them."""

    def module(shape):
        return ModuleMap(
            torch.ones(shape), torch.zeros(shape), torch.full(shape, -1.0), torch.full(shape, 1.0)
        )

    modules = {"text_encoder.layer_norm1": module((6,)), "unet.a.norm": module((3, 8))}
    path = ACTMap(modules, {"family": "sdxl"}, (0.999, 0.5, 0.05)).save(tmp_path / "mixed.safetensors")
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "noise-level buckets: 3" in out and "part text_encoder: 1 modules" in out
    assert main(["info", str(path), "--json", "--modules"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["buckets"] == [0.999, 0.5, 0.05] and report["parts"] == ["text_encoder", "unet"]
    assert report["module_widths"] == {"text_encoder.layer_norm1": 6, "unet.a.norm": 8}
