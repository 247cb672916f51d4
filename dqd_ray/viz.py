"""Archive heatmaps and QD-score curves (matplotlib, headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def archive_grid(index: np.ndarray, objective: np.ndarray, dims) -> np.ndarray:
    """Objectives on a 2-D image: 1-D archives become a strip; 4-D (Ant) archives
    become nested grids (outer: measures 0 and 1, inner: measures 2 and 3)."""
    dims = [int(d) for d in dims]
    flat = np.full(int(np.prod(dims)), np.nan)
    flat[np.asarray(index, np.int64)] = objective
    grid = flat.reshape(dims)
    if len(dims) == 1:
        return grid[None, :]
    if len(dims) == 2:
        return grid.T  # measure 0 on x, measure 1 on y
    if len(dims) == 4:
        a, b, c, d = dims
        return grid.transpose(1, 3, 0, 2).reshape(b * d, a * c)
    return grid.reshape(dims[0], -1).T


def heatmap(archive: dict, dims, path=None, title: str = "", names=None):
    """Draws the archive; returns the figure (saved to ``path`` if given)."""
    img = archive_grid(archive["index"], archive["objective"], dims)
    fig, ax = plt.subplots(figsize=(6, 5 if len(dims) != 1 else 2.2))
    im = ax.imshow(img, origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fitness")
    if names and len(dims) == 2:
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.set_title(title or f"archive: {len(archive['objective'])} elites")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
    return fig


def qd_curve(metrics: list[dict], path, key: str = "qd_score"):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["evaluations"] for m in metrics], [m[key] for m in metrics])
    ax.set_xlabel("evaluations")
    ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
