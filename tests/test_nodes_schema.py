"""Node schemas and workflow files, checked WITHOUT ComfyUI (runs in CI in the project venv).

The node pack is imported the way ComfyUI imports it: the repository root's ``__init__.py`` as a package
under a name that is not a top-level module name, with relative imports inside.
"""

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
EXPECTED_NODES = {
    "ACTFitMap": "Fit ACT map",
    "ACTApply": "Apply ACT",
    "ACTSaveMap": "Save ACT map",
    "ACTLoadMap": "Load ACT map",
    "ACTExportLoRA": "Export ACT as LoRA",
    "ACTSweep": "ACT lambda sweep",
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


def widget_inputs(node_cls):
    """(name, type, options, widgets_values slots) in the front end's order: required, then optional."""
    out = []
    spec = node_cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if options.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
                continue
            extra = (
                1
                if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed"))
                else 0
            )
            out.append((name, kind, options, 1 + extra))
    return out


# ------------------------------------------------------------------------------------------ the pack
def test_pack_imports_without_comfyui_and_registers_all_nodes(pack):
    assert "comfy" not in sys.modules or "COMFYUI_PATH" in __import__("os").environ
    assert "folder_paths" not in sys.modules or "COMFYUI_PATH" in __import__("os").environ
    assert set(pack.NODE_CLASS_MAPPINGS) == set(EXPECTED_NODES)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == EXPECTED_NODES
    # relative imports: the node modules live under the pack's own name
    assert pack.NODE_CLASS_MAPPINGS["ACTApply"].__module__.startswith(pack.__name__ + ".nodes")


def test_pack_says_how_to_install_act_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "act_core", None)  # as if the pip install was skipped
    with pytest.raises(ImportError, match=r"pip install -e ComfyUI/custom_nodes/ComfyUI-ACT"):
        load_pack("comfyui_act_without_core")
    assert "comfyui_act_without_core" not in sys.modules


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_contract(pack, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY == "ACT"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    method = getattr(cls, cls.FUNCTION)
    params = inspect.signature(method).parameters
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2
            options = entry[1]
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
            if section == "optional":
                assert params[name].default is not inspect.Parameter.empty
            kind = entry[0]
            if isinstance(kind, list) and "default" in options:
                assert options["default"] in kind
            if kind in ("INT", "FLOAT") and "default" in options:
                assert options["min"] <= options["default"] <= options["max"]
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty]
    assert set(required) <= set(spec["required"])


def test_specific_inputs(pack):
    nodes = pack.NODE_CLASS_MAPPINGS
    fit = nodes["ACTFitMap"].INPUT_TYPES()["required"]
    assert fit["source_prompts"][0] == "STRING" and fit["source_prompts"][1]["multiline"] is True
    assert fit["target_prompts"][1]["multiline"] is True
    from act_core.presets import PRESETS

    assert fit["preset"][0] == list(PRESETS)
    assert fit["method"][0] == ["linear", "mean", "gaussian"]
    assert fit["mode"][0] == ["preset", "causal", "at_once"]
    assert fit["support"][0][:3] == ["auto", "range", "unbounded"]
    assert fit["width"][1]["step"] == 8 and fit["height"][1]["default"] == 1024
    assert "seed" not in fit, (
        "a 'seed' input gets a randomize-after-run widget: the map would be re-fitted every run"
    )
    assert nodes["ACTFitMap"].RETURN_TYPES == ("ACT_MAP", "STRING")

    apply = nodes["ACTApply"].INPUT_TYPES()
    for name in ("strength",):
        options = apply["required"][name][1]
        assert (options["min"], options["max"], options["step"], options["display"]) == (
            -2.0,
            2.0,
            0.05,
            "slider",
        )
    te = apply["optional"]["text_encoder_strength"][1]
    assert (te["min"], te["max"], te["step"], te["display"]) == (-2.0, 2.0, 0.05, "slider")
    assert apply["optional"]["separate_text_encoder_strength"][0] == "BOOLEAN"
    for name in ("start_percent", "end_percent"):
        options = apply["optional"][name][1]
        assert (options["min"], options["max"]) == (0.0, 1.0)
    assert [k for k in apply["required"]] == ["model", "clip", "act_map", "strength"]
    assert nodes["ACTApply"].RETURN_TYPES == ("MODEL", "CLIP")

    assert nodes["ACTSaveMap"].OUTPUT_NODE and nodes["ACTExportLoRA"].OUTPUT_NODE
    assert (
        nodes["ACTLoadMap"].INPUT_TYPES()["required"]["act_map_name"][0] == []
    )  # no ComfyUI: nothing listed
    assert nodes["ACTLoadMap"].RETURN_TYPES == ("ACT_MAP", "STRING")
    assert nodes["ACTExportLoRA"].INPUT_TYPES()["required"]["dtype"][0] == ["fp16", "fp32"]
    sweep = nodes["ACTSweep"].INPUT_TYPES()["required"]
    assert sweep["latent_image"][0] == "LATENT" and sweep["lambdas"][1]["default"] == "0, 0.25, 0.5, 0.75, 1"
    assert "euler" in sweep["sampler_name"][0] and "normal" in sweep["scheduler"][0]
    assert nodes["ACTSweep"].RETURN_TYPES == ("LATENT", "STRING")


# ------------------------------------------------------------------------------------------ helpers
def test_prompt_and_lambda_parsing(pack):
    from act_core.errors import ACTInputError
    from act_core.presets import PRESETS

    common = importlib.import_module(pack.__name__ + ".nodes.common")
    assert common.parse_prompts("  a cat \n\n\t\n a dog\n", "source") == ["a cat", "a dog"]
    with pytest.raises(ACTInputError, match="source_prompts"):
        common.parse_prompts("just one", "source")
    with pytest.raises(ACTInputError, match="Unbalanced"):
        common.check_balance(["a"] * 10, ["b"] * 2)
    common.check_balance(["a"] * 8, ["b"] * 2)
    assert common.parse_lambdas("0, 0.25,0.5 ; 1\n-1") == [0.0, 0.25, 0.5, 1.0, -1.0]
    for bad in ("", "0, x", "nan"):
        with pytest.raises(ACTInputError):
            common.parse_lambdas(bad)
    assert common.parse_parts("", PRESETS["text_encoder_norms"]) == ("text_encoder", "text_encoder_2")
    assert common.parse_parts(" text_encoder_2 ", PRESETS["text_encoder_norms"]) == ("text_encoder_2",)
    with pytest.raises(ACTInputError, match="not unet"):
        common.parse_parts("unet", PRESETS["text_encoder_norms"])
    with pytest.raises(ACTInputError):
        common.check_window(0.6, 0.4)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("watercolor", "watercolor.safetensors"),
        ("styles/watercolor.safetensors", "styles/watercolor.safetensors"),
        ("styles\\anime v2", "styles/anime v2.safetensors"),
        ("  x.SAFETENSORS ", "x.SAFETENSORS"),
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
    from act_core.comfy_names import comfy_clip_modules, comfy_unet_key, invert_table, unet_module_table

    from act_core.errors import ACTInputError

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
    inverse = invert_table(table)
    assert inverse["out.0"] == "conv_norm_out" and "label_emb.0.0" not in inverse  # ambiguous: left out
    with pytest.raises(ACTInputError, match="DiT"):
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
def test_workflow_files_exist():
    names = {p.stem for p in WORKFLOWS}
    assert {"act_fit_apply_style_slider", "act_load_map_lambda_sweep", "act_concept_negation"} <= names
    assert not (REPO / "example_workflows").exists(), (
        "templates live in workflows/ (the first folder ComfyUI serves)"
    )
    for other in ("example", "examples", "workflow"):
        assert not (REPO / other).exists()


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
        cls = pack.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        widgets = widget_inputs(cls)
        values = node["widgets_values"]
        assert len(values) == sum(width for *_, width in widgets), (
            f"{path.name}: node {node['id']} ({node['type']})"
        )
        spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        position = 0
        for name, kind, options, width in widgets:
            value = values[position]
            position += width
            if isinstance(kind, list):
                if kind:  # lists of files are empty without ComfyUI
                    assert value in kind, f"{node['type']}.{name}={value!r}"
                else:
                    assert isinstance(value, str) and value.endswith(".safetensors")
            elif kind == "BOOLEAN":
                assert isinstance(value, bool)
            elif kind == "STRING":
                assert isinstance(value, str)
            else:
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
                assert options.get("min", value) <= value <= options.get("max", value), (
                    f"{node['type']}.{name}"
                )
                if kind == "INT":
                    assert value == int(value)
        # every socket (non-widget) input of the node is present, with its type
        sockets = {n: e[0] for n, e in spec.items() if not (isinstance(e[0], list) or e[0] in WIDGET_TYPES)}
        present = {slot["name"]: slot["type"] for slot in node["inputs"] if "widget" not in slot}
        assert present == sockets, f"{path.name}: {node['type']} inputs"
        outputs = [(slot["name"], slot["type"]) for slot in node["outputs"]]
        assert outputs == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True))


def test_workflow_prompts_are_balanced(pack):
    """The Fit nodes in the templates have enough, balanced prompt lines."""
    common = importlib.import_module(pack.__name__ + ".nodes.common")
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "ACTFitMap":
                source = common.parse_prompts(node["widgets_values"][0], "source")
                target = common.parse_prompts(node["widgets_values"][1], "target")
                common.check_balance(source, target)
                assert len(source) >= 8
