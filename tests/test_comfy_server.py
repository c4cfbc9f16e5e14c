"""A real ComfyUI server runs graphs and loads node packs (skipped without COMFYUI_PATH).

Also pins down, on the ComfyUI version under test, the node-pack facts the ACT pack relies on
(docs/dev/comfyui_dev_notes.md): V1 and V3 packs load from a folder's __init__.py (relative imports
work), example_workflows/*.json are listed by GET /workflow_templates and served under
/api/workflow_templates/<folder name>/ (a second folder such as workflows/ is listed but not served).
"""

import json
import os
import struct
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_support as cs  # noqa: E402
from comfy_server import PACK_LINK_NAME, ComfyServer, PromptRejected, comfy_server  # noqa: E402,F401

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
