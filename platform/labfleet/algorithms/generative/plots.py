"""PNG figures of samples, logged to MLflow as images (matplotlib, no display needed)."""

from __future__ import annotations

import io
import math

import numpy as np


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt, fig) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def image_grid_png(images: np.ndarray, title: str) -> bytes:
    """(n, C, H, W) images in [0, 1] as one grid of tiles: grey for one channel (0 black, 1 white), colour
    for three (RGB) or four (RGBA, drawn without its alpha), on a mid-grey frame."""
    n, channels, h, w = images.shape
    shown = 1 if channels == 1 else 3
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, shown), 0.5)
    tiles = np.clip(images[:, :shown].transpose(0, 2, 3, 1), 0, 1)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = tiles[i]
    plt, fig = _figure(4, 4 * rows / cols + 0.4)
    ax = fig.add_subplot()
    if shown == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return _png(plt, fig)


def points_png(samples: np.ndarray, modes: np.ndarray, title: str) -> bytes:
    """2-D samples over the mixture's modes."""
    plt, fig = _figure(4, 4)
    ax = fig.add_subplot()
    ax.scatter(samples[:, 0], samples[:, 1], s=3, alpha=0.4, label="samples")
    ax.scatter(modes[:, 0], modes[:, 1], s=30, c="C3", marker="x", label="modes")
    span = float(np.abs(modes).max()) * 1.4
    ax.set_xlim(-span, span)
    ax.set_ylim(-span, span)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _png(plt, fig)
