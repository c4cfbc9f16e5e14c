"""The pack in ComfyUI's real frontend, in headless Chromium (selenium + Debian's chromedriver).

What an artist meets: the ACT nodes in the node library, every template loading with no missing node and no
invalid widget value, the demo template running from the Run button and showing its images, and the Apply
ACT strength slider. Skipped without COMFYUI_PATH, selenium, Chromium or chromedriver (the reason says which;
``bash scripts/setup_browser.sh`` installs the browser where apt-get works).

``ACT_WRITE_SCREENSHOTS=1`` also writes the pictures the docs and the template browser show: each template
in the canvas (docs/images/comfyui_*.png), the templates' thumbnails (workflows/*.jpg), the node library
(docs/images/comfyui_act_nodes.png) and the template browser (docs/images/comfyui_templates.png).
"""

from __future__ import annotations

import json
import os
import re
import time
from io import BytesIO
from pathlib import Path

import comfy_browser
import comfy_support as cs  # noqa: E402
import pytest
from comfy_server import PACK_LINK_NAME, comfy_server, ui_to_api  # noqa: E402,F401
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui  # about 30 s here (server start, the demo run): not marked slow

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
DEMO = "ACT style slider on the tiny demo model (no download)"
STYLE_SLIDER = "ACT style slider, fit and apply (SDXL)"
IMAGES = REPO / "docs" / "images"
WRITE_SCREENSHOTS = os.environ.get("ACT_WRITE_SCREENSHOTS", "") == "1"
# The docs' names of the templates' canvas pictures (README and docs/comfyui.md show the style slider's);
# the others are comfyui_<title in lower case, words joined by _>.png.
PICTURES = {STYLE_SLIDER: "comfyui_style_slider_workflow.png", DEMO: "comfyui_demo_style_slider_workflow.png"}
# Combo widgets that list model files: the test server has none, so their values are not in the lists.
FILE_WIDGETS = {
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("UNETLoader", "unet_name"),
    ("DualCLIPLoader", "clip_name1"),
    ("DualCLIPLoader", "clip_name2"),
    ("VAELoader", "vae_name"),
    ("LoraLoader", "lora_name"),
    ("ACTLoadMap", "act_map_name"),
}
# Widgets the frontend adds that the server does not declare (PreviewAny's text box shows the result).
FRONTEND_ONLY_INPUTS = {("PreviewAny", "preview")}
# The nodes each template's thumbnail centres on (default: the ACT nodes; the demo's: its result).
THUMBNAIL_NODES = {DEMO: ["CLIPTextEncode", "KSampler", "VAEDecode", "ImageScaleBy", "SaveImage"]}


@pytest.fixture(scope="module")
def frontend(comfy_server):  # noqa: F811
    reason = comfy_browser.skip_reason()
    if reason:
        pytest.skip(reason)
    from selenium.common.exceptions import WebDriverException

    page = comfy_browser.Frontend(comfy_server)
    try:
        page.launch()
    except WebDriverException as error:
        page.quit()
        pytest.skip(f"Chromium did not start through chromedriver: {error.msg or error}")
    try:
        page.start()
        print(f"frontend ready in {page.startup_seconds:.1f} s")
        yield page
    finally:
        page.quit()


def _workflow(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def _pack_nodes(server) -> dict[str, dict]:
    return {
        node_id: info
        for node_id, info in server.object_info().items()
        if info["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
    }


def _write_pictures(frontend, name: str) -> None:
    if not WRITE_SCREENSHOTS:
        return
    picture = IMAGES / PICTURES.get(
        name, "comfyui_{}.png".format("_".join(re.findall(r"[a-z0-9]+", name.lower())))
    )
    frontend.graph_picture(picture)
    types = THUMBNAIL_NODES.get(name) or sorted(
        {node["type"] for node in _workflow(name)["nodes"] if node["type"].startswith("ACT")}
    )
    frontend.thumbnail(WORKFLOW_DIR / f"{name}.jpg", types)
    print(f"wrote {picture.relative_to(REPO)} and workflows/{name}.jpg")


def test_the_frontend_lists_the_act_nodes(frontend, comfy_server):  # noqa: F811
    pack = cs.load_node_pack()
    server_nodes = _pack_nodes(comfy_server)
    assert set(server_nodes) == set(pack.NODE_IDS)
    registered = frontend.js(
        "return Object.fromEntries(arguments[0].map((id) => { const t = LiteGraph.registered_node_types[id];"
        " return [id, t ? {title: t.title, category: t.category} : null]; }))",
        sorted(server_nodes),
    )
    for node_id, info in server_nodes.items():
        assert registered[node_id] == {"title": info["display_name"], "category": info["category"]}, node_id
        assert info["category"] in ("ACT", "ACT/demo") and info["display_name"] == pack.NODE_IDS[node_id]

    # The node library (side bar) shows them under ACT, the demo loader under ACT/demo.
    from selenium.webdriver.common.by import By

    frontend.load_template(PACK_LINK_NAME, STYLE_SLIDER)
    library = "button[aria-label^='Node Library']"
    frontend.driver.find_element(By.CSS_SELECTOR, library).click()
    for folder in ("ACT", "demo"):
        frontend.wait_for(
            "const e = Array.from(document.querySelectorAll('.p-tree-node-label, .p-treenode-label'))"
            f".find((e) => e.innerText.split('\\n')[0].trim() === {folder!r}); if (e) e.click(); return !!e",
            timeout=20,
            what=f"the {folder} folder in the node library",
        )
        time.sleep(0.3)
    labels = frontend.js(
        "return Array.from(document.querySelectorAll('.p-tree-node-label, .p-treenode-label'))"
        ".map((e) => e.innerText.trim())"
    )
    assert set(pack.NODE_IDS.values()) <= set(labels), labels
    if WRITE_SCREENSHOTS:
        frontend.resize(1500, 900)
        box = frontend.bounds(["ACTFitMap", "ACTSaveMap", "ACTApply"])
        frontend.call(
            "app.canvas.ds.scale = 1; app.canvas.ds.offset = args[0]; app.canvas.setDirty(true, true);"
            "await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));",
            [420 - box[0], 90 - box[1]],
        )
        (IMAGES / "comfyui_act_nodes.png").write_bytes(frontend.screenshot_png())
        frontend.resize(*frontend.size)
    frontend.driver.find_element(By.CSS_SELECTOR, library).click()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_template_loads_in_the_frontend(frontend, comfy_server, name):  # noqa: F811
    """Loaded as the template browser loads it: every node type is known (no missing-nodes dialog, no
    placeholder node), every widget value is valid for its widget (model files aside) and kept as saved, and
    the prompt the Run button would send is the one the tests' converter builds from the file."""
    workflow = frontend.load_template(PACK_LINK_NAME, name)
    state = frontend.graph_state()
    dialogs = frontend.dialogs()
    if name != DEMO:  # the demo's pictures show its result: test_the_demo_template_runs_from_the_run_button
        _write_pictures(frontend, name)
    assert workflow == _workflow(name)
    assert dialogs == []
    missing = [(node["id"], node["type"]) for node in state["nodes"] if not node["registered"]]
    broken = [(node["id"], node["type"]) for node in state["nodes"] if node["has_errors"]]
    assert not missing and not broken, (missing, broken)
    for node in state["nodes"]:
        for widget in node["widgets"]:
            where, value = f"{name}: node {node['id']} ({node['type']}).{widget['name']}", widget["value"]
            if widget["values"] is not None and (node["type"], widget["name"]) not in FILE_WIDGETS:
                assert value in widget["values"], f"{where}={value!r} is not one of its options"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                low, high = widget["min"], widget["max"]
                assert (low is None or value >= low) and (high is None or value <= high), f"{where}={value}"
    for node in workflow["nodes"]:  # nothing clamped, rounded or dropped on the way in
        saved = node.get("widgets_values") or []
        assert (state["widgets_values"][str(node["id"])] or []) == saved, f"{name}: node {node['id']}"
    sent = {
        node_id: (
            entry["class_type"],
            {
                k: v
                for k, v in entry["inputs"].items()
                if (entry["class_type"], k) not in FRONTEND_ONLY_INPUTS
            },
        )
        for node_id, entry in state["prompt"].items()
    }
    converted = {
        node_id: (entry["class_type"], entry["inputs"])
        for node_id, entry in ui_to_api(workflow, comfy_server.object_info()).items()
    }
    assert sent == converted


def test_a_missing_node_type_is_detected(frontend):
    """The check above would see a node type the frontend does not know."""
    workflow = _workflow(STYLE_SLIDER)
    fit = next(node for node in workflow["nodes"] if node["type"] == "ACTFitMap")
    fit["type"] = "ACTNoSuchNode"
    frontend.load_workflow(workflow, "missing_node_probe")
    try:
        state = frontend.graph_state()
        probe = next(node for node in state["nodes"] if node["id"] == fit["id"])
        assert probe["type"] == "ACTNoSuchNode" and not probe["registered"] and probe["has_errors"]
        dialogs = frontend.wait_for(
            "const d = Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText);"
            " return d.length ? d : null",
            timeout=10,
            what="the missing-nodes dialog",
        )
        assert any("ACTNoSuchNode" in text for text in dialogs), dialogs
    finally:
        frontend.close_dialogs()


def test_the_demo_template_runs_from_the_run_button(frontend, comfy_server):  # noqa: F811
    """The demo template runs end to end on the shipped model, from the Run button: the server saves four
    images, the Save Image node shows them, and the fitted slider made the unseen prompt striped."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    from demo.classifier import predict_proba
    from demo.paths import load_demo_classifier

    frontend.load_template(PACK_LINK_NAME, DEMO)
    (save_id,) = frontend.node_ids("SaveImage")
    before = set(comfy_server.get_json("/history"))
    t0 = time.monotonic()
    frontend.driver.find_element(By.CSS_SELECTOR, "button[aria-label='Run']").click()
    deadline = time.monotonic() + 60
    new: set[str] = set()
    while not new and time.monotonic() < deadline:
        queue = comfy_server.get_json("/queue")
        new = {entry[1] for entry in queue["queue_running"] + queue["queue_pending"]}
        new |= set(comfy_server.get_json("/history")) - before
        time.sleep(0.2)
    assert len(new) == 1, f"Run queued {len(new)} prompts"
    result = comfy_server.wait(new.pop(), timeout=300)
    print(f"the demo template ran in {time.monotonic() - t0:.1f} s")
    assert result.ok, result.error
    images = result.outputs[str(save_id)]["images"]
    assert len(images) == 4 and all(image["filename"].startswith("demo_striped") for image in images)
    pictures = [Image.open(BytesIO(comfy_server.view(image))).convert("RGB") for image in images]
    assert {picture.size for picture in pictures} == {(128, 128)}  # 32 px, shown 4x larger
    shown = frontend.wait_for(
        "const n = app.graph.getNodeById(arguments[0]);"
        " const imgs = (n && n.imgs) || [];"
        " return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth === 128)"
        " ? imgs.map((i) => decodeURIComponent(i.src)) : null".replace("arguments[0]", str(save_id)),
        timeout=30,
        what="the Save Image node to show the four images",
    )
    assert all(f"filename={image['filename']}" in src for image, src in zip(images, shown, strict=True))
    classifier = load_demo_classifier()
    probabilities = predict_proba(classifier, [picture.resize((32, 32), Image.BOX) for picture in pictures])
    labels = {
        head: [classifier.labels[head][i] for i in probabilities[head].argmax(-1).tolist()]
        for head in ("shape", "colour", "style")
    }
    assert labels["style"].count("striped") >= 3, labels
    assert labels["shape"].count("star") >= 3 and labels["colour"].count("green") >= 3, labels
    _write_pictures(frontend, DEMO)


def test_the_strength_slider_snaps_to_its_step(frontend, comfy_server):  # noqa: F811
    """Apply ACT's strength slider moves in steps of 0.05: a value set through the widget (the frontend's own
    setValue, as a drag or a typed value does) is rounded to the step, in the widget and in the prompt."""
    frontend.load_template(PACK_LINK_NAME, STYLE_SLIDER)
    (apply_id,) = frontend.node_ids("ACTApply")
    widget = frontend.call(
        """
        const node = app.graph.getNodeById(args[0]);
        const w = node.widgets.find((w) => w.name === 'strength');
        const before = {type: w.type, min: w.options.min, max: w.options.max, step: w.options.step2,
                        round: w.options.round ?? null};
        w.setValue(0.04, {e: undefined, node, canvas: app.canvas});
        return {...before, value: w.value};
        """,
        apply_id,
    )
    assert (widget["type"], widget["min"], widget["max"], widget["step"]) == ("slider", -2, 2, 0.05)
    sent = frontend.graph_state()["prompt"][str(apply_id)]["inputs"]["strength"]
    assert sent == widget["value"]
    spec = comfy_server.object_info("ACTApply")["ACTApply"]["input"]["required"]["strength"][1]
    if spec.get("round") != 0.05:
        pytest.xfail(
            f"Apply ACT's strength input has no round=0.05 yet (round={spec.get('round')!r}): the frontend keeps "
            f"0.04 as typed (got {widget['value']})"
        )
    assert widget["round"] == 0.05
    assert widget["value"] == 0.05  # Math.round(0.04 / 0.05) * 0.05: the nearest step


def test_the_template_browser_lists_the_pack_templates(frontend):
    """ComfyUI's template browser has a ComfyUI-ACT section with every template (after the thumbnails so its
    picture shows the current ones)."""
    frontend.resize(1500, 1250)  # room for every card
    try:
        frontend.command("Comfy.BrowseTemplates")
        # The section is clicked until its cards are there (the dialog re-renders while it loads).
        titles = frontend.wait_for(
            "const leaves = Array.from(document.querySelectorAll('.p-dialog *')).filter((e) => e.children.length === 0);"
            " const texts = leaves.map((e) => (e.textContent || '').trim());"
            f" if ({json.dumps(WORKFLOWS)}.every((n) => texts.includes(n))) return texts;"
            f" const section = leaves.find((e) => (e.textContent || '').trim() === {PACK_LINK_NAME!r});"
            " if (section) section.click(); return null",
            timeout=30,
            poll=1.0,
            what="every ComfyUI-ACT template in the template browser",
        )
        assert set(WORKFLOWS) <= set(titles)
        if WRITE_SCREENSHOTS:
            frontend.wait_for(
                "const imgs = Array.from(document.querySelectorAll('.p-dialog img')).filter((i) => {"
                " const r = i.getBoundingClientRect(); return r.height > 0 && r.top < window.innerHeight; });"
                " return imgs.length > 0 && imgs.every((i) => i.src && i.complete && i.naturalWidth > 0)",
                timeout=30,
                what="the thumbnails in view",
            )
            (IMAGES / "comfyui_templates.png").write_bytes(frontend.screenshot_png())
    finally:
        frontend.close_dialogs()
        frontend.resize(*frontend.size)
