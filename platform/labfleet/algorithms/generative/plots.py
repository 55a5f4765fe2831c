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
    """(n, C, H, W) images in [0, 1] as one grid of gray tiles."""
    n, _, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1))
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images[i, 0]
    plt, fig = _figure(4, 4 * rows / cols + 0.4)
    ax = fig.add_subplot()
    ax.imshow(np.clip(grid, 0, 1), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
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
