"""A small CNN that reads shape, colour and style off a demo image: the demo's automatic judge.

Trained only on generator images (never on model samples), so its verdict on a generated image is an
independent check: style score = P(target colour or style), content kept = shape accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .shapes import ATTRIBUTES, DRAW_STYLES, IMAGE_SIZE, DrawStyle, make_dataset

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class AttributeClassifier(nn.Module):
    """Four conv stages and one linear head per attribute; input (B, 3, H, W) floats in [0, 1]."""

    def __init__(self, labels: dict[str, Sequence[str]], width: int = 16, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.labels = {k: list(v) for k, v in labels.items()}
        self.width = width
        self.image_size = image_size
        chans = [3, width, width * 2, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, len(v)) for k, v in self.labels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features((x - 0.5) / 0.25))
        return {k: head(h) for k, head in self.heads.items()}

    def config(self) -> dict:
        return {"labels": self.labels, "width": self.width, "image_size": self.image_size}


def to_tensor(
    images: torch.Tensor | np.ndarray | Sequence[Image.Image], size: int = IMAGE_SIZE
) -> torch.Tensor:
    """PIL images, uint8 (B, H, W, 3) arrays, or float (B, 3, H, W) tensors in [0, 1] -> float (B, 3, size, size)."""
    if isinstance(images, torch.Tensor):
        x = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(im.convert("RGB")) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def predict_proba(
    model: AttributeClassifier,
    images: torch.Tensor | np.ndarray | Sequence[Image.Image],
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-head class probabilities, (B, n_classes) each, columns in `model.labels[head]` order."""
    model.eval()
    x = to_tensor(images, model.image_size)
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in model.labels}
    for i in range(0, len(x), batch_size):
        for k, logits in model(x[i : i + batch_size]).items():
            outs[k].append(logits.softmax(-1))
    return {k: torch.cat(v) for k, v in outs.items()}


def score(
    model: AttributeClassifier,
    images: torch.Tensor | np.ndarray | Sequence[Image.Image],
    head: str,
    label: str,
) -> torch.Tensor:
    """P(`label`) under `head` for each image, e.g. score(clf, imgs, "colour", "purple")."""
    probs = predict_proba(model, images)[head]
    return probs[:, model.labels[head].index(label)]


def accuracy(
    model: AttributeClassifier, images, labels: dict[str, np.ndarray | Sequence[int]]
) -> dict[str, float]:
    """Top-1 accuracy per head; `labels` holds class indices per head."""
    probs = predict_proba(model, images)
    return {k: float((probs[k].argmax(-1).numpy() == np.asarray(labels[k])).mean()) for k in labels}


def save_classifier(model: AttributeClassifier, folder: str | Path, extra: dict | None = None) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({**model.config(), **(extra or {})}, indent=2) + "\n")


def load_classifier(folder: str | Path) -> AttributeClassifier:
    """Load the shipped classifier (eval mode, float32, CPU)."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no classifier at {folder}; run scripts/train_demo_model.py to train one")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    model = AttributeClassifier(cfg["labels"], width=cfg["width"], image_size=cfg["image_size"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()


def train_classifier(
    seed: int,
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 2e-3,
    pool_size: int = 20000,
    log: Callable[[str], None] = print,
    draw: DrawStyle = DRAW_STYLES["default"],
) -> AttributeClassifier:
    """Fit on a fixed pool of generator images (seeded), with light noise/blur so blurrier samples still read."""
    torch.manual_seed(seed)
    model = AttributeClassifier(ATTRIBUTES)
    images, _, labels = make_dataset(pool_size, seed=seed, draw=draw)
    x_all = to_tensor(images)
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, pool_size, (batch_size,), generator=gen)
        x = _augment(x_all[idx], gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return model.eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch blurred a little, all of it with mild pixel noise."""
    blur = torch.rand(len(x), generator=gen) < 0.5
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x = x.clone()
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    noise = torch.randn(x.shape, generator=gen) * 0.03
    return (x + noise).clamp(0, 1)
