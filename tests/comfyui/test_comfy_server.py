"""A real ComfyUI server runs graphs and loads node packs (skipped without COMFYUI_PATH).

Also pins down, on the ComfyUI version under test, the node-pack facts the ACT pack relies on
(docs/dev/comfyui_dev_notes.md): V1 and V3 packs load from a folder's __init__.py (relative imports
work), example_workflows/*.json are listed by GET /workflow_templates and served under
/api/workflow_templates/<folder name>/ (a second folder such as workflows/ is listed but not served).
"""

import json
import os
import struct
import textwrap

import comfy_support as cs  # noqa: E402
import pytest
from comfy_server import PACK_LINK_NAME, ComfyServer, PromptRejected, comfy_server  # noqa: E402,F401
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_minimal_graph_runs(comfy_server):  # noqa: F811
    srv = comfy_server
    print(f"ComfyUI server start-up: {srv.startup_seconds:.1f} s")
    prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 40, "height": 24, "batch_size": 1, "color": 0xFF8000},
        },
        "2": {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "act_server_test"},
        },
    }
    res = srv.run(prompt, timeout=120)
    assert res.ok, res.error
    images = res.outputs["2"]["images"]
    assert len(images) == 1 and images[0]["type"] == "output"
    assert srv.output_path(images[0]).is_file()
    assert _png_size(srv.view(images[0])) == (40, 24)
    # The same prompt again is served from the cache (nothing re-executes).
    res2 = srv.run(prompt, timeout=120)
    assert res2.ok
    cached = [d for ev, d in res2.messages if ev == "execution_cached"]
    assert cached and set(cached[0]["nodes"]) == {"1", "2"}


def test_latent_graph_runs(comfy_server):  # noqa: F811
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "2": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["1", 0], "filename_prefix": "latents/act_test"},
        },
    }
    res = comfy_server.run(prompt, timeout=120)
    assert res.ok, res.error
    (lat,) = res.outputs["2"]["latents"]
    assert lat["filename"].endswith(".latent")


def test_invalid_prompt_is_rejected(comfy_server):  # noqa: F811
    with pytest.raises(PromptRejected) as ei:
        comfy_server.queue_prompt({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}})
    body = ei.value.body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "required_input_missing"
    with pytest.raises(PromptRejected) as ei:
        comfy_server.queue_prompt({"1": {"class_type": "NoSuchNodeForACT", "inputs": {}}})
    assert ei.value.body["error"]["type"] == "invalid_prompt"


def test_repo_node_pack_is_mounted(comfy_server):  # noqa: F811
    """The repo is symlinked into the server's custom_nodes as ComfyUI-ACT. Before the repo-root __init__.py
    exists the pack fails to import and the server still runs; once it exists it must import cleanly."""
    srv = comfy_server
    assert (srv.custom_nodes_dir / PACK_LINK_NAME).resolve() == cs.REPO_ROOT
    status = srv.custom_node_status()
    link = str(srv.custom_nodes_dir / PACK_LINK_NAME)
    assert link in status, srv.log()[-4000:]
    if (cs.REPO_ROOT / "__init__.py").is_file():
        assert status[link] is True, f"node pack failed to import:\n{srv.log()[-8000:]}"
    else:
        assert status[link] is False
    assert "KSampler" in srv.object_info("KSampler")


PROBE_V1_INIT = textwrap.dedent(
    '''
    from .impl import shout


    class ACTProbeV1:
        """V1 probe node."""

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"multiline": True, "default": "hi"}),
                                 "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                                        "display": "slider"})}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "run"
        CATEGORY = "ACT/tests"

        def run(self, text, strength):
            from transformers import CLIPTextModel  # noqa: F401  (the torchvision stand-in must not break it)

            return (shout(text) + f" {strength:.2f}",)


    NODE_CLASS_MAPPINGS = {"ACTProbeV1": ACTProbeV1}
    NODE_DISPLAY_NAME_MAPPINGS = {"ACTProbeV1": "ACT probe (V1)"}
    '''
)

PROBE_V3_INIT = textwrap.dedent(
    """
    from comfy_api.latest import ComfyExtension, io


    class ACTProbeV3(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="ACTProbeV3",
                display_name="ACT probe (V3)",
                category="ACT/tests",
                inputs=[io.String.Input("text", multiline=True, default="hi"),
                        io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                                       display_mode=io.NumberDisplay.slider)],
                outputs=[io.String.Output()],
            )

        @classmethod
        def execute(cls, text, strength):
            return io.NodeOutput(f"{text[::-1]} {strength:.2f}")


    class ProbeExtension(ComfyExtension):
        async def get_node_list(self):
            return [ACTProbeV3]


    async def comfy_entrypoint():
        return ProbeExtension()
    """
)


def _write_probe_packs(root):
    v1 = root / "act_probe_v1"
    (v1 / "example_workflows").mkdir(parents=True)
    (v1 / "__init__.py").write_text(PROBE_V1_INIT)
    (v1 / "impl.py").write_text("def shout(s):\n    return s.upper()\n")
    (v1 / "example_workflows" / "probe_template.json").write_text(
        json.dumps({"nodes": [], "links": [], "version": 0.4})
    )
    # a second template folder name: listed too, but only the first existing folder is served
    (v1 / "workflows").mkdir()
    (v1 / "workflows" / "listed_not_served.json").write_text("{}")
    v3 = root / "act_probe_v3"
    v3.mkdir()
    (v3 / "__init__.py").write_text(PROBE_V3_INIT)
    return {"act_probe_v1": v1, "act_probe_v3": v3}


def test_probe_packs_v1_v3_and_templates(tmp_path):
    packs = _write_probe_packs(tmp_path)
    with ComfyServer(node_packs=packs) as srv:
        status = srv.custom_node_status()
        assert all(status.values()) and len(status) == 2, srv.log()[-6000:]
        info = srv.object_info("ACTProbeV1")["ACTProbeV1"]
        assert info["display_name"] == "ACT probe (V1)" and info["category"] == "ACT/tests"
        assert info["python_module"] == "custom_nodes.act_probe_v1"
        info3 = srv.object_info("ACTProbeV3")["ACTProbeV3"]
        assert info3["display_name"] == "ACT probe (V3)"
        assert info3["input"]["required"]["strength"][1]["display"] == "slider"
        assert info3["input"]["required"]["text"][1]["multiline"] is True

        prompt = {
            "1": {"class_type": "ACTProbeV1", "inputs": {"text": "abc", "strength": 0.5}},
            "2": {"class_type": "ACTProbeV3", "inputs": {"text": ["1", 0], "strength": 0.25}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        }
        res = srv.run(prompt, timeout=120)
        assert res.ok, res.error
        assert res.outputs["3"]["text"] == ["05.0 CBA 0.25"]

        # Templates: listed per custom_nodes folder name, served as static files under /api/.
        listing = srv.get_json("/workflow_templates")
        assert (
            sorted(listing["act_probe_v1"]) == ["listed_not_served", "probe_template"] and len(listing) == 1
        )
        assert srv.request("GET", "/api/workflow_templates/act_probe_v1/listed_not_served.json")[0] == 404
        status_code, body = srv.request("GET", "/api/workflow_templates/act_probe_v1/probe_template.json")
        body = json.loads(body) if isinstance(body, bytes) else body
        assert status_code == 200 and body["version"] == 0.4


def _ui_workflow():
    """A small UI-format (version 0.4) workflow: EmptyImage -> (bypassed ImageInvert) -> Reroute -> SaveImage,
    with a Note, a muted PreviewImage, and an unconnected RandomNoise whose seed has a control_after_generate value."""
    nodes = [
        {
            "id": 1,
            "type": "EmptyImage",
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
            "widgets_values": [32, 16, 1, 255],
        },
        {
            "id": 2,
            "type": "ImageInvert",
            "mode": 4,
            "inputs": [{"name": "image", "type": "IMAGE", "link": 1}],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [2, 4]}],
        },
        {
            "id": 3,
            "type": "Reroute",
            "mode": 0,
            "inputs": [{"name": "", "type": "*", "link": 2}],
            "outputs": [{"name": "", "type": "IMAGE", "links": [3]}],
        },
        {
            "id": 4,
            "type": "SaveImage",
            "mode": 0,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
            "outputs": [],
            "widgets_values": ["act_ui_converted"],
        },
        {
            "id": 5,
            "type": "PreviewImage",
            "mode": 2,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 4}],
            "outputs": [],
        },
        {"id": 6, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["a note"]},
        {
            "id": 7,
            "type": "RandomNoise",
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "NOISE", "type": "NOISE", "links": []}],
            "widgets_values": [1234, "fixed"],
        },
    ]
    links = [
        [1, 1, 0, 2, 0, "IMAGE"],
        [2, 2, 0, 3, 0, "*"],
        [3, 3, 0, 4, 0, "IMAGE"],
        [4, 2, 0, 5, 0, "IMAGE"],
    ]
    return {
        "last_node_id": 7,
        "last_link_id": 4,
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def test_ui_workflow_converts_and_runs(comfy_server):  # noqa: F811
    api = comfy_server.ui_to_api(_ui_workflow())
    assert set(api) == {"1", "4", "7"}
    assert api["1"]["inputs"] == {"width": 32, "height": 16, "batch_size": 1, "color": 255}
    assert api["4"]["inputs"] == {"filename_prefix": "act_ui_converted", "images": ["1", 0]}
    assert api["7"]["inputs"] == {"noise_seed": 1234}  # the control_after_generate value is not an input
    res = comfy_server.run(api, timeout=120)
    assert res.ok, res.error
    assert res.outputs["4"]["images"][0]["filename"].startswith("act_ui_converted")


def test_stock_default_template_converts(comfy_server):  # noqa: F811
    """ComfyUI's own default workflow (UI format, from comfyui-workflow-templates) converts into a prompt the
    server accepts except for the missing checkpoint file."""
    templates = pytest.importorskip("comfyui_workflow_templates")
    path = os.path.join(os.path.dirname(templates.__file__), "templates", "default.json")
    if not os.path.isfile(path):
        pytest.skip("default.json not shipped by this comfyui_workflow_templates")
    with open(path) as f:
        wf = json.load(f)
    api = comfy_server.ui_to_api(wf)
    ks = next(v for v in api.values() if v["class_type"] == "KSampler")
    assert set(ks["inputs"]) == {
        "seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "denoise",
        "model",
        "positive",
        "negative",
        "latent_image",
    }
    save = next(v for v in api.values() if v["class_type"] == "SaveImage")
    assert save["inputs"]["filename_prefix"] == "ComfyUI"  # no widgets_values: the widget default
    with pytest.raises(PromptRejected) as ei:
        comfy_server.queue_prompt(api)
    bad = {nid: e for nid, e in ei.value.body["node_errors"].items()}
    assert {api[nid]["class_type"] for nid in bad} == {"CheckpointLoaderSimple"}
    assert all(err["type"] == "value_not_in_list" for e in bad.values() for err in e["errors"])


def test_tiny_sdxl_samples_in_the_server(comfy_server, comfyui):  # noqa: F811
    """The test-only ACTTestTinySDXL node gives MODEL/CLIP without a checkpoint; KSampler in the server
    reproduces the in-process comfy_support.sample_tiny latent."""
    from comfy_server import load_latent_file, tiny_sample_prompt

    prompt = tiny_sample_prompt("a photo of a cat", seed=7, filename_prefix="latents/act_tiny")
    res = comfy_server.run(prompt, timeout=300)
    assert res.ok, res.error
    server_latent = load_latent_file(comfy_server.output_path(res.outputs["6"]["latents"][0]))
    model, clip = cs.build_tiny_sdxl(seed=0)
    local = cs.sample_tiny(model, clip, "a photo of a cat", seed=7, steps=2, cfg=5.0, size=(16, 16))
    assert server_latent.shape == local.shape == (1, 4, 16, 16)
    assert server_latent.equal(local), (server_latent - local).abs().max()
