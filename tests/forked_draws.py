"""A target for processes forked by essaim.flower_warm in tests (each child imports it by name)."""

from pathlib import Path


def write_draws(path: str) -> None:
    import numpy as np
    import torch

    Path(path).write_text(f"{np.random.random()!r} {torch.rand(1).item()!r}")
