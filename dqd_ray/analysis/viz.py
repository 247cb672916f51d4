"""Archive heatmaps, QD curves and histograms (matplotlib, headless).

- 1-D and 2-D archives: pyribs' grid heatmap, axes in measure units;
- 4-D archives (QD Ant): a grid of 2-D slices, measures 0 and 1 across the
  slices, measures 2 and 3 within each, one shared colour scale;
- curves of QD score, coverage and best fitness against evaluations or wall
  time, one line per run, or the mean and spread of the runs of one preset.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CMAP = "viridis"


def archive_grid(index: np.ndarray, objective: np.ndarray, dims) -> np.ndarray:
    """Objectives on the grid, NaN where empty: an array of shape ``dims``."""
    dims = [int(d) for d in dims]
    flat = np.full(int(np.prod(dims)), np.nan)
    flat[np.asarray(index, np.int64)] = objective
    return flat.reshape(dims)


def _ranges(dims, ranges):
    return [tuple(map(float, r)) for r in ranges] if ranges is not None else \
        [(0.0, 1.0)] * len(dims)


def _names(dims, names):
    """Axis labels: ``front_left_foot`` reads "front left foot contact"."""
    if not names:
        return [f"measure {i}" for i in range(len(dims))]
    return [n.replace("_", " ") + (" contact" if n.endswith("foot") else "") for n in names]


def _pyribs_heatmap(archive: dict, dims, ranges, names, ax, vmin, vmax) -> None:
    from ribs.archives import GridArchive
    from ribs.visualize import grid_archive_heatmap

    grid = GridArchive(solution_dim=1, dims=list(dims), ranges=ranges)
    n = len(archive["objective"])
    if n:
        grid.add(solution=np.zeros((n, 1)), objective=np.asarray(archive["objective"]),
                 measures=np.asarray(archive["measures"]))
    grid_archive_heatmap(grid, ax=ax, cmap=CMAP, vmin=vmin, vmax=vmax,
                         cbar_kwargs={"label": "fitness"})
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1] if len(dims) == 2 else "")


def sliced_canvas(grid: np.ndarray) -> np.ndarray:
    """A 4-D grid ``(a, b, c, d)`` as one 2-D image: ``b`` rows by ``a`` columns
    of ``d x c`` slices (measure 1 up, measure 0 across; within a slice measure
    3 up, measure 2 across), one NaN row and column between slices. Row 0 is
    the bottom (``origin="lower"``)."""
    a, b, c, d = grid.shape
    canvas = np.full((b * (d + 1) - 1, a * (c + 1) - 1), np.nan)
    for j in range(b):
        for i in range(a):
            canvas[j * (d + 1):j * (d + 1) + d, i * (c + 1):i * (c + 1) + c] = grid[i, j].T
    return canvas


def _sliced_heatmap(archive: dict, dims, ranges, names, fig, vmin, vmax) -> None:
    """A 4-D grid as dims[1] x dims[0] slices of dims[3] x dims[2] cells, drawn
    as one image (one axes instead of one per slice: a fraction of the time)."""
    from matplotlib.collections import LineCollection

    a, b, c, d = dims
    grid = archive_grid(archive["index"], archive["objective"], dims)
    ax = fig.add_axes([0.14, 0.12, 0.72, 0.78])
    cmap = plt.get_cmap(CMAP).with_extremes(bad="white")
    image = ax.imshow(sliced_canvas(grid), origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest", extent=(
                          -0.5, a * (c + 1) - 1.5, -0.5, b * (d + 1) - 1.5))
    # A black frame around each slice, all in one collection.
    frames = []
    for j in range(b):
        for i in range(a):
            x0, y0 = i * (c + 1) - 0.5, j * (d + 1) - 0.5
            x1, y1 = x0 + c, y0 + d
            frames.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    ax.add_collection(LineCollection(frames, colors="black", linewidths=1.0))
    for spine in ax.spines.values():
        spine.set_visible(False)
    edges = [np.linspace(lo, hi, n + 1) for (lo, hi), n in zip(ranges, dims)]
    ax.set_xticks([i * (c + 1) + (c - 1) / 2 for i in range(a)],
                  [f"{edges[0][i]:.2f}-{edges[0][i + 1]:.2f}" for i in range(a)], fontsize=6)
    ax.set_yticks([j * (d + 1) + (d - 1) / 2 for j in range(b)],
                  [f"{edges[1][j]:.2f}-{edges[1][j + 1]:.2f}" for j in range(b)], fontsize=6)
    ax.tick_params(length=0)
    within = (f"within a slice (x): {names[2]} {ranges[2][0]:g}-{ranges[2][1]:g}",
              f"within a slice (y): {names[3]} {ranges[3][0]:g}-{ranges[3][1]:g}")
    fig.supxlabel(f"across slices: {names[0]}    {within[0]}", fontsize=8)
    fig.supylabel(f"across slices: {names[1]}    {within[1]}", fontsize=8)
    cax = fig.add_axes([0.89, 0.12, 0.025, 0.78])
    fig.colorbar(image, cax=cax, label="fitness")


def heatmap(archive: dict, dims, path=None, title: str = "", names=None, ranges=None,
            vmin: float | None = None, vmax: float | None = None):
    """Draws an archive (``index``, ``objective``, ``measures`` arrays); returns the
    figure, also saved to ``path`` if given."""
    dims = [int(x) for x in dims]
    ranges, names = _ranges(dims, ranges), _names(dims, names)
    objective = np.asarray(archive["objective"], np.float64)
    if vmin is None and len(objective):
        vmin = float(objective.min())
    if vmax is None and len(objective):
        vmax = float(objective.max())
    if len(dims) == 4:
        fig = plt.figure(figsize=(8.5, 8))
        _sliced_heatmap(archive, dims, ranges, names, fig, vmin, vmax)
    elif len(dims) in (1, 2):
        fig, ax = plt.subplots(figsize=(6.5, 5 if len(dims) == 2 else 2.4))
        _pyribs_heatmap(archive, dims, ranges, names, ax, vmin, vmax)
    else:  # any other dimension: the flattened grid
        fig, ax = plt.subplots(figsize=(6.5, 5))
        grid = archive_grid(archive["index"], objective, dims).reshape(dims[0], -1).T
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap=CMAP, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, label="fitness")
        ax.set_xlabel(names[0])
    fig.suptitle(title or f"archive: {len(objective)} elites", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


CURVE_KEYS = (("qd_score", "QD score"), ("coverage", "coverage"),
              ("best_fitness", "best fitness"))
X_KEYS = {"evaluations": "evaluations", "wall_s": "wall time (s)"}


def _series(metrics: list[dict], x: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(m[x], m[key]) for m in metrics if m.get(x) is not None and m.get(key) is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(rows, np.float64)
    return arr[:, 0], arr[:, 1]


def curves(runs: list[dict], x: str, path):
    """QD score, coverage and best fitness against ``x`` (``evaluations`` or ``wall_s``).

    Args:
        runs: Dicts with ``label`` (one line), ``group`` (runs of one group are
            drawn as their mean and min-max spread when there are several) and
            ``metrics`` (the run's metric lines).
        x: The x axis key.
        path: Where the PNG goes.
    """
    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(5 * len(CURVE_KEYS), 4))
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["group"], []).append(run)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(groups) > len(colours):  # one colour per group, and dashes past tab10's ten
        colours = list(plt.get_cmap("tab20").colors)
    styles = ["-", "--"]
    for ax, (key, name) in zip(axes, CURVE_KEYS):
        for gi, (group, members) in enumerate(groups.items()):
            colour = colours[gi % len(colours)]
            style = styles[(gi // 10) % 2] if len(groups) > 10 else "-"
            series = [_series(r["metrics"], x, key) for r in members]
            series = [s for s in series if len(s[0])]
            if not series:
                continue
            if len(series) == 1:
                ax.plot(*series[0], color=colour, linestyle=style, label=members[0]["label"])
                continue
            end = min(s[0][-1] for s in series)
            start = max(s[0][0] for s in series)
            grid = np.linspace(start, end, 200) if end > start else np.array([end])
            ys = np.stack([np.interp(grid, sx, sy) for sx, sy in series])
            ax.plot(grid, ys.mean(axis=0), color=colour, linestyle=style,
                    label=f"{group} (mean of {len(series)} seeds)")
            ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=colour, alpha=0.2,
                            linewidth=0)
        ax.set_xlabel(X_KEYS.get(x, x))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histogram(values: np.ndarray, path, xlabel: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    values = np.asarray(values, np.float64)
    ax.hist(values[np.isfinite(values)], bins=min(40, max(5, len(values) // 5)),
            color="#3b528b")
    ax.axvline(float(np.nanmean(values)) if len(values) else 0.0, color="black", ls="--",
               label="mean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("elites")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def qd_curve(metrics: list[dict], path, key: str = "qd_score"):
    """One metric of one run against evaluations."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(metrics, "evaluations", key))
    ax.set_xlabel("evaluations")
    ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
