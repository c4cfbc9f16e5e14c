"""The package version. pyproject.toml states it too (the ComfyUI registry reads it there);
tests/test_packaging.py keeps the two equal."""

__version__ = "0.2.0"
