"""The shipped demo: a tiny SDXL-architecture model of coloured shapes, trained from scratch on CPU.

Modules: `shapes` (procedural data + caption grammar), `tokenizer` (offline CLIP BPE files), `model`
(component configs), `training` / `export` (used by scripts/train_demo_model.py), `classifier` (attribute
judge), `evaluation` (sampling + scoring), `paths` (where the weights live, offline loaders).
Importing this package imports neither diffusers nor transformers; the submodules that need them do.
"""
