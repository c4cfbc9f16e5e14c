"""Packaging: what pip, ComfyUI-Manager and the ComfyUI registry read from the repository."""

import re
from pathlib import Path

import pytest

import act_core

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_one_version():
    assert pyproject()["project"]["version"] == act_core.__version__


def test_registry_metadata_and_urls():
    project = pyproject()
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].endswith("docs/images/icon.png")
    assert (REPO / "docs" / "images" / "icon.png").is_file()
    assert {"Homepage", "Repository", "Documentation", "Issues"} <= set(project["project"]["urls"])


def test_requirements_for_comfyui_manager_leave_torch_to_comfyui():
    lines = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    names = [re.split(r"[<>=!~ ]", line)[0].lower() for line in lines if line and not line.startswith("#")]
    assert names and not {"torch", "torchvision", "torchaudio"} & set(names)
    core = [re.split(r"[<>=!~ ]", d)[0].lower() for d in pyproject()["project"]["dependencies"]]
    assert set(names) == set(core) - {"torch"}


def test_the_wheel_holds_the_library_only():
    found = pyproject()["tool"]["setuptools"]["packages"]["find"]
    assert found["where"] == ["src"] and found["include"] == ["act_core*"]
    assert sorted(p.name for p in (REPO / "src").iterdir() if not p.name.endswith(".egg-info")) == [
        "act_core"
    ]
    assert not (REPO / "src" / "act_core" / "demo").exists()
