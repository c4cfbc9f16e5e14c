"""``python -m act_core.demo``: the main job (see run_demo.py)."""

from .run_demo import main

main()
