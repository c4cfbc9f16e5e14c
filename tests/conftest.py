import sys
from pathlib import Path

import torch

# Tests import their helpers as a plain module; the repo root is the ComfyUI package, not on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
