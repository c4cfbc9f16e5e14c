"""Node logic, names and workflow files, checked WITHOUT ComfyUI (the V3 schemas need it: test_comfy_schema.py).

The node pack is imported the way ComfyUI imports it: the repository root's ``__init__.py`` as a package
under a name that is not a top-level module name, with relative imports inside.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
EXPECTED_NODES = {
    "ACTFitMap": "Fit ACT map (transport slider)",
    "ACTApply": "Apply ACT (steer, slider)",
    "ACTSaveMap": "Save ACT map",
    "ACTLoadMap": "Load ACT map",
    "ACTExportLoRA": "Export ACT as LoRA",
    "ACTSweep": "ACT lambda sweep (slider preview)",
    "ACTFoldMap": "Fold ACT map (slider into a LoRA)",
    "ACTDemoModel": "ACT demo model",
}


def load_pack(name: str):
    """Import the repo root as package ``name`` (ComfyUI uses the folder path with '.' -> '_x_')."""
    spec = importlib.util.spec_from_file_location(
        name, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        raise
    return module


@pytest.fixture(scope="module")
def pack():
    before_path, had_nodes = list(sys.path), sys.modules.get("nodes")
    module = load_pack("_x_work_x_custom_nodes_x_ComfyUI-ACT")
    assert sys.path == before_path, "loading the pack must not change sys.path"
    assert sys.modules.get("nodes") is had_nodes, "the pack must not claim the top-level name 'nodes'"
    return module


# ------------------------------------------------------------------------------------------ the pack
def test_pack_imports_without_comfyui_and_registers_by_v3_entrypoint(pack):
    assert "comfy_api" not in sys.modules or "COMFYUI_PATH" in __import__("os").environ
    assert "folder_paths" not in sys.modules or "COMFYUI_PATH" in __import__("os").environ
    assert pack.NODE_IDS == EXPECTED_NODES
    assert callable(pack.comfy_entrypoint)
    # ComfyUI prefers NODE_CLASS_MAPPINGS over comfy_entrypoint: the pack must define only the V3 one
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")


def test_pack_says_how_to_install_act_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "act_core", None)  # as if neither installed nor in src/
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(
        ImportError, match=r"pip install -r ComfyUI/custom_nodes/ComfyUI-ACT/requirements.txt"
    ):
        load_pack("comfyui_act_without_core")
    assert "comfyui_act_without_core" not in sys.modules


# ------------------------------------------------------------------------------------------ helpers
def test_prompt_and_lambda_parsing(pack):
    from act_core import validation
    from act_core.errors import ACTInputError
    from act_core.families.sdxl import PRESETS

    common = importlib.import_module(pack.__name__ + ".nodes.common")
    assert validation.parse_prompt_lines("  a cat \n\n\t\n a dog\n", "source") == ["a cat", "a dog"]
    with pytest.raises(ACTInputError, match="source_prompts"):
        validation.parse_prompt_lines("just one", "source")
    with pytest.raises(ACTInputError, match="Unbalanced"):
        validation.check_balance(["a"] * 10, ["b"] * 2)
    validation.check_balance(["a"] * 8, ["b"] * 2)
    assert validation.parse_lambdas("0, 0.25,0.5 ; 1\n-1") == [0.0, 0.25, 0.5, 1.0, -1.0]
    for bad in ("", "0, x", "nan", "1e38"):
        with pytest.raises(ACTInputError):
            validation.parse_lambdas(bad)
    assert common.parse_parts("", PRESETS["text_encoder_norms"]) == ("text_encoder", "text_encoder_2")
    assert common.parse_parts(" text_encoder_2 ", PRESETS["text_encoder_norms"]) == ("text_encoder_2",)
    with pytest.raises(ACTInputError, match="not unet"):
        common.parse_parts("unet", PRESETS["text_encoder_norms"])
    with pytest.raises(ACTInputError):
        validation.check_window(0.6, 0.4)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("watercolor", "watercolor.safetensors"),
        ("styles/watercolor.safetensors", "styles/watercolor.safetensors"),
        ("styles\\anime v2", "styles/anime v2.safetensors"),
        ("  x.SAFETENSORS ", "x.safetensors"),
    ],
)
def test_clean_names(pack, name, expected):
    folders = importlib.import_module(pack.__name__ + ".nodes.folders")
    assert folders.clean_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "..",
        "../x",
        "a/../../x",
        "/etc/passwd",
        "C:\\x",
        "c:x",
        "a//b",
        ".hidden",
        "a/./b",
        "x.ckpt",
        "m.pt",
        "a\0b",
        "a|b",
        "x" * 300,
    ],
)
def test_clean_names_refuses(pack, name):
    from act_core.errors import ACTInputError

    folders = importlib.import_module(pack.__name__ + ".nodes.folders")
    with pytest.raises(ACTInputError):
        folders.clean_name(name)


def test_target_path_stays_inside(pack, tmp_path):
    from act_core.errors import ACTInputError

    folders = importlib.import_module(pack.__name__ + ".nodes.folders")
    relative, path = folders.target_path(tmp_path, "sub/map")
    assert relative == "sub/map.safetensors" and path == tmp_path.resolve() / "sub" / "map.safetensors"
    (tmp_path / "link").symlink_to("/tmp")
    with pytest.raises(ACTInputError, match="outside"):
        folders.target_path(tmp_path, "link/x")


def test_comfy_name_tables():
    import torch

    from act_core.errors import ACTInputError
    from act_core.families.sdxl import comfy_clip_modules, comfy_unet_key, unet_module_table

    keys = {
        "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
        "down_blocks.0.resnets.0.norm1.bias": "input_blocks.1.0.in_layers.0.bias",
        "conv_norm_out.weight": "out.0.weight",
        "add_embedding.linear_1.weight": "label_emb.0.0.weight",
        "class_embedding.linear_1.weight": "label_emb.0.0.weight",
    }
    table = unet_module_table(keys)
    assert table["down_blocks.0.resnets.0.norm1"] == "input_blocks.1.0.in_layers.0"
    assert comfy_unet_key("unet.conv_norm_out", table) == "diffusion_model.out.0"
    assert table["add_embedding.linear_1"] == table["class_embedding.linear_1"] == "label_emb.0.0"
    with pytest.raises(ACTInputError, match="not a UNet model"):
        unet_module_table({})

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Module()
            self.transformer.text_model = torch.nn.Module()
            self.transformer.text_model.final_layer_norm = torch.nn.LayerNorm(4)
            self.transformer.text_projection = torch.nn.Linear(4, 4)

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip_l, self.clip_g = Encoder(), Encoder()

    assert set(comfy_clip_modules(Cond())) == {
        "text_encoder.text_model.final_layer_norm",
        "text_encoder_2.text_model.final_layer_norm",
    }  # only text_model.* modules have canonical names (text_projection is not hooked)


# ------------------------------------------------------------------------------------------ workflows
TEMPLATE_TITLES = {
    "ACT style slider, fit and apply (SDXL)",
    "ACT style slider, fit and apply (FLUX.1 schnell)",
    "ACT lambda sweep of a saved map (SDXL)",
    "ACT concept negation (SDXL)",
    "ACT slider as a LoRA, fit and export (SDXL)",
}


def test_workflow_files_exist():
    names = {p.stem for p in WORKFLOWS}
    assert names >= TEMPLATE_TITLES
    assert not (REPO / "example_workflows").exists(), (
        "templates live in workflows/ (the first folder ComfyUI serves)"
    )
    for other in ("example", "examples", "workflow"):
        assert not (REPO / other).exists()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_templates_have_human_titles(path):
    """ComfyUI's frontend (1.27.10) shows a custom node's template under its file name, and its description as
    that name with '-' and '_' made spaces: the file name is the title. A readable one, with a thumbnail."""
    title = path.stem
    assert title.startswith("ACT ") and "_" not in title and "-" not in title, title
    assert title.endswith(")") and 10 <= len(title) <= 60, title
    assert not set(title) & set('#?%&+:"<>|*\\'), f"{title!r}: a character URLs or file systems mangle"
    assert path.with_suffix(".jpg").is_file(), f"{title}: no thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_valid_ui_format(pack, path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert len(links) == len(workflow["links"])
    assert not links or workflow["last_link_id"] >= max(links)
    for link_id, origin_id, origin_slot, target_id, target_slot, link_type in workflow["links"]:
        origin, target = nodes[origin_id], nodes[target_id]
        output = origin["outputs"][origin_slot]
        assert link_id in output["links"]
        assert output["type"] == link_type or "*" in (output["type"], link_type)
        entry = target["inputs"][target_slot]
        assert entry["link"] == link_id
        assert entry["type"] in (link_type, "*") or link_type == "*"
    for node in nodes.values():
        for slot in node.get("inputs", []):
            assert slot["link"] is None or slot["link"] in links
        for slot in node.get("outputs", []):
            assert all(link in links and links[link][1] == node["id"] for link in slot.get("links") or [])

    for node in nodes.values():
        if node["type"].startswith("ACT"):
            assert node["type"] in EXPECTED_NODES, f"{path.name}: unknown ACT node {node['type']}"


def test_workflow_prompts_are_balanced(pack):
    """The Fit nodes in the templates have enough, balanced prompt lines."""
    from act_core import validation

    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "ACTFitMap":
                source = validation.parse_prompt_lines(node["widgets_values"][0], "source")
                target = validation.parse_prompt_lines(node["widgets_values"][1], "target")
                validation.check_balance(source, target)
                assert len(source) >= 8


def test_the_default_preset_option_is_each_familys_own_default(pack):
    """The Fit node's "default" preset works on SDXL and FLUX MODELs alike; a wrong family's preset is named."""
    from act_core.errors import ACTInputError
    from act_core.families import FLUX, SDXL

    fitting = importlib.import_module(pack.__name__ + ".nodes.fitting")
    common = importlib.import_module(pack.__name__ + ".nodes.common")
    assert common.DEFAULT_PRESET == "default" == common.PRESET_NAMES[0]
    assert fitting.family_preset(SDXL, "default").name == SDXL.default_preset == "unet_norms"
    assert fitting.family_preset(FLUX, "default").name == FLUX.default_preset == "pooled_text_and_blocks"
    with pytest.raises(ACTInputError, match="it is for SDXL models.*default pooled_text_and_blocks"):
        fitting.family_preset(FLUX, "unet_norms")


# ------------------------------------------------------------------------------------------ install docs
REGISTRY_WORDS = (
    "comfy node install",
    "ComfyUI-Manager",
    "Comfy Registry",
    "comfy-cli",
    "Custom Nodes Manager",
)


def _comfyui_section(readme: str) -> str:
    start = readme.index("\n## ComfyUI\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end > 0 else None]


def test_install_docs_do_not_promise_the_registry():
    """The pack is not in the Comfy Registry: no document tells users to install it from there, except in a
    sentence that says it is not published yet (docs/dev/publishing.md has the maintainers' steps)."""
    readme = (REPO / "README.md").read_text()
    assert "comfy node install" not in readme
    for name, text in (
        ("README.md", _comfyui_section(readme)),
        ("docs/comfyui.md", (REPO / "docs" / "comfyui.md").read_text()),
    ):
        for sentence in re.split(r"(?<=[.;])\s+", text):
            if any(word in sentence for word in REGISTRY_WORDS):
                assert "not in the Comfy Registry yet" in sentence or "once it is published" in sentence, (
                    f"{name}: {sentence!r}"
                )


def test_the_documented_clone_install_is_the_one_the_pack_expects():
    """README and docs/comfyui.md say: clone into ComfyUI/custom_nodes/ComfyUI-ACT, pip install -r
    requirements.txt with ComfyUI's Python; that is the folder the pack's own hint names, and the pack imports
    from a plain clone the way ComfyUI imports a custom node (test_pack_imports_without_comfyui_...)."""
    section = _comfyui_section((REPO / "README.md").read_text())
    docs = (REPO / "docs" / "comfyui.md").read_text()
    assert "git clone" in section and "custom_nodes" in section and "ComfyUI-ACT" in section
    assert "pip install -r ComfyUI-ACT/requirements.txt" in section
    assert "git clone <url of this repository> ComfyUI/custom_nodes/ComfyUI-ACT" in docs
    assert "pip install -r ComfyUI/custom_nodes/ComfyUI-ACT/requirements.txt" in docs
    assert "ComfyUI/custom_nodes/ComfyUI-ACT/requirements.txt" in (REPO / "__init__.py").read_text()
    assert (REPO / "requirements.txt").is_file() and (REPO / "src" / "act_core" / "__init__.py").is_file()


def test_registry_metadata_is_ready_and_publishing_is_documented():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = pyproject["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=0.3.64"
    guide = (REPO / "docs" / "dev" / "publishing.md").read_text()
    for needed in (
        "comfy node publish",
        "Comfy-Org/publish-node-action",
        "REGISTRY_ACCESS_TOKEN",
        f"`{comfy['PublisherId']}`",
        f"`{pyproject['project']['name']}`",
        "not published",
    ):
        assert needed in guide, needed


def test_prompt_conditionings_stretch_exactly_when_cheap_and_boundedly_otherwise(pack):
    """CLIP prompts (equal chunks) or a few lengths: exact repetition to their least common multiple; the
    lengths of a real T5/Qwen prompt list (lcm 371,280 for 8 prompts): cyclic, to the longest prompt."""
    import torch

    conditioning = importlib.import_module(pack.__name__ + ".nodes.conditioning")
    assert conditioning.common_length([77, 77, 154]) == (154, True)
    assert conditioning.common_length([14, 14, 15, 13, 16, 16, 17, 15]) == (17, False)
    cond = torch.arange(3.0).reshape(1, 3, 1)
    assert conditioning.stretch(cond, 6).flatten().tolist() == [0, 1, 2, 0, 1, 2]
    assert conditioning.stretch(cond, 5).flatten().tolist() == [0, 1, 2, 0, 1]
    stacked = conditioning.stack_conds([(torch.zeros(1, 13, 4), None), (torch.ones(1, 17, 4), None)])
    assert stacked[0][0].shape == (2, 17, 4) and stacked[0][1]["pooled_output"] is None
