"""The template workflows run in a real ComfyUI server (``main.py --cpu``), skipped without COMFYUI_PATH.

Each UI-format workflow in workflows/ is converted to an API prompt with the server's /object_info (as the
front end does), validated by the server as it is (only the SDXL checkpoint file is missing), then run with
the test-only tiny SDXL node standing in for the checkpoint loader: VAE decoding is replaced by SaveLatent
(the tiny model has no VAE) and sizes/steps are shrunk.
"""

import json
import time
import urllib.parse
from pathlib import Path

import comfy_support as cs  # noqa: E402
import pytest
from comfy_server import PACK_LINK_NAME, comfy_server, load_latent_file, tiny_sample_prompt  # noqa: E402,F401
from comfy_support import comfyui  # noqa: E402,F401  (session fixture)

pytestmark = cs.requires_comfyui

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOWS = sorted(p.stem for p in WORKFLOW_DIR.glob("*.json"))
# The templates by file name: the frontend shows a custom node's template under its file name.
STYLE_SLIDER = "ACT style slider, fit and apply (SDXL)"
FLUX_STYLE_SLIDER = "ACT style slider, fit and apply (FLUX.1 schnell)"
LAMBDA_SWEEP = "ACT lambda sweep of a saved map (SDXL)"
CONCEPT_NEGATION = "ACT concept negation (SDXL)"
LORA_EXPORT = "ACT slider as a LoRA, fit and export (SDXL)"
OUR_NODES = {"ACTFitMap", "ACTApply", "ACTSaveMap", "ACTLoadMap", "ACTExportLoRA", "ACTSweep", "ACTFoldMap"}


def _workflow(name):
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def _links_to(api, node_ids, slot=None):
    """Ids of nodes with an input linked to one of ``node_ids`` (at output ``slot`` if given)."""
    return [
        nid
        for nid, node in api.items()
        if any(
            isinstance(v, list) and len(v) == 2 and v[0] in node_ids and (slot is None or v[1] == slot)
            for v in node["inputs"].values()
        )
    ]


FLUX_LOADERS = {"UNETLoader", "DualCLIPLoader", "VAELoader"}


def model_loaders(api) -> set[str]:
    """The model-file loaders of a template: an SDXL checkpoint, or FLUX's model, CLIP and VAE files."""
    return {node["class_type"] for node in api.values()} & ({"CheckpointLoaderSimple"} | FLUX_LOADERS)


def save_latents_and_shrink(api, decoders, size: int, empty_latent: str):
    """Decoders become SaveLatent (the tiny models have no VAE), their image outputs go, sizes/steps shrink."""
    for nid in decoders:
        assert api[nid]["class_type"] == "VAEDecode"
        api[nid] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": api[nid]["inputs"]["samples"], "filename_prefix": f"latents/wf_{nid}"},
        }
    for nid in _links_to(api, decoders):
        del api[nid]  # SaveImage / PreviewImage of decoded images
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "ACTFitMap":
            inputs.update(width=size, height=size, steps=2, batch_size=4)
        elif node["class_type"] == "ACTFoldMap":
            inputs.update(width=size, height=size, steps=2, fold_steps=3)
        elif node["class_type"] == empty_latent:
            inputs.update(width=size, height=size)
        elif node["class_type"] in ("KSampler", "ACTSweep"):
            inputs["steps"] = 2
    return api


def tiny_flux_prompt(api):
    """A FLUX template with the tiny ComfyUI FLUX (and its CLIP) in place of the model files, latents saved."""
    ids = {node["class_type"]: nid for nid, node in api.items() if node["class_type"] in FLUX_LOADERS}
    assert set(ids) == FLUX_LOADERS, "a FLUX template loads a model, a CLIP pair and a VAE"
    unet, clip, vae = ids["UNETLoader"], ids["DualCLIPLoader"], ids["VAELoader"]
    api[unet] = {"class_type": "ACTTestTinyFlux", "inputs": {"seed": 0}}
    for node in api.values():
        for key, value in node["inputs"].items():
            if value == [clip, 0]:
                node["inputs"][key] = [unet, 1]
    decoders = _links_to(api, [vae])
    del api[clip], api[vae]
    return save_latents_and_shrink(api, decoders, 64, "EmptySD3LatentImage")


def tiny_prompt(api):
    """The API prompt with the tiny SDXL (or FLUX) in place of the model files, latents saved instead of images."""
    api = json.loads(json.dumps(api))
    if model_loaders(api) == FLUX_LOADERS:
        return tiny_flux_prompt(api)
    checkpoints = [nid for nid, node in api.items() if node["class_type"] == "CheckpointLoaderSimple"]
    assert checkpoints, "every template starts from an SDXL checkpoint or FLUX's model files"
    for nid in checkpoints:
        api[nid] = {"class_type": "ACTTestTinySDXL", "inputs": {"seed": 0}}
    return save_latents_and_shrink(api, _links_to(api, checkpoints, slot=2), 128, "EmptyLatentImage")


def _latents(srv, result):
    out = {}
    for nid, ui in result.outputs.items():
        for entry in ui.get("latents", []):
            out[nid] = load_latent_file(srv.output_dir / entry["subfolder"] / entry["filename"])
    return out


def _texts(result):
    return {nid: "".join(ui["text"]) for nid, ui in result.outputs.items() if "text" in ui}


@pytest.fixture(scope="module")
def saved_map(comfy_server, comfyui):  # noqa: F811
    """watercolor_style.safetensors in the server's act_maps folder, fitted in-process on the same tiny SDXL."""
    import torch

    pack = cs.load_node_pack()
    model, clip = cs.build_tiny_sdxl(seed=0)
    workflow = _workflow(STYLE_SLIDER)
    fit = next(n for n in workflow["nodes"] if n["type"] == "ACTFitMap")
    with torch.inference_mode():
        act_map, _ = cs.node_callers(pack)["ACTFitMap"](
            model, clip, *fit["widgets_values"][:7], 0, 128, 128, 2, 4, cfg=fit["widgets_values"][13]
        )
    path = comfy_server.models_dir("act_maps") / "watercolor_style.safetensors"
    act_map.save(path)
    return path


def test_pack_loads_in_the_server_with_templates(comfy_server):  # noqa: F811
    srv = comfy_server
    status = srv.custom_node_status()
    assert status[str(srv.custom_nodes_dir / PACK_LINK_NAME)] is True, srv.log()[-6000:]
    info = srv.object_info()
    assert set(info) >= OUR_NODES
    for name in OUR_NODES:
        assert (
            info[name]["category"] == "ACT"
            and info[name]["python_module"] == f"custom_nodes.{PACK_LINK_NAME}"
        )
        assert info[name]["description"]
    assert info["ACTApply"]["display_name"] == "Apply ACT (steer, slider)"
    assert info["ACTApply"]["input"]["required"]["strength"][1]["display"] == "slider"
    listing = srv.get_json("/workflow_templates")
    assert sorted(listing[PACK_LINK_NAME]) == WORKFLOWS
    for name in WORKFLOWS:
        url = f"/api/workflow_templates/{PACK_LINK_NAME}/{urllib.parse.quote(name)}"  # as the browser asks
        status_code, body = srv.request("GET", f"{url}.json")
        body = json.loads(body) if isinstance(body, bytes) else body
        assert status_code == 200 and body == _workflow(name)
        status_code, _ = srv.request("GET", f"{url}.jpg")
        assert status_code == 200


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_validates_except_for_the_missing_model_files(comfy_server, saved_map, name):  # noqa: F811
    api = comfy_server.ui_to_api(_workflow(name))
    assert {node["class_type"] for node in api.values()} & OUR_NODES
    # ComfyUI answers 400 when no output node validates, else queues the valid outputs and lists node_errors
    status, body = comfy_server.request(
        "POST", "/prompt", {"prompt": api, "client_id": comfy_server.client_id}
    )
    assert status in (200, 400), body
    errors = body["node_errors"]
    assert {api[nid]["class_type"] for nid in errors} == model_loaders(api), errors
    assert all(e["type"] == "value_not_in_list" for entry in errors.values() for e in entry["errors"])
    if status == 200:  # e.g. the map summary preview alone: let it finish
        assert comfy_server.wait(body["prompt_id"], timeout=300).ok


def test_style_slider_workflow_runs(comfy_server):  # noqa: F811
    from act_core.maps import ACTMap

    srv = comfy_server
    target = srv.models_dir("act_maps") / "watercolor_style.safetensors"
    api = tiny_prompt(srv.ui_to_api(_workflow(STYLE_SLIDER)))
    result = srv.run(api, timeout=600)
    assert result.ok, result.error
    (latent,) = _latents(srv, result).values()
    assert latent.shape == (1, 4, 16, 16) and bool(latent.isfinite().all())
    assert any(text.startswith("ACT map: 51 modules") for text in _texts(result).values())
    act_map = ACTMap.load(target)
    assert act_map.metadata["preset"] == "unet_norms" and act_map.metadata["num_source_prompts"] == 16


def test_flux_style_slider_workflow_runs(comfy_server):  # noqa: F811
    """The FLUX template fits on ComfyUI's FLUX with its sampler and samples the steered model."""
    from act_core.maps import ACTMap

    srv = comfy_server
    api = tiny_prompt(srv.ui_to_api(_workflow(FLUX_STYLE_SLIDER)))
    result = srv.run(api, timeout=600)
    assert result.ok, result.error
    (latent,) = _latents(srv, result).values()
    assert latent.shape == (1, 4, 8, 8) and bool(latent.isfinite().all())
    act_map = ACTMap.load(srv.models_dir("act_maps") / "flux_watercolor_style.safetensors")
    assert act_map.metadata["family"] == "flux" and act_map.metadata["preset"] == "pooled_text_and_blocks"
    assert act_map.metadata["sampling"]["cfg"] == 1 and len(act_map.buckets) == 2


def test_lambda_sweep_workflow_runs_and_lambda_zero_is_the_plain_model(comfy_server, saved_map):  # noqa: F811
    srv = comfy_server
    workflow = _workflow(LAMBDA_SWEEP)
    sweep = next(n for n in workflow["nodes"] if n["type"] == "ACTSweep")
    positive, negative, lambdas, seed = sweep["widgets_values"][:4]
    result = srv.run(tiny_prompt(srv.ui_to_api(workflow)), timeout=600)
    assert result.ok, result.error
    (latent,) = _latents(srv, result).values()
    assert lambdas == "0, 0.25, 0.5, 0.75, 1" and latent.shape == (5, 4, 16, 16)
    assert "0, 0.25, 0.5, 0.75, 1" in _texts(result).values()
    model, clip = cs.build_tiny_sdxl(seed=0)
    plain = cs.sample_tiny(model, clip, positive, seed=seed, steps=2, cfg=7.0, negative=negative)
    assert latent[0:1].equal(plain), (latent[0:1] - plain).abs().max()
    assert all(not latent[i].equal(latent[0]) for i in range(1, 5))


def test_concept_negation_workflow_runs(comfy_server):  # noqa: F811
    srv = comfy_server
    result = srv.run(tiny_prompt(srv.ui_to_api(_workflow(CONCEPT_NEGATION))), timeout=600)
    assert result.ok, result.error
    (latent,) = _latents(srv, result).values()
    assert latent.shape == (3, 4, 16, 16)
    assert any(text.startswith("ACT map:") for text in _texts(result).values())


def test_lora_export_workflow_folds_the_default_map_and_writes_a_lora(comfy_server):  # noqa: F811
    """Fit (default preset: one map per step) -> Fold ACT map (one fixed map) -> Export ACT as LoRA, and Apply
    ACT samples with the folded map; the Fold node's summary says how closely it follows the fitted map."""
    from safetensors import safe_open

    srv = comfy_server
    workflow = _workflow(LORA_EXPORT)
    fit = next(n for n in workflow["nodes"] if n["type"] == "ACTFitMap")
    fold = next(n for n in workflow["nodes"] if n["type"] == "ACTFoldMap")
    assert fit["widgets_values"][2] == "default" and fold["widgets_values"][-1] == 200
    api = tiny_prompt(srv.ui_to_api(workflow))
    fold_id = next(nid for nid, node in api.items() if node["class_type"] == "ACTFoldMap")
    fit_id = next(nid for nid, node in api.items() if node["class_type"] == "ACTFitMap")
    # one prompt list for both (the source prompts node), and the same sampler settings
    shared = ("source_prompts", "width", "height", "steps", "cfg", "sampler_name", "scheduler")
    assert {k: api[fold_id]["inputs"][k] for k in shared} == {k: api[fit_id]["inputs"][k] for k in shared}
    result = srv.run(api, timeout=600)
    assert result.ok, result.error
    texts = _texts(result).values()
    assert "act_watercolor.safetensors" in texts
    assert any("Folded from a map of 2 noise levels on 16 prompts" in text for text in texts)
    (latent,) = _latents(srv, result).values()
    assert latent.shape == (1, 4, 16, 16) and bool(latent.isfinite().all())
    with safe_open(str(srv.models_dir("loras") / "act_watercolor.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["format"] == "act_lora"
    assert len(keys) == 2 * 51 and all(
        k.startswith("lora_unet_") and k.endswith((".diff", ".diff_b")) for k in keys
    )
    assert (
        "act_watercolor.safetensors"
        in srv.object_info("LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    )


def test_interrupting_a_fit_in_the_server(comfy_server):  # noqa: F811
    """POST /interrupt while Fit runs: the run ends as interrupted, nothing is saved, and the (cached) tiny
    model afterwards samples exactly like an untouched one (no hooks left behind)."""
    srv = comfy_server
    many = 120
    prompt = {
        "1": {"class_type": "ACTTestTinySDXL", "inputs": {"seed": 0}},
        "2": {
            "class_type": "ACTFitMap",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "source_prompts": "\n".join(f"a photo of object {i}" for i in range(many)),
                "target_prompts": "\n".join(f"a watercolor of object {i}" for i in range(many)),
                "preset": "unet_norms",
                "parts": "",
                "method": "linear",
                "support": "auto",
                "mode": "causal",
                "fit_seed": 0,
                "width": 256,
                "height": 256,
                "steps": 2,
                "batch_size": 2,
            },
        },
        "3": {
            "class_type": "ACTSaveMap",
            "inputs": {"act_map": ["2", 0], "filename": "interrupted", "overwrite": True},
        },
    }
    prompt_id = srv.queue_prompt(prompt)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = srv.get_json("/queue")["queue_running"]
        if running and running[0][1] == prompt_id:
            break
        time.sleep(0.05)
    time.sleep(2.0)  # well inside the fit (encoding + one UNet call per batch of 2 takes longer than this)
    srv.request("POST", "/interrupt", {})
    result = srv.wait(prompt_id, timeout=300)
    interrupted = [data for event, data in result.messages if event == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "ACTFitMap", result.messages
    assert not (srv.models_dir("act_maps") / "interrupted.safetensors").exists()
    assert not any(p.name.startswith(".interrupted") for p in srv.models_dir("act_maps").iterdir())

    after = tiny_sample_prompt("a cat", seed=3, filename_prefix="latents/after_interrupt")
    result = srv.run(after, timeout=300)
    assert result.ok, result.error
    (latent,) = _latents(srv, result).values()
    model, clip = cs.build_tiny_sdxl(seed=0)
    assert latent.equal(cs.sample_tiny(model, clip, "a cat", seed=3, steps=2, cfg=5.0))
