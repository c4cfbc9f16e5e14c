"""The V3 node schemas (need ComfyUI's comfy_api) and the template workflows' widgets against them."""

import inspect
import json
from pathlib import Path

import comfy_support as cs  # noqa: E402
import pytest
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
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


@pytest.fixture(scope="module")
def classes(comfyui):  # noqa: F811
    return cs.node_classes(cs.load_node_pack())


def _choices(kind, options):
    return options.get("options") if kind == "COMBO" else (kind if isinstance(kind, list) else None)


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


def test_every_node_is_listed_with_its_id_and_name(classes):
    assert {node_id: cls.GET_SCHEMA().display_name for node_id, cls in classes.items()} == EXPECTED_NODES


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_contract(classes, node_id):
    cls = classes[node_id]
    schema = cls.GET_SCHEMA()
    assert schema.category == ("ACT/demo" if node_id == "ACTDemoModel" else "ACT")
    assert isinstance(schema.description, str) and len(schema.description) > 40
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(cls.OUTPUT_TOOLTIPS)
    spec = cls.INPUT_TYPES()
    params = inspect.signature(cls.execute).parameters
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            options = entry[1]
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert name in params, f"{node_id}.execute does not take {name}"
            if section == "optional":
                assert params[name].default is not inspect.Parameter.empty
            choices = _choices(entry[0], options)
            if choices and "default" in options:
                assert options["default"] in choices
            if entry[0] in ("INT", "FLOAT") and "default" in options:
                assert options["min"] <= options["default"] <= options["max"]
    required = [n for n, p in params.items() if n != "cls" and p.default is inspect.Parameter.empty]
    assert set(required) <= set(spec["required"])


def test_specific_inputs(classes):
    from act_core.families import FAMILIES
    from act_core.families.flux import PRESETS as FLUX_PRESETS
    from act_core.families.sdxl import PRESETS

    fit = classes["ACTFitMap"].INPUT_TYPES()
    required, optional = fit["required"], fit["optional"]
    assert required["source_prompts"][0] == "STRING" and required["source_prompts"][1]["multiline"] is True
    assert required["target_prompts"][1]["multiline"] is True
    presets = required["preset"][1]["options"]
    # 'default' first, then every preset of every family ComfyUI steers, each once
    assert presets[0] == required["preset"][1]["default"] == "default" and len(set(presets)) == len(presets)
    comfy_presets = {name for f in FAMILIES.values() if "comfyui" in f.hosts for name in f.presets}
    assert set(presets[1:]) == comfy_presets >= {*PRESETS, *FLUX_PRESETS}
    assert required["method"][1]["options"] == ["linear", "mean", "gaussian"]
    assert required["mode"][1]["options"] == ["preset", "causal", "at_once"]
    assert required["support"][1]["options"][:3] == ["auto", "range", "unbounded"]
    assert required["width"][1]["step"] == 8 and required["height"][1]["default"] == 1024
    # the sampler settings the trajectory protocol follows, as KSampler names them
    assert {"cfg", "sampler_name", "scheduler", "negative_prompt"} <= set(optional)
    assert "euler" in optional["sampler_name"][1]["options"]
    assert "seed" not in required, (
        "a 'seed' input gets a randomize-after-run widget: the map would be re-fitted"
    )
    assert classes["ACTFitMap"].RETURN_TYPES == ["ACT_MAP", "STRING"]

    apply = classes["ACTApply"].INPUT_TYPES()
    for options in (apply["required"]["strength"][1], apply["optional"]["text_encoder_strength"][1]):
        assert (options["min"], options["max"], options["step"], options["round"], options["display"]) == (
            -2.0,
            2.0,
            0.05,
            0.05,
            "slider",
        )
    assert apply["optional"]["separate_text_encoder_strength"][0] == "BOOLEAN"
    for name in ("start_percent", "end_percent"):
        assert (apply["optional"][name][1]["min"], apply["optional"][name][1]["max"]) == (0.0, 1.0)
    assert list(apply["required"]) == ["model", "clip", "act_map", "strength"]
    assert classes["ACTApply"].RETURN_TYPES == ["MODEL", "CLIP"] and classes["ACTApply"].RETURN_NAMES == [
        "model",
        "clip",
    ]

    assert classes["ACTSaveMap"].OUTPUT_NODE and classes["ACTExportLoRA"].OUTPUT_NODE
    assert classes["ACTLoadMap"].RETURN_TYPES == ["ACT_MAP", "STRING"]
    dtype = classes["ACTExportLoRA"].INPUT_TYPES()["required"]["dtype"][1]
    assert dtype["options"] == ["fp32", "fp16"] and dtype["default"] == "fp32"
    sweep = classes["ACTSweep"].INPUT_TYPES()["required"]
    assert sweep["latent_image"][0] == "LATENT" and sweep["lambdas"][1]["default"] == "0, 0.25, 0.5, 0.75, 1"
    assert classes["ACTSweep"].RETURN_TYPES == ["LATENT", "STRING"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_widgets_match_the_schemas(classes, path):
    """Every ACT node of a template has one widget value per widget, each valid for its input."""
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        cls = classes.get(node["type"])
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
            choices = _choices(kind, options)
            if choices is not None:
                if choices:  # lists of files are empty here
                    assert value in choices, f"{node['type']}.{name}={value!r}"
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
        sockets = {n: e[0] for n, e in spec.items() if not (isinstance(e[0], list) or e[0] in WIDGET_TYPES)}
        present = {slot["name"]: slot["type"] for slot in node["inputs"] if "widget" not in slot}
        assert present == sockets, f"{path.name}: {node['type']} inputs"
        outputs = [(slot["name"], slot["type"]) for slot in node["outputs"]]
        assert outputs == list(zip(cls.RETURN_NAMES, cls.RETURN_TYPES, strict=True))


# Widget values of the core nodes beside the Fit node (seed widgets are followed by their control value).
CORE_WIDGETS = {
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
}
SHARED_WITH_SAMPLER = ("steps", "cfg", "sampler_name", "scheduler")
SHARED_WITH_LATENT = ("width", "height")


def widget_names(classes, node):
    if node["type"] in CORE_WIDGETS:
        return CORE_WIDGETS[node["type"]]
    names = []
    for name, _kind, _options, width in widget_inputs(classes[node["type"]]):
        names += [name] + [None] * (width - 1)
    return names


def setting(classes, workflow, node, name):
    """(the Primitive node feeding widget ``name`` of ``node`` or None, the value the node gets)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    own = dict(zip(widget_names(classes, node), node["widgets_values"], strict=True))[name]
    slot = next((s for s in node["inputs"] if s["name"] == name and s.get("link") is not None), None)
    if slot is None:
        return None, own
    origin = nodes[links[slot["link"]][1]]
    assert origin["type"] == "PrimitiveNode", f"{node['type']}.{name} is fed by {origin['type']}"
    value = origin["widgets_values"][0]
    assert own == value, f"{node['type']}.{name}: widget {own!r}, Primitive {value!r} (saved out of step)"
    return origin["id"], value


def _fit_partners(workflow):
    nodes = workflow["nodes"]
    sampler = next(n for n in nodes if n["type"] in ("KSampler", "ACTSweep"))
    latent = next(n for n in nodes if n["type"] in ("EmptyLatentImage", "EmptySD3LatentImage"))
    return [n for n in nodes if n["type"] == "ACTFitMap"], sampler, latent


FIT_TEMPLATES = [p for p in WORKFLOWS if '"ACTFitMap"' in p.read_text()]


@pytest.mark.parametrize("path", FIT_TEMPLATES, ids=[p.stem for p in FIT_TEMPLATES])
def test_fit_in_templates_gets_the_samplers_values(classes, path):
    """Each template fits with the steps / cfg / sampler / scheduler its sampler uses, at its latent's size."""
    workflow = json.loads(path.read_text())
    fits, sampler, latent = _fit_partners(workflow)
    for fit in fits:
        for partner, names in ((sampler, SHARED_WITH_SAMPLER), (latent, SHARED_WITH_LATENT)):
            for name in names:
                _, fit_value = setting(classes, workflow, fit, name)
                _, value = setting(classes, workflow, partner, name)
                assert fit_value == value, (
                    f"{path.name}: Fit {name}={fit_value!r}, {partner['type']} {value!r}"
                )


@pytest.mark.parametrize("path", FIT_TEMPLATES, ids=[p.stem for p in FIT_TEMPLATES])
def test_sampler_settings_have_one_source(classes, path):
    """No setting to keep equal by hand: the Fit node and its sampler (and latent) read one Primitive each."""
    workflow = json.loads(path.read_text())
    fits, sampler, latent = _fit_partners(workflow)
    for fit in fits:
        for partner, names in ((sampler, SHARED_WITH_SAMPLER), (latent, SHARED_WITH_LATENT)):
            for name in names:
                source, _ = setting(classes, workflow, fit, name)
                assert source is not None, (
                    f"{path.name}: the Fit node's {name} is not fed by a Primitive node"
                )
                assert setting(classes, workflow, partner, name)[0] == source, (
                    f"{path.name}: {partner['type']}.{name} and the Fit node's are fed by different nodes"
                )
