"""What an artist meets in the ComfyUI frontend (issue 20), pinned at the schema level: sliders that snap,
short plain tooltips, inputs that only matter for other choices marked advanced, search words, templates
that declare their model files. Needs ComfyUI's comfy_api (skipped without COMFYUI_PATH)."""

import math

import comfy_support as cs  # noqa: E402
import pytest
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui


@pytest.fixture(scope="module")
def classes(comfyui):  # noqa: F811
    return cs.node_classes(cs.load_node_pack())


def _inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}


def frontend_float_value(value: float, options: dict) -> float:
    """What frontend 1.27.10 stores for a FLOAT widget set to ``value`` (onFloatValueChange): with ``round``
    every change (click, drag, typed) is rounded to a multiple of it and clamped to [min, max]."""
    step = options["round"]
    precision = max(0, -math.floor(math.log10(step)))
    rounded = round(math.floor(value / step + 0.5) * step, precision)  # JavaScript's Math.round
    return min(max(rounded, options["min"]), options["max"])


# ------------------------------------------------------------------------------- 1. sliders that snap
STRENGTH_INPUTS = {"ACTApply": ("strength", "text_encoder_strength")}


@pytest.mark.parametrize("node_id, name", [(n, i) for n, names in STRENGTH_INPUTS.items() for i in names])
def test_strength_sliders_snap_to_0_05(classes, node_id, name):
    """Clicks that gave -0.01, 0.04 and 0.92 in the browser land on 0, 0.05 and 0.9; 0 and 1 are on the grid."""
    kind, options = _inputs(classes[node_id])[name]
    assert kind == "FLOAT" and options["display"] == "slider"
    assert options["step"] == options["round"] == 0.05
    assert (options["min"], options["default"], options["max"]) == (-2.0, 1.0, 2.0)
    clicks = {-0.01: 0.0, 0.04: 0.05, 0.92: 0.9, 0.024: 0.0, -1.97: -1.95, 2.3: 2.0}
    assert {click: frontend_float_value(click, options) for click in clicks} == clicks


def test_every_lambda_like_float_snaps(classes):
    """Every slider of the pack snaps (a slider without ``round`` lands on the pixel's value)."""
    sliders = {
        (node_id, name)
        for node_id, cls in classes.items()
        for name, (kind, options) in _inputs(cls).items()
        if kind == "FLOAT" and options.get("display") == "slider"
    }
    assert {(n, i) for n, names in STRENGTH_INPUTS.items() for i in names} <= sliders
    for node_id, name in sliders:
        options = _inputs(classes[node_id])[name][1]
        assert options.get("round") == options.get("step"), f"{node_id}.{name}"


# ------------------------------------------------------------------------------- 2. short, plain tooltips
MAX_TOOLTIP = 300  # characters: what a hover box shows without scrolling (the preset tooltip was 1,946)
MAX_DESCRIPTION = 600  # the node's description, shown when hovering its title
JARGON = ("cond rows", "cond row", "exact causal", "CFG row", "uncond", "trajectory protocol", "canonical")


def _texts(cls) -> dict[str, str]:
    """Every hover text of a node: input tooltips, output tooltips and the description."""
    texts = {f"input {name}": options.get("tooltip", "") for name, (_, options) in _inputs(cls).items()}
    texts.update(
        {f"output {name}": tip for name, tip in zip(cls.RETURN_NAMES, cls.OUTPUT_TOOLTIPS, strict=True)}
    )
    texts["description"] = cls.GET_SCHEMA().description
    return texts


def test_tooltips_are_short_and_plain(classes):
    problems = []
    for node_id, cls in classes.items():
        for where, text in _texts(cls).items():
            limit = MAX_DESCRIPTION if where == "description" else MAX_TOOLTIP
            found = [word for word in JARGON if word.lower() in text.lower()]
            for broken, why in (
                (not text or len(text) > limit, f"{len(text)} characters (at most {limit})"),
                (".." in text, "doubled punctuation"),
                ("docs/" in text or ".md" in text, "a docs path"),
                (bool(found), f"jargon {found}"),
                (bool(text) and text[-1] not in ".)?!", "not a sentence"),
            ):
                if broken:
                    problems.append(f"{node_id} {where}: {why}: {text!r}")
    assert not problems, "\n".join(problems)


def test_the_preset_tooltip_says_leave_default(classes):
    """Short whatever the number of families (each family's presets are in docs/comfyui.md)."""
    tooltip = _inputs(classes["ACTFitMap"])["preset"][1]["tooltip"]
    assert "Leave 'default'" in tooltip and "unet_norms" not in tooltip
    assert _inputs(classes["ACTFitMap"])["preset"][1]["options"][0] == "default"


# ------------------------------------------------------------------------------- 5. fit warnings reach the UI
FIT_ARGS = {
    "preset": "text_encoder_norms",  # no UNet pass: a real fit in seconds
    "parts": "",
    "method": "linear",
    "support": "auto",
    "mode": "preset",
    "fit_seed": 0,
    "width": 128,
    "height": 128,
    "steps": 2,
    "batch_size": 4,
}
THINGS = ("cat", "dog", "house", "tree")


@pytest.fixture(scope="module")
def tiny(comfyui):  # noqa: F811
    return cs.build_tiny_sdxl(seed=0)


def _fit(classes, tiny, source, target):
    import torch

    model, clip = tiny
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return cs.NodeCaller(classes["ACTFitMap"])(model, clip, source, target, **FIT_ARGS)


def test_fit_warnings_reach_the_summary_and_the_node(classes, tiny, caplog):
    """The tokenizer does not know 'zxqv': the warning is in the summary output (Preview Any shows it), in the
    node's UI message, and still in the server log."""
    from act_core.errors import ACTWarning

    source = "\n".join(f"a photo of a zxqv {thing}" for thing in THINGS)
    target = "\n".join(f"a watercolor painting of a zxqv {thing}" for thing in THINGS)
    with pytest.warns(ACTWarning, match="zxqv"):
        out = _fit(classes, tiny, source, target)
    act_map, summary = out["result"]
    assert summary.startswith(act_map.summary()) and "\n\nWarnings:\n- " in summary
    (message,) = out["ui"]["text"]
    assert "zxqv" in message and f"- {message}" in summary
    assert summary.count("zxqv") == 1
    assert any("zxqv" in record.getMessage() for record in caplog.records)


def test_a_fit_without_warnings_has_a_plain_summary(classes, tiny):
    source = "\n".join(f"a photo of a {thing}" for thing in THINGS)
    target = "\n".join(f"a watercolor painting of a {thing}" for thing in THINGS)
    act_map, summary = _fit(classes, tiny, source, target)
    assert summary == act_map.summary() and "Warnings" not in summary


def test_collected_warnings_keep_only_acts_and_show_all_in_the_log(classes, recwarn):
    import warnings

    from act_core.errors import ACTWarning

    act_nodes = __import__(classes["ACTFitMap"].__module__, fromlist=["collected_warnings"])
    with act_nodes.collected_warnings() as messages:
        for _ in range(3):
            warnings.warn("an ACT warning", ACTWarning, stacklevel=1)
            warnings.warn_explicit("torch says something", UserWarning, "/elsewhere/torch/x.py", 1)
    assert messages == ["an ACT warning"]
    assert sorted(str(w.message) for w in recwarn) == ["an ACT warning", "torch says something"]
    with pytest.raises(RuntimeError), act_nodes.collected_warnings() as messages:
        warnings.warn("before an interruption", ACTWarning, stacklevel=1)
        raise RuntimeError("interrupted")
    assert messages == ["before an interruption"]
    assert "before an interruption" in [str(w.message) for w in recwarn]


# ------------------------------------------------------------------------------- 6. widgets that do nothing
ADVANCED = {
    "ACTFitMap": {
        "parts",
        "method",
        "support",
        "mode",
        "batch_size",
        "causal_strategy",
        "max_pairs_per_call",
    },
    "ACTApply": {"separate_text_encoder_strength", "text_encoder_strength", "start_percent", "end_percent"},
    "ACTSweep": {"denoise", "start_percent", "end_percent"},
    "ACTExportLoRA": {"dtype"},
    "ACTFoldMap": set(),
}
# The widgets in the order saved workflows hold their values (widgets_values is positional: required inputs,
# then optional ones). Marking inputs advanced or optional must not change it.
SAVED_WIDGET_ORDER = {
    "ACTFitMap": [
        "source_prompts",
        "target_prompts",
        "preset",
        "parts",
        "method",
        "support",
        "mode",
        "fit_seed",
        "width",
        "height",
        "steps",
        "batch_size",
        "causal_strategy",
        "cfg",
        "sampler_name",
        "scheduler",
        "negative_prompt",
        "less_prompts",  # added last (two-sided sliders): older workflows simply lack its value
        "max_pairs_per_call",  # then this (fitting at any memory budget), likewise
    ],
    "ACTApply": [
        "strength",
        "separate_text_encoder_strength",
        "text_encoder_strength",
        "start_percent",
        "end_percent",
    ],
    "ACTSweep": [
        "positive",
        "negative",
        "lambdas",
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
        "start_percent",
        "end_percent",
    ],
    "ACTExportLoRA": ["filename", "dtype", "overwrite"],
    "ACTFoldMap": [
        "source_prompts",
        "fold_seed",
        "width",
        "height",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "negative_prompt",
        "fold_steps",
    ],
    "ACTSaveMap": ["filename", "overwrite"],
    "ACTLoadMap": ["act_map_name"],
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_order(cls) -> list[str]:
    """The frontend's widget order: the node's input_order, required then optional, widgets only."""
    info = cls.GET_NODE_INFO_V1()
    spec = {**info["input"]["required"], **info["input"].get("optional", {})}
    ordered = info["input_order"]["required"] + info["input_order"].get("optional", [])
    return [name for name in ordered if isinstance(spec[name][0], list) or spec[name][0] in WIDGET_TYPES]


@pytest.mark.parametrize("node_id", sorted(SAVED_WIDGET_ORDER))
def test_saved_workflows_still_line_up(classes, node_id):
    assert widget_order(classes[node_id]) == SAVED_WIDGET_ORDER[node_id]


@pytest.mark.parametrize("node_id", sorted(ADVANCED))
def test_inputs_for_other_choices_are_advanced(classes, node_id):
    """Only the inputs that matter for a non-default choice are marked advanced (frontends that know the flag
    hide them behind "Show Advanced"); every one of them has a default, so a prompt may leave it out."""
    inputs = _inputs(classes[node_id])
    marked = {name for name, (_, options) in inputs.items() if options.get("advanced")}
    assert marked == ADVANCED[node_id]
    optional = classes[node_id].INPUT_TYPES().get("optional", {})
    for name in marked:
        assert name in optional or "default" in inputs[name][1], f"{node_id}.{name}"


def test_fit_inputs_for_first_step_presets_are_optional(classes):
    optional = classes["ACTFitMap"].INPUT_TYPES()["optional"]
    assert {"batch_size", "causal_strategy"} <= set(optional)
    for name in ("batch_size", "causal_strategy"):
        assert "first-step presets" in optional[name][1]["tooltip"]


def test_the_text_encoder_toggle_says_what_it_does(classes):
    options = _inputs(classes["ACTApply"])["separate_text_encoder_strength"][1]
    assert (options["label_off"], options["label_on"]) == ("same as strength", "own strength below")
    assert "Used only when" in _inputs(classes["ACTApply"])["text_encoder_strength"][1]["tooltip"]


# ------------------------------------------------------------------------------- 7. search, progress, new maps
# The frontend's node search (1.27.10, services/nodeSearchService.ts) runs Fuse.js over the node id and the
# display name only, threshold 0.3, default location 0 and distance 100: an exact word scores (its index) / 100,
# so it is found only when it starts within the first 30 characters. There are no search aliases in 0.3.64.
SEARCHES = {
    "slider": {"ACTFitMap", "ACTApply", "ACTSweep"},
    "steer": {"ACTApply"},
    "transport": {"ACTFitMap"},
    "lambda": {"ACTSweep"},
    "lora": {"ACTExportLoRA"},
    "fold": {"ACTFoldMap"},
}


def found_by(query: str, classes) -> set[str]:
    """The nodes the frontend's search lists for ``query`` (an exact word near the start of a searched key)."""
    hits = set()
    for node_id, cls in classes.items():
        for key in (node_id, cls.GET_SCHEMA().display_name):
            index = key.lower().find(query.lower())
            if (
                index >= 0 and index / 100 <= 0.25
            ):  # Fuse's score for an exact match; 0.3 is the cut, with a margin
                hits.add(node_id)
    return hits


@pytest.mark.parametrize("query", sorted(SEARCHES))
def test_search_finds_the_nodes(classes, query):
    assert SEARCHES[query] <= found_by(query, classes)


def test_display_names_keep_their_old_start(classes):
    """Old names still find the nodes (and read first on the canvas): the search words come after them."""
    old = {"ACTFitMap": "Fit ACT map", "ACTApply": "Apply ACT", "ACTSweep": "ACT lambda sweep"}
    for node_id, name in old.items():
        assert classes[node_id].GET_SCHEMA().display_name.startswith(name)


def test_the_sweep_shows_one_progress_bar_and_lambda_k_of_n(classes, tiny, monkeypatch):
    """One bar over lambdas x steps (it used to restart for every lambda) and 'lambda k of n' on the node."""
    import comfy.utils
    import torch

    model, clip = tiny
    source = "\n".join(f"a photo of a {thing}" for thing in THINGS)
    target = "\n".join(f"a watercolor painting of a {thing}" for thing in THINGS)
    act_map, _ = _fit(classes, tiny, source, target)
    bars, texts = [], []
    monkeypatch.setattr(
        comfy.utils,
        "PROGRESS_BAR_HOOK",
        lambda value, total, preview, node_id=None: bars.append((value, total)),
    )
    act_nodes = __import__(classes["ACTSweep"].__module__, fromlist=["show_on_node"])
    monkeypatch.setattr(act_nodes, "show_on_node", lambda node_id, text: texts.append((node_id, text)))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    with torch.inference_mode():
        out, labels = cs.NodeCaller(classes["ACTSweep"])(
            model, clip, act_map, latent, "a cat", "", "0, 0.5, 1", 0, 2, 5.0, "euler", "normal", 1.0
        )
    assert labels == "0, 0.5, 1" and out["samples"].shape[0] == 3
    assert bars == [(value, 6) for value in range(1, 7)]
    assert texts == [
        ("act-test", "lambda 1 of 3 (0)"),
        ("act-test", "lambda 2 of 3 (0.5)"),
        ("act-test", "lambda 3 of 3 (1)"),
    ]


@pytest.fixture()
def act_maps_folder(tmp_path, monkeypatch):
    import folder_paths

    folder = tmp_path / "act_maps"
    folder.mkdir()
    table = dict(folder_paths.folder_names_and_paths)
    table["act_maps"] = ([str(folder)], {".safetensors"})
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", table)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def test_a_saved_map_is_listed_on_the_next_refresh(classes, tiny, act_maps_folder):
    """The Load node's list is made again on every schema request: a map saved while ComfyUI runs appears when
    the frontend refreshes the node definitions (R), with no restart or page reload."""
    source = "\n".join(f"a photo of a {thing}" for thing in THINGS)
    target = "\n".join(f"a watercolor painting of a {thing}" for thing in THINGS)
    act_map, _ = _fit(classes, tiny, source, target)
    load = classes["ACTLoadMap"]
    assert "fresh_map.safetensors" not in load.INPUT_TYPES()["required"]["act_map_name"][1]["options"]
    cs.NodeCaller(classes["ACTSaveMap"])(act_map, "fresh_map", False)
    assert "fresh_map.safetensors" in load.INPUT_TYPES()["required"]["act_map_name"][1]["options"]
    info = load.GET_NODE_INFO_V1()  # what GET /object_info answers
    assert "fresh_map.safetensors" in info["input"]["required"]["act_map_name"][1]["options"]
    assert "R" in info["input"]["required"]["act_map_name"][1]["tooltip"]


# ------------------------------------------------------------------------------- 4. templates name their models
# Loader nodes and the folder each reads (ComfyUI's folder_paths names: the frontend looks the file up there).
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": "checkpoints",
    "UNETLoader": "diffusion_models",
    "DualCLIPLoader": "text_encoders",
    "VAELoader": "vae",
}
TEMPLATES = sorted((cs.REPO_ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_templates_declare_their_model_files(comfyui, path):  # noqa: F811
    """Each model file a loader names is in its ``properties.models`` (name, url, directory), as ComfyUI's own
    templates declare them: the frontend checks the folder on load and offers the download of a missing
    file, instead of a red loader with no guidance."""
    import json
    import urllib.parse

    import folder_paths

    for node in json.loads(path.read_text())["nodes"]:
        if node["type"] not in LOADER_FOLDERS:
            continue
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        models = node.get("properties", {}).get("models", [])
        # what the frontend reads (getSelectedModelsMetadata): the entries whose name a widget holds
        selected = {model["name"]: model for model in models if model["name"] in files}
        assert set(selected) == set(files), f"{path.name}: {node['type']} does not declare {files}"
        for name, model in selected.items():
            url = urllib.parse.urlparse(model["url"])
            assert url.scheme == "https" and url.netloc == "huggingface.co", model
            assert url.path.endswith(f"/resolve/main/{name}") or url.path.endswith(f"/{name}"), model
            assert model["directory"] == LOADER_FOLDERS[node["type"]] in folder_paths.folder_names_and_paths
