"""Start a real ComfyUI server in a subprocess for end-to-end tests of the node pack.

The server runs from the ComfyUI source tree in ``COMFYUI_PATH`` with the Python of the current process
(override with ``COMFYUI_PYTHON``), on the CPU, on a free loopback port, with every writable folder in a
temporary directory (``--base-directory``; input/output/temp/user/models and the sqlite DB live there,
so the ComfyUI tree is not written to). An ``extra_model_paths.yaml`` in that directory adds a
``custom_nodes`` folder holding a symlink to this repo, so the server loads our node pack through the
repo-root ``__init__.py`` exactly as it would from ``ComfyUI/custom_nodes/``.

Only the standard library is used for HTTP. Typical use::

    from comfy_server import ComfyServer

    with ComfyServer() as srv:                     # waits for HTTP 200
        res = srv.run({"1": {...}, "2": {...}})    # API-format prompt -> RunResult
        assert res.ok, res.error

or the ``comfy_server`` session fixture defined below.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_support import (  # noqa: E402
    COMFY_REQUIREMENTS,
    REPO_ROOT,
    SKIP_REASON,
    comfy_path,
    missing_requirements,
    write_torchvision_stub,
)

PACK_LINK_NAME = "ComfyUI-ACT"  # the folder name ComfyUI sees for this repo (as if cloned into custom_nodes/)
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "embeddings", "act_maps")


def _die_with_parent() -> None:
    """In the server's child process: ask Linux to end it when the test process dies (PR_SET_PDEATHSIG);
    elsewhere nothing (stop() still ends it on a normal exit)."""
    import contextlib
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ComfyServerError(RuntimeError):
    pass


class PromptRejected(ComfyServerError):
    """POST /prompt answered 400 (validation failed). ``body`` holds ``{"error", "node_errors"}``."""

    def __init__(self, body: dict):
        self.body = body
        err = body.get("error", {})
        super().__init__(f"prompt rejected: {err.get('message', err)}; node_errors={body.get('node_errors')}")


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" or "error" (from /history status.status_str)
    outputs: dict = field(
        default_factory=dict
    )  # node id -> UI output, e.g. {"images": [{filename, subfolder, type}]}
    messages: list = field(
        default_factory=list
    )  # [[event, data], ...] e.g. execution_start/cached/success/error
    history: dict = field(default_factory=dict)  # the whole /history/<id> entry

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error(self) -> dict | None:
        """The ``execution_error`` data (node_id, node_type, exception_type, exception_message, traceback)."""
        for event, data in self.messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server subprocess. ``start()`` / ``stop()`` or use as a context manager.

    node_packs: folders to expose in the extra custom_nodes folder, as ``{link_name: path}``;
        default ``{"ComfyUI-ACT": <this repo>}``. Pass ``{}`` for none.
    extra_args: more command-line arguments for ``main.py``.
    """

    def __init__(
        self,
        comfyui_path: str | None = None,
        python: str | None = None,
        node_packs: dict[str, str | os.PathLike] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        port: int | None = None,
        keep_dir: bool = False,
    ):
        self.comfyui_path = comfyui_path or comfy_path()
        if not self.comfyui_path:
            raise ComfyServerError(SKIP_REASON)
        self.python = python or os.environ.get("COMFYUI_PYTHON") or sys.executable
        self.node_packs = {PACK_LINK_NAME: REPO_ROOT} if node_packs is None else dict(node_packs)
        self.extra_args = list(extra_args)
        self.port = port
        self.keep_dir = keep_dir
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.startup_seconds: float | None = None
        self.client_id = uuid.uuid4().hex
        self._log_file = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.dir / "base" / "output"

    @property
    def input_dir(self) -> Path:
        return self.dir / "base" / "input"

    def models_dir(self, folder: str) -> Path:
        """A model folder the server searches (``checkpoints``, ``loras``, ``act_maps`` ...)."""
        return self.dir / "base" / "models" / folder

    @property
    def custom_nodes_dir(self) -> Path:
        """The extra custom_nodes folder (from extra_model_paths.yaml) holding the node-pack symlinks."""
        return self.dir / "custom_nodes"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def custom_node_status(self) -> dict[str, bool]:
        """{node pack path: imported OK} from the server's "Import times for custom nodes" log block
        (ComfyUI logs a failing pack as ``(IMPORT FAILED)`` with its traceback above and keeps running)."""
        out = {}
        for line in self.log().splitlines():
            m = re.match(r"^\s*\d+\.\d+ seconds( \(IMPORT FAILED\))?: (.+)$", line)
            if m:
                out[m.group(2).strip()] = m.group(1) is None
        return out

    def _prepare_dir(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="comfyui-act-test-"))
        base = self.dir / "base"
        for sub in ("input", "output", "temp", "user", "custom_nodes"):
            (base / sub).mkdir(parents=True)
        for f in MODEL_FOLDERS:
            self.models_dir(f).mkdir(parents=True)
        self.custom_nodes_dir.mkdir()
        for name, target in self.node_packs.items():
            os.symlink(os.path.abspath(target), self.custom_nodes_dir / name, target_is_directory=True)
        # extra_model_paths.yaml: the custom_nodes folder plus an act_maps model folder (a new folder name;
        # ComfyUI registers it with an empty extension filter, i.e. every file is listed).
        yaml_text = (
            "comfyui_act_tests:\n"
            f"    custom_nodes: {json.dumps(str(self.custom_nodes_dir))}\n"
            f"    act_maps: {json.dumps(str(self.models_dir('act_maps')))}\n"
        )
        (self.dir / "extra_model_paths.yaml").write_text(yaml_text)

    def _env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # the same thread count as the test process (tests/conftest.py): float sums in the same order, so
        # in-process and server results compare bit for bit
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        # ComfyUI imports `from torchvision import transforms` at start-up; PyPI's torchvision does not load
        # beside CPU torch. If the server's Python has none, a sitecustomize.py puts a stand-in in place.
        probe = subprocess.run(
            [
                self.python,
                "-c",
                "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)",
            ],
            capture_output=True,
            env=env,
        )
        if probe.returncode != 0:
            stub_dir = write_torchvision_stub(self.dir / "stubs")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub_dir), env.get("PYTHONPATH", "")) if p)
        return env

    def start(self, timeout: float = 180.0) -> ComfyServer:
        if self.proc is not None:
            return self
        self._prepare_dir()
        self.port = self.port or free_port()
        base = self.dir / "base"
        cmd = [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-api-nodes",
            "--disable-auto-launch",
            "--base-directory",
            str(base),
            "--extra-model-paths-config",
            str(self.dir / "extra_model_paths.yaml"),
            "--database-url",
            f"sqlite:///{base / 'user' / 'comfyui.db'}",
            "--log-stdout",
            *self.extra_args,
        ]
        env = self._env()
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.comfyui_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() can end it and its children
            preexec_fn=_die_with_parent,  # a test run killed outright (timeout, SIGKILL) leaves no server behind
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyServerError(
                    f"ComfyUI exited with code {self.proc.returncode} during start-up; log:\n{self.log()[-6000:]}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise ComfyServerError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log()[-6000:]}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # ComfyUI's main loop exits on KeyboardInterrupt
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        """JSON request; returns (status, decoded JSON or raw bytes)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        if "json" in ctype:
            return status, json.loads(raw or b"null")
        return status, raw

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        if status != 200:
            raise ComfyServerError(f"GET {path} -> HTTP {status}: {body!r}"[:2000])
        return body

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_class)}" if node_class else ""))

    def queue_prompt(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST an API-format prompt; returns prompt_id. Raises PromptRejected on validation errors."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, resp = self.request("POST", "/prompt", body)
        if status == 400 and isinstance(resp, dict):
            raise PromptRejected(resp)
        if status != 200:
            raise ComfyServerError(f"POST /prompt -> HTTP {status}: {resp!r}"[:2000])
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> RunResult:
        """Poll /history/<id> until the prompt finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                st = entry["status"]
                return RunResult(
                    prompt_id=prompt_id,
                    status=st.get("status_str", "error"),
                    outputs=entry.get("outputs", {}),
                    messages=[list(m) for m in st.get("messages", [])],
                    history=entry,
                )
            if self.proc is None or self.proc.poll() is not None:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}; log:\n{self.log()[-6000:]}")
            time.sleep(poll)
        self.request("POST", "/interrupt", {})
        raise ComfyServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 300.0) -> RunResult:
        """Queue an API-format prompt and wait for it. Validation errors raise PromptRejected;
        execution errors come back as ``RunResult(status="error")`` with ``.error`` set."""
        return self.wait(self.queue_prompt(prompt), timeout=timeout)

    def ui_to_api(self, workflow: dict) -> dict:
        """Convert a UI-format workflow (e.g. example_workflows/*.json) with this server's /object_info."""
        if getattr(self, "_object_info", None) is None:
            self._object_info = self.object_info()
        return ui_to_api(workflow, self._object_info)

    def view(self, image: dict) -> bytes:
        """Bytes of an output file given one entry of ``outputs[node]["images"]``."""
        q = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        status, body = self.request("GET", f"/view?{q}")
        if status != 200:
            raise ComfyServerError(f"/view?{q} -> HTTP {status}")
        return body

    def output_path(self, image: dict) -> Path:
        """Path on disk of an ``output``-type image entry."""
        return self.output_dir / image.get("subfolder", "") / image["filename"]


# --------------------------------------------------------------------------------------------------
# A test-only node pack that serves the tiny SDXL of comfy_support inside the server
# --------------------------------------------------------------------------------------------------
TINY_PACK_NAME = "act_test_tiny_models"
_TINY_PACK_INIT = """\
# Test-only ComfyUI node pack written by tests/comfy_server.py: the tiny random SDXL of
# tests/comfy_support.py and the tiny FLUX of tests/comfy_flux.py as (MODEL, CLIP), so server tests need
# no checkpoint file.
import sys

sys.path.insert(0, {tests_dir!r})
import comfy_support  # noqa: E402


class _TinyModelNode:
    # seed -> (MODEL, CLIP): what the tiny-model nodes share
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"seed": ("INT", {{"default": 0, "min": 0, "max": 2**31 - 1}})}}}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "build"
    CATEGORY = "ACT/tests"


class ACTTestTinySDXL(_TinyModelNode):
    def build(self, seed):
        return comfy_support.build_tiny_sdxl(seed=seed)


class ACTTestTinyFlux(_TinyModelNode):
    # ComfyUI's FLUX at tiny widths (tests/comfy_flux.py) with its own FLUX CLIP.
    def build(self, seed):
        import tempfile
        from pathlib import Path

        import comfy_flux
        import tiny_flux

        pipe = tiny_flux.build_tiny_flux(Path(tempfile.mkdtemp(prefix="act_tiny_flux_")), seed=seed)
        return comfy_flux.load_flux_transformer(pipe.transformer), comfy_flux.build_flux_clip(seed)


NODE_CLASS_MAPPINGS = {{"ACTTestTinySDXL": ACTTestTinySDXL, "ACTTestTinyFlux": ACTTestTinyFlux}}
"""


def write_tiny_model_pack(parent: str | os.PathLike) -> Path:
    """Write the test-only pack (nodes ``ACTTestTinySDXL`` and ``ACTTestTinyFlux``: seed -> MODEL, CLIP) under
    ``parent``; returns its
    folder, to pass in ``ComfyServer(node_packs={..., TINY_PACK_NAME: path})``. The tiny MODEL is
    float32 and 4-channel, so EmptyLatentImage -> KSampler -> SaveLatent runs (latent side = pixels / 8;
    keep it a multiple of 4). There is no VAE: decode nothing."""
    d = Path(parent) / TINY_PACK_NAME
    d.mkdir(parents=True, exist_ok=True)
    (d / "__init__.py").write_text(
        _TINY_PACK_INIT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    )
    return d


def tiny_sample_prompt(text: str, seed: int, filename_prefix: str) -> dict:
    """An API prompt: the tiny model (``ACTTestTinySDXL``, seed 0) samples ``text`` at 128 px, 2 Euler steps,
    cfg 5, and SaveLatent writes the latent under ``filename_prefix`` (node "6")."""
    return {
        "1": {"class_type": "ACTTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["5", 0], "filename_prefix": filename_prefix},
        },
    }


def load_latent_file(path: str | os.PathLike):
    """The tensor of a ``.latent`` file written by SaveLatent (safetensors, key ``latent_tensor``)."""
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------------------------------
# Workflow (UI) format -> API (prompt) format
# --------------------------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {
    "Note",
    "MarkdownNote",
    "Reroute",
    "PrimitiveNode",
}  # front-end only, never sent to the server
MODE_MUTED, MODE_BYPASS = 2, 4


def _widget_inputs(node_info: dict) -> list[tuple[str, object, dict, int]]:
    """(name, type, options, number of widgets_values it takes) per widget input, in the front end's order."""
    out = []
    for section in ("required", "optional"):
        specs = node_info["input"].get(section, {})
        for name in node_info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if not (isinstance(typ, list) or typ in WIDGET_TYPES) or opts.get("forceInput"):
                continue
            extra = 0
            # seed-like INT (and COMBO) inputs get a second "control_after_generate" widget, serialized in
            # widgets_values but not sent to the server; upload inputs get an extra upload widget value.
            if opts.get("control_after_generate") or (typ == "INT" and name in ("seed", "noise_seed")):
                extra += 1
            if any(
                opts.get(k) for k in ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
            ):
                extra += 1
            out.append((name, typ, opts, 1 + extra))
    return out


def _default_value(typ, opts):
    if "default" in opts:
        return opts["default"]
    if isinstance(typ, list):
        return typ[0] if typ else None
    if typ == "COMBO":
        return (opts.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a saved workflow (UI format, "version": 0.4: nodes/links/widgets_values) into the API
    prompt format that POST /prompt takes, the way the front end's graphToPrompt does (ComfyUI has no
    Python converter). ``object_info`` is GET /object_info of the server that will run it (it says which
    inputs are widgets and their order).

    Handles: widget values in order (skipping the extra control_after_generate / upload values), missing
    widgets_values (defaults), links, muted (mode 2) and bypassed (mode 4) nodes, Note/MarkdownNote,
    Reroute and PrimitiveNode. Not handled (raises): subgraphs, group nodes, unknown node types,
    widgets_values given as a dict, widgets added by front-end extensions."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise NotImplementedError("subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for ln in workflow.get("links", []):
        if isinstance(ln, dict):  # version 1 schema
            links[ln["id"]] = (
                ln["origin_id"],
                ln["origin_slot"],
                ln["target_id"],
                ln["target_slot"],
                ln.get("type"),
            )
        else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            links[ln[0]] = tuple(ln[1:6])

    def resolve(link_id, seen=()):
        """-> ("link", origin_id, slot) | ("value", v) | None, following Reroutes, Primitives and bypasses."""
        if link_id is None or link_id not in links or link_id in seen:
            return None
        origin_id, slot, _t_id, _t_slot, ltype = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        seen = (*seen, link_id)
        if origin["type"] == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link"), seen) if ins else None
        if origin["type"] == "PrimitiveNode":
            wv = origin.get("widgets_values") or [None]
            return ("value", wv[0])
        mode = origin.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:  # a bypassed node passes an input of the same type through
            outs = origin.get("outputs") or []
            out_type = outs[slot].get("type", ltype) if slot < len(outs) else ltype
            ins = origin.get("inputs") or []
            cands = [i for i in ins if i.get("type") == out_type and i.get("link") is not None]
            if slot < len(ins) and ins[slot] in cands:  # prefer the input in the same slot
                cands.insert(0, ins[slot])
            for cand in cands:
                r = resolve(cand.get("link"), seen)
                if r is not None:
                    return r
            return None
        return ("link", origin_id, slot)

    prompt = {}
    for nid, node in nodes.items():
        ctype = node["type"]
        if ctype in VIRTUAL_NODES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if ctype not in object_info:
            raise KeyError(
                f"node {nid}: type {ctype!r} is not known to the server (group node or missing pack?)"
            )
        info = object_info[ctype]
        widgets = _widget_inputs(info)
        wv = node.get("widgets_values")
        if isinstance(wv, dict):
            raise NotImplementedError(f"node {nid} ({ctype}): widgets_values as a dict")
        wv = list(wv or [])
        inputs = {}
        pos = 0
        for name, typ, opts, width in widgets:
            value = wv[pos] if pos < len(wv) else _default_value(typ, opts)
            pos += width
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for inp in node.get("inputs") or []:
            r = resolve(inp.get("link"))
            if r is None:
                continue
            if r[0] == "value":
                inputs[inp["name"]] = {"__value__": r[1]} if isinstance(r[1], list) else r[1]
            else:
                inputs[inp["name"]] = [str(r[1]), int(r[2])]
        prompt[str(nid)] = {
            "class_type": ctype,
            "inputs": inputs,
            "_meta": {"title": node.get("title", ctype)},
        }
    for entry in prompt.values():  # drop links to nodes that were left out
        for k, v in list(entry["inputs"].items()):
            if isinstance(v, list) and len(v) == 2 and v[0] not in prompt:
                del entry["inputs"][k]
    return prompt


@pytest.fixture(scope="session")
def comfy_server():
    """A running server shared by the session (start-up costs ~10 s), with this repo mounted as the
    ``ComfyUI-ACT`` pack and the test-only ``ACTTestTinySDXL`` node. Skips without COMFYUI_PATH."""
    if comfy_path() is None:
        pytest.skip(SKIP_REASON)
    if not os.environ.get("COMFYUI_PYTHON"):
        missing = missing_requirements((*COMFY_REQUIREMENTS, "comfyui_frontend_package"))
        if missing:
            pytest.skip(f"this Python lacks ComfyUI's requirements ({', '.join(missing)}); {SKIP_REASON}")
    packdir = tempfile.mkdtemp(prefix="comfyui-act-packs-")
    srv = ComfyServer(node_packs={PACK_LINK_NAME: REPO_ROOT, TINY_PACK_NAME: write_tiny_model_pack(packdir)})
    try:
        srv.start()
    except ComfyServerError as e:
        pytest.fail(str(e))
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(packdir, ignore_errors=True)
