"""The ``act_maps`` model folder and safe file names for saving maps and LoRAs.

``folder_paths`` (ComfyUI) is imported lazily: outside ComfyUI, registration is a no-op and listings are
empty, so node schemas still import and validate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from act_core.errors import ACTInputError
from act_core.files import check_destination

FOLDER = "act_maps"
EXTENSION = ".safetensors"
_COMPONENT = re.compile(r"^[\w\-+=,.() \[\]@]+$")
# File systems allow 255 bytes per name; the temporary file of an atomic write adds about 24.
MAX_NAME_BYTES = 200
_OTHER_MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft", ".gguf", ".onnx")


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def register_act_maps_folder() -> bool:
    """Register ``<models>/act_maps`` for ``.safetensors`` files, keeping paths already configured for it
    (``extra_model_paths.yaml`` is applied before custom nodes load). False outside ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        return False
    default = os.path.join(fp.models_dir, FOLDER)
    fp.add_model_folder_path(FOLDER, default, is_default=False)
    paths, _extensions = fp.folder_names_and_paths[FOLDER]
    fp.folder_names_and_paths[FOLDER] = (paths, {EXTENSION})
    return True


def list_maps() -> list[str]:
    """Map files in every ``act_maps`` folder (relative names, as the Load node lists them)."""
    fp = _folder_paths()
    if fp is None:
        return []
    register_act_maps_folder()
    return sorted(fp.get_filename_list(FOLDER))


def clean_name(name: str, what: str = "file name") -> str:
    """A relative ``a/b/name.safetensors`` path, or ``ACTInputError`` for anything that could escape the folder.

    Refused: empty names, absolute paths and drive letters, ``.`` / ``..`` components, hidden (dot) names,
    characters outside letters, digits, spaces and ``_-+=,.()[]@``, and other model extensions. ``.safetensors``
    is appended when missing.
    """
    if not isinstance(name, str) or not name.strip():
        raise ACTInputError(f"The {what} is empty; type a name such as 'watercolor_style'.")
    text = name.strip().replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or os.path.isabs(text):
        raise ACTInputError(
            f"The {what} {name!r} is an absolute path; give a name relative to the models folder, e.g. 'my_map'."
        )
    components = text.split("/")
    for component in components:
        if component in ("", ".", ".."):
            raise ACTInputError(
                f"The {what} {name!r} contains an empty, '.' or '..' path component; names must stay inside the "
                "models folder (subfolders like 'styles/watercolor' are fine)."
            )
        if component.startswith(".") or not _COMPONENT.match(component):
            raise ACTInputError(
                f"The {what} {name!r} has an unsupported part {component!r}: use letters, digits, spaces and "
                "_-+=,.()[]@, not starting with a dot."
            )
    lowered = components[-1].lower()
    if lowered.endswith(_OTHER_MODEL_EXTENSIONS):
        raise ACTInputError(
            f"The {what} {name!r} must be a {EXTENSION} file (other formats are not written)."
        )
    if lowered.endswith(EXTENSION):
        components[-1] = components[-1][: -len(EXTENSION)] + EXTENSION  # x.SAFETENSORS -> x.safetensors
    else:
        components[-1] += EXTENSION
    for component in components:
        if len(component.encode("utf-8")) > MAX_NAME_BYTES:
            raise ACTInputError(
                f"The {what} {name!r} has a part of {len(component.encode('utf-8'))} bytes; file and folder names "
                f"may have at most {MAX_NAME_BYTES}. Choose a shorter name."
            )
    return "/".join(components)


def target_path(base: str | os.PathLike, name: str, what: str = "file name") -> tuple[str, Path]:
    """(clean relative name, absolute path inside ``base``); refuses names that resolve outside ``base``."""
    relative = clean_name(name, what)
    root = Path(os.path.realpath(base))
    path = Path(os.path.realpath(root / relative))
    if os.path.commonpath([str(root), str(path)]) != str(root):
        raise ACTInputError(f"The {what} {name!r} resolves outside {str(root)!r}; pick a plain name.")
    return relative, path


def write_into_folder(
    kind: str, filename: str, overwrite: bool, what: str, write: Callable[[Path], object]
) -> str:
    """Write a file named ``filename`` into ComfyUI's ``kind`` folder with ``write(path)``; its clean name.

    Shared by the Save and Export nodes: the name is checked (no escaping the folder, no other
    extensions, not too long), an existing file needs ``overwrite`` and must be a regular file (not a
    FIFO, device or folder), subfolders are created. All before ``write`` does any work.
    """
    relative, path = target_path(save_folder(kind), filename, what)
    check_destination(path, f"The {what} {relative!r}")
    if path.exists() and not overwrite:
        raise ACTInputError(
            f"{relative} already exists in {kind}; turn on 'overwrite' or choose another file name."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return relative


def save_folder(kind: str) -> str:
    """First configured folder of ``kind`` ("act_maps" or "loras"); needs ComfyUI."""
    fp = _folder_paths()
    if fp is None:
        raise ACTInputError("Saving needs ComfyUI's folder_paths (run inside ComfyUI).")
    if kind == FOLDER:
        register_act_maps_folder()
    paths = fp.get_folder_paths(kind)
    if not paths:
        raise ACTInputError(f"ComfyUI has no '{kind}' folder configured.")
    return paths[0]


def map_path(name: str) -> str:
    """Full path of a listed map file (``folder_paths.get_full_path_or_raise``), after checking the name."""
    fp = _folder_paths()
    if fp is None:
        raise ACTInputError("Loading needs ComfyUI's folder_paths (run inside ComfyUI).")
    register_act_maps_folder()
    relative = clean_name(name, "map name")
    try:
        return fp.get_full_path_or_raise(FOLDER, relative)
    except FileNotFoundError:
        raise ACTInputError(
            f"ACT map {name!r} was not found in the act_maps folder(s) {fp.get_folder_paths(FOLDER)}. "
            "Save one with 'Save ACT map' or copy a .safetensors map file there, then refresh."
        ) from None
