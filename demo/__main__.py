"""``python -m demo``: the main job (see run_demo.py)."""

from .run_demo import main

main()
