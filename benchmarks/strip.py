"""A picture for the README: real vs generated frames of one open-loop rollout per world.

Each world gets two rows, the logged frames and the world model's, every ``every``-th step of the
rollout (driven by the logged actions from the same K real frames), upscaled for the eye and
labelled with the world, the row and the steps.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

SCALE, LABEL_W, GAP = 2, 150, 6


def save_strip(path: str, rollouts: dict[str, tuple[np.ndarray, np.ndarray]], *, every: int = 4) -> str:
    """``rollouts``: world -> (real uint8 [T, H, W, 3], generated uint8 [T, H, W, 3]); writes a PNG."""
    rows = []
    for world, (real, generated) in rollouts.items():
        if real.shape != generated.shape:
            raise ValueError(f"{world}: real {real.shape} and generated {generated.shape} frames differ")
        steps = list(range(every - 1, len(real), every))
        for name, frames in (("real", real), ("world model", generated)):
            rows.append((f"{world}\n{name}", np.concatenate([frames[t] for t in steps], axis=1), steps))
    height = max(r[1].shape[0] for r in rows) * SCALE
    width = LABEL_W + max(r[1].shape[1] for r in rows) * SCALE
    canvas = Image.new("RGB", (width, 14 + len(rows) * (height + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((LABEL_W, 1), "steps " + ", ".join(f"+{t + 1}" for t in rows[0][2]), fill="black")
    for i, (label, strip, _) in enumerate(rows):
        y = 14 + i * (height + GAP)
        image = Image.fromarray(strip).resize((strip.shape[1] * SCALE, strip.shape[0] * SCALE), Image.NEAREST)
        canvas.paste(image, (LABEL_W, y))
        draw.text((4, y + height // 3), label, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)
    return path
