"""The ``act`` command line end to end on a tiny local SDXL folder: fit -> sweep -> info -> export-lora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from act_core.cli import main, read_prompt_file
from act_core.diffusers.sweep import grid_layout
from act_core.maps import ACTMap

FAST = ["--steps", "2", "--height", "32", "--width", "32"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tiny_sdxl_dir) -> Path:
    return tiny_sdxl_dir


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    source, target = folder / "source.txt", folder / "target.txt"
    source.write_text("# source prompts\na red circle\n\na small red circle\na red circle on grey\n")
    target.write_text(
        "a blue square, striped\na small blue square, striped\n# comment\na blue square on grey\n"
    )
    return source, target


@pytest.fixture(scope="module")
def fitted(model_dir, prompt_files, tmp_path_factory) -> dict[str, Path]:
    """Maps fitted through the CLI once per module: the paper preset and the foldable one."""
    out = tmp_path_factory.mktemp("maps")
    source, target = prompt_files
    paths = {}
    for preset in ("unet_norms_first_step", "unet_norms_foldable"):
        paths[preset] = out / f"{preset}.safetensors"
        argv = ["fit", "-q", "--model", str(model_dir), "--source", str(source), "--target", str(target)]
        argv += ["--preset", preset, "--batch-size", "3", "--output", str(paths[preset]), *FAST]
        assert main(argv) == 0
    return paths


def test_read_prompt_file_skips_blanks_and_comments(prompt_files):
    assert read_prompt_file(prompt_files[0]) == ["a red circle", "a small red circle", "a red circle on grey"]


def test_fit_writes_a_map(model_dir, fitted):
    act_map = ACTMap.load(fitted["unet_norms_first_step"])
    assert act_map.parts() == ["unet"] and act_map.metadata["preset"] == "unet_norms_first_step"
    assert act_map.metadata["num_source"] == act_map.metadata["num_target"] == 3
    assert act_map.metadata["model_source"] == str(model_dir)
    assert ACTMap.load(fitted["unet_norms_foldable"]).foldable


def test_sweep_writes_a_grid_of_the_expected_size(model_dir, fitted, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = [
        "sweep",
        "-q",
        "--model",
        str(model_dir),
        "--map",
        str(fitted["unet_norms_first_step"]),
        "--prompt",
        "a red circle",
    ]
    argv += [
        "--prompt",
        "a small red circle",
        "--lambdas",
        "0,0.5,1",
        "--guidance",
        "1",
        "--output",
        str(grid),
    ]
    assert main([*argv, *FAST]) == 0
    image = Image.open(grid)
    assert image.format == "PNG"
    assert image.size == grid_layout(rows=2, columns=3, image_size=(32, 32)).size
    # More columns make the grid wider by whole cells, not taller.
    assert grid_layout(2, 4, (32, 32)).size[0] > image.size[0] == grid_layout(2, 3, (32, 32)).size[0]
    info = json.loads(image.text["act_sweep"])
    assert info["lambdas"] == [0.0, 0.5, 1.0] and info["prompts"] == ["a red circle", "a small red circle"]
    assert "Saved" in capsys.readouterr().out


def test_info_text_and_json(fitted, capsys):
    act_map = ACTMap.load(fitted["unet_norms_first_step"])
    assert main(["info", str(fitted["unet_norms_first_step"])]) == 0
    out = capsys.readouterr().out
    assert f"{len(act_map)} modules" in out
    recorded = act_map.metadata["source_prompts"]  # fits record them, so the map folds later without them
    assert f"source prompts: {len(recorded)} recorded (a fold uses them)" in out
    assert main(["info", "--json", str(fitted["unet_norms_first_step"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == len(act_map) and report["metadata"]["preset"] == "unet_norms_first_step"
    assert report["foldable"] is False


def test_info_entry_point_subprocess(fitted):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "act_core", "info", str(fitted["unet_norms_first_step"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(ACTMap.load(fitted['unet_norms_first_step']))} modules" in result.stdout


def test_export_lora(model_dir, fitted, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    argv = ["export-lora", "-q", "--model", str(model_dir), "--map", str(fitted["unet_norms_foldable"])]
    assert main([*argv, "--output", str(lora), "--dtype", "fp32"]) == 0
    assert "LoraLoader" in capsys.readouterr().out
    keys = load_file(str(lora))
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in keys)
    assert main(["info", str(lora)]) == 0
    assert "LoRA" in capsys.readouterr().out


def run_error(argv, capsys) -> str:
    """Run the CLI expecting a user error: exit status 2, one line on stderr, no traceback."""
    capsys.readouterr()  # drop what earlier runs printed (their warnings go to stderr too)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_hub_id_without_local_copy(prompt_files, tmp_path, capsys):
    source, target = prompt_files
    argv = ["fit", "-q", "--model", "nobody-act-tests/no-such-model", "--source", str(source)]
    err = run_error([*argv, "--target", str(target), "--output", str(tmp_path / "m.safetensors")], capsys)
    assert "No local copy of 'nobody-act-tests/no-such-model'" in err and "hf download" in err


def test_fit_with_statistics_over_several_steps(model_dir, fitted, prompt_files, tmp_path, capsys):
    source, target = prompt_files
    base = ["fit", "-q", "--model", str(model_dir), "--source", str(source), "--target", str(target)]
    base += ["--preset", "unet_norms_first_step", "--batch-size", "3", *FAST]
    steps = int(FAST[FAST.index("--steps") + 1])
    output = tmp_path / "all_steps.safetensors"
    assert main([*base, "--statistics-steps", str(steps), "--output", str(output)]) == 0
    warning = capsys.readouterr().err  # the tiny tokenizer lacks these words: one plain line, no source
    assert "act fit: warning: The tokenizer does not know" in warning and ".py:" not in warning
    act_map, first_step = ACTMap.load(output), ACTMap.load(fitted["unet_norms_first_step"])
    assert act_map.metadata["sampling"]["statistics_steps"] == steps > 1
    assert first_step.metadata["sampling"]["statistics_steps"] == 1
    name = next(iter(act_map.modules))
    assert not torch.equal(act_map.modules[name].omega, first_step.modules[name].omega)
    err = run_error([*base, "--statistics-steps", str(steps + 1), "--output", str(output)], capsys)
    assert "--statistics-steps must be between 1 and --steps" in err


def test_fit_at_one_pair_per_call_writes_the_one_call_map(model_dir, prompt_files, tmp_path, capsys):
    """``--max-pairs-per-call 1`` splits every step of the default fit and still writes the exact map."""
    source, target = prompt_files
    base = ["fit", "-q", "--model", str(model_dir), "--source", str(source), "--target", str(target), *FAST]
    whole, split = tmp_path / "whole.safetensors", tmp_path / "split.safetensors"
    assert main([*base, "--output", str(whole)]) == 0
    assert main([*base, "--max-pairs-per-call", "1", "--output", str(split)]) == 0
    whole_map, split_map = ACTMap.load(whole), ACTMap.load(split)
    assert split_map.metadata["pairs_per_call"] == 1 < whole_map.metadata["pairs_per_call"]
    assert split_map.metadata["causal_strategy"] == "exact"
    for name, module_map in whole_map.modules.items():
        torch.testing.assert_close(split_map.modules[name].beta, module_map.beta, rtol=1e-4, atol=1e-5)
    err = run_error([*base, "--max-pairs-per-call", "0", "--output", str(split)], capsys)
    assert "--max-pairs-per-call must be at least 1" in err


def test_fit_calibration_rule(model_dir, prompt_files, tmp_path, capsys):
    """``--calibration projection`` fits with the least-squares gains, the default with the norm rule (never
    smaller: the projection is the norm gain times the moves' cosine); an unknown rule is refused."""
    source, target = prompt_files
    base = ["fit", "-q", "--model", str(model_dir), "--source", str(source), "--target", str(target), *FAST]
    norm, projection = tmp_path / "norm.safetensors", tmp_path / "projection.safetensors"
    assert main([*base, "--output", str(norm)]) == 0
    assert main([*base, "--calibration", "projection", "--output", str(projection)]) == 0
    by_norm, by_projection = ACTMap.load(norm).metadata, ACTMap.load(projection).metadata
    assert by_norm["calibration"] == "norm" and by_projection["calibration"] == "projection"
    assert by_norm["calibration_gains"][0] >= by_projection["calibration_gains"][0]  # the same first step
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # argparse's choices
        main([*base, "--calibration", "cosine", "--output", str(norm)])
    assert refused.value.code == 2 and "invalid choice: 'cosine'" in capsys.readouterr().err


def test_missing_and_empty_prompt_files(model_dir, prompt_files, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    base = ["fit", "-q", "--model", str(model_dir), "--output", str(tmp_path / "m.safetensors")]
    err = run_error(
        [*base, "--source", str(tmp_path / "missing.txt"), "--target", str(prompt_files[1])], capsys
    )
    assert "missing.txt" in err and "does not exist" in err
    err = run_error([*base, "--source", str(empty), "--target", str(prompt_files[1])], capsys)
    assert "empty.txt" in err and "has no prompts" in err


def test_bad_outputs_and_maps(model_dir, fitted, prompt_files, tmp_path, capsys):
    source, target = prompt_files
    fit = ["fit", "-q", "--model", str(model_dir), "--source", str(source), "--target", str(target)]
    assert "must end in .safetensors" in run_error([*fit, "--output", str(tmp_path / "map.pt")], capsys)
    err = run_error([*fit, "--output", str(tmp_path / "no" / "map.safetensors")], capsys)
    assert "does not exist" in err
    sweep = [
        "sweep",
        "-q",
        "--model",
        str(model_dir),
        "--map",
        str(fitted["unet_norms_first_step"]),
        "--prompt",
        "x",
    ]
    assert "must end in .png" in run_error([*sweep, "--output", str(tmp_path / "grid.jpg")], capsys)
    assert "not found" in run_error(["info", str(tmp_path / "nope.safetensors")], capsys)
    export = ["export-lora", "-q", "--model", str(model_dir), "--map", str(fitted["unet_norms_first_step"])]
    err = run_error([*export, "--output", str(tmp_path / "lora.safetensors")], capsys)
    assert "unet_norms_foldable" in err and not (tmp_path / "lora.safetensors").exists()
