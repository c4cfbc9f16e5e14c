"""Drive ComfyUI's real frontend in headless Chromium, for the browser tests (tests/comfyui/test_comfy_browser.py).

The browser is Debian's ``chromium`` with its ``chromedriver`` (``bash scripts/setup_browser.sh`` installs both
where apt-get works), driven by selenium (the project's ``test`` extra). Nothing is downloaded at run time:
selenium is pointed at the system chromedriver, so its driver manager never runs. Without selenium,
Chromium or chromedriver, ``skip_reason()`` says which is missing and the tests skip.

The page is the frontend the server serves (``comfyui_frontend_package``); the tests talk to it through
``window.app`` (ComfyUI's app: ``app.graph`` is the LiteGraph graph, ``app.loadGraphData`` loads a workflow as
the template browser does, ``app.graphToPrompt`` is what Run sends) and through the DOM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMEDRIVER_NAMES = ("chromedriver",)
INSTALL_HINT = "apt-get install chromium chromium-driver (bash scripts/setup_browser.sh does it as root)"
# Flags for a root user in a container with no network: no sandbox (root), no GPU, nothing phoned home.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--window-size=1600,1000",
)
# Settings of the test server's user: no template browser on first start, no missing-model dialog (the
# templates name checkpoints the test server does not have), no minimap, canvas info or tab bar in pictures.
QUIET_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",  # a tab per loaded template would fill the top bar
}


def _which(env: str, names: tuple[str, ...]) -> str | None:
    path = os.environ.get(env, "").strip()
    if path:
        return path if os.access(path, os.X_OK) else None
    return next((found for name in names if (found := shutil.which(name))), None)


def chromium_path() -> str | None:
    """Chromium's binary (``ACT_CHROMIUM`` or ``chromium`` on PATH)."""
    return _which("ACT_CHROMIUM", CHROMIUM_NAMES)


def chromedriver_path() -> str | None:
    """The chromedriver matching Debian's Chromium (``ACT_CHROMEDRIVER`` or ``chromedriver`` on PATH)."""
    return _which("ACT_CHROMEDRIVER", CHROMEDRIVER_NAMES)


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when selenium, Chromium and chromedriver are all there."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return f"no Chromium on PATH (or ACT_CHROMIUM); {INSTALL_HINT}"
    if chromedriver_path() is None:
        return f"no chromedriver on PATH (or ACT_CHROMEDRIVER); {INSTALL_HINT}"
    return None


class FrontendError(RuntimeError):
    """A script in the page threw; the message is the JavaScript error and stack."""


# Runs ``body`` as an async function of ``args`` in the page; returns {ok, value} or {ok: false, error}.
_ASYNC_WRAPPER = """
const done = arguments[arguments.length - 1];
const args = Array.from(arguments).slice(0, -1);
(async (...args) => { %s })(...args).then(
  (value) => done({ok: true, value: value === undefined ? null : JSON.stringify(value)}),
  (error) => done({ok: false, error: String((error && error.stack) || error)}),
);
"""

# Each node's bounding box in graph coordinates, title bar included.
_BOUNDS_JS = """
const types = args[0];
const boxes = app.graph._nodes
  .filter((n) => !types || types.includes(n.type))
  .map((n) => { const b = new Float32Array(4); n.getBounding(b); return Array.from(b); });
if (!boxes.length) return null;
const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
return [x0, y0, x1 - x0, y1 - y0];
"""

_VIEW_JS = """
const [scale, offset] = args;
app.canvas.ds.scale = scale;
app.canvas.ds.offset = offset;
app.canvas.setDirty(true, true);
app.canvas.draw(true, true);
await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
"""


class Frontend:
    """One headless Chromium on a ComfyUI server's page. ``start()`` / ``quit()``, or a context manager."""

    def __init__(self, server, width: int = 1600, height: int = 900):
        self.server = server
        self.size = (width, height)
        self.driver = None
        self.profile = None
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def launch(self) -> Frontend:
        """Start Chromium through chromedriver (selenium's ``WebDriverException`` when it cannot start)."""
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="act-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium_path()
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(chromedriver_path()), options=options)
        return self

    def start(self, timeout: float = 120.0) -> Frontend:
        """Launch Chromium (unless launched) and open the server's page until its node definitions are in."""
        for key, value in QUIET_SETTINGS.items():
            status, body = self.server.request("POST", f"/settings/{key}", value)
            if status != 200:
                raise FrontendError(f"POST /settings/{key} -> HTTP {status}: {body!r}")
        t0 = time.monotonic()
        if self.driver is None:
            self.launch()
        self.driver.set_script_timeout(timeout)
        self.resize(*self.size)
        self.driver.get(self.server.base_url)
        self.wait_for(
            "return !!(window.app && app.graph && app.canvas && window.LiteGraph && app.extensionManager"
            " && Object.keys(LiteGraph.registered_node_types).length > 100)",
            timeout=timeout,
            what="the frontend to load its node definitions",
        )
        self.startup_seconds = time.monotonic() - t0
        return self

    def quit(self) -> None:
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.quit()
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> Frontend:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.quit()

    # ------------------------------------------------------------------ page access
    def js(self, script: str, *args):
        """A synchronous script's return value (``return ...``)."""
        return self.driver.execute_script(script, *args)

    def call(self, body: str, *args):
        """Run ``body`` as an async function in the page (``args`` is its argument array); its JSON result."""
        result = self.driver.execute_async_script(_ASYNC_WRAPPER % body, *args)
        if not result["ok"]:
            raise FrontendError(result["error"])
        return None if result["value"] is None else json.loads(result["value"])

    def wait_for(self, script: str, timeout: float = 60.0, what: str = "a condition", poll: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(poll)

    def resize(self, width: int, height: int) -> None:
        """The page's viewport in CSS pixels (one device pixel each)."""
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        )

    def command(self, command_id: str) -> None:
        """Run a frontend command (the ids of the menu and keybindings, e.g. ``Comfy.Canvas.FitView``)."""
        self.call("await app.extensionManager.command.execute(args[0]);", command_id)

    def dialogs(self) -> list[str]:
        """Texts of the dialogs open now (missing nodes, errors ...)."""
        return self.js(
            "return Array.from(document.querySelectorAll('.p-dialog')).map((d) => d.innerText.slice(0, 500))"
        )

    def close_dialogs(self) -> None:
        self.js("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click())")

    # ------------------------------------------------------------------ workflows
    def load_workflow(self, workflow: dict, name: str) -> None:
        """Load a UI-format workflow as the template browser and file-open do (``app.loadGraphData``)."""
        self.call("await app.loadGraphData(args[0], true, true, args[1]);", workflow, name)

    def load_template(self, pack: str, name: str) -> dict:
        """Fetch ``/api/workflow_templates/<pack>/<name>.json`` in the page and load it; returns the JSON."""
        return self.call(
            """
            const [pack, name] = args;
            const response = await fetch(`/api/workflow_templates/${encodeURIComponent(pack)}/${encodeURIComponent(name)}.json`);
            if (!response.ok) throw new Error(`template ${pack}/${name}: HTTP ${response.status}`);
            const workflow = await response.json();
            await app.loadGraphData(workflow, true, true, name);
            return workflow;
            """,
            pack,
            name,
        )

    def graph_state(self) -> dict:
        """What the loaded graph is, seen from the frontend: its nodes (type known? error flag? widgets with
        value, type and options), each node's serialized widgets_values, and the prompt Run would send."""
        return self.call(
            """
            const nodes = app.graph._nodes.map((n) => ({
              id: n.id,
              type: n.type,
              title: n.title,
              registered: !!LiteGraph.registered_node_types[n.type],
              has_errors: !!n.has_errors,
              widgets: (n.widgets || []).map((w) => {
                const o = w.options || {};
                const values = typeof o.values === 'function' ? o.values(w, n) : o.values;
                return {name: w.name, type: w.type, value: w.value,
                        values: Array.isArray(values) ? values : null,
                        min: o.min ?? null, max: o.max ?? null, round: o.round ?? null};
              }),
            }));
            const serialized = app.graph.serialize();
            const widgets_values = Object.fromEntries(serialized.nodes.map((n) => [n.id, n.widgets_values ?? null]));
            const prompt = (await app.graphToPrompt()).output;
            return {nodes, widgets_values, prompt};
            """
        )

    def node_ids(self, node_type: str) -> list[int]:
        return self.js(
            "return app.graph._nodes.filter((n) => n.type === arguments[0]).map((n) => n.id)", node_type
        )

    # ------------------------------------------------------------------ pictures
    def bounds(self, node_types: list[str] | None = None) -> list[float] | None:
        """[x, y, w, h] around the nodes (of ``node_types``, or all) in graph coordinates."""
        return self.call(_BOUNDS_JS, node_types)

    def show(self, box: list[float], width: int, height: int, margin: float = 0.03, max_scale: float = 1.5):
        """Resize the viewport to width x height and zoom/pan so that ``box`` fills it (centred)."""
        self.resize(width, height)
        x, y, w, h = box
        scale = min((1 - 2 * margin) * width / w, (1 - 2 * margin) * height / h, max_scale)
        offset = [width / (2 * scale) - (x + w / 2), height / (2 * scale) - (y + h / 2)]
        time.sleep(0.3)  # the canvas follows the new viewport size on its resize observer
        self.call(_VIEW_JS, scale, offset)

    def focus_mode(self, on: bool) -> None:
        """The frontend's focus mode (no menus or side bars), and nothing drawn over the canvas but the
        nodes' own text boxes (no zoom buttons, no focus-mode toggle): for pictures of the graph."""
        self.js(
            """
            app.extensionManager.focusMode = arguments[0];
            document.getElementById('act-picture-style')?.remove();
            if (arguments[0]) {
              const style = document.createElement('style');
              style.id = 'act-picture-style';
              style.textContent = 'body * { visibility: hidden !important; }'
                + ' #graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }';
              document.head.appendChild(style);
            }
            """,
            bool(on),
        )
        time.sleep(0.3)

    def screenshot_png(self) -> bytes:
        return self.driver.get_screenshot_as_png()

    def graph_picture(self, path: Path, width: int = 1800, node_types: list[str] | None = None) -> Path:
        """A PNG of the whole graph (or of ``node_types``'s nodes) in focus mode, the viewport shaped like it."""
        box = self.bounds(node_types)
        height = int(min(1100, max(480, width * box[3] / box[2] * 1.06)))
        self.focus_mode(True)
        try:
            self.show(box, width, height)
            Path(path).write_bytes(self.screenshot_png())
        finally:
            self.focus_mode(False)
            self.resize(*self.size)
        return Path(path)

    def thumbnail(self, path: Path, node_types: list[str] | None = None, side: int = 512) -> Path:
        """A square JPEG (the template browser's thumbnail) of ``node_types``'s nodes, drawn at twice
        ``side`` and scaled down."""
        from io import BytesIO

        from PIL import Image

        box = self.bounds(node_types)
        self.focus_mode(True)
        try:
            self.show(box, 2 * side, 2 * side, margin=0.02, max_scale=1.2)
            image = Image.open(BytesIO(self.screenshot_png())).convert("RGB")
        finally:
            self.focus_mode(False)
            self.resize(*self.size)
        image.resize((side, side), Image.LANCZOS).save(path, "JPEG", quality=88, optimize=True)
        return Path(path)
