"""One figure style and one ``savefig`` that writes PNG and PDF with stable metadata (byte-identical reruns)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["style", "savefig", "identity_scatter", "moving_average", "image_grid", "loo_curve"]

STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "svg.hashsalt": "mpe",
}


def style() -> None:
    """Apply the companion's Matplotlib style (called by every notebook's setup cell)."""
    plt.rcParams.update(STYLE)


def savefig(fig, name: str, profile: str = "quick", root: str | Path | None = None) -> None:
    """Save ``fig`` as ``figures/<profile>/<name>.png`` and ``.pdf`` (or under ``root``), without version or date
    metadata. Returns nothing, so that a notebook cell ending in it shows no machine-specific paths."""
    from .harness import figures_dir

    out = figures_dir(profile) if root is None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "0")
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"Creator": None, "Producer": None, "CreationDate": None})


def identity_scatter(ax, x, y, label=None, **kw):
    """Scatter of estimate ``y`` against truth ``x`` with a dashed y = x line over the range of the truth (its 1st to
    99th percentile), so that a few outlying estimates do not stretch the diagonal and squash the data."""
    import numpy as np

    ax.scatter(x, y, s=kw.pop("s", 10), alpha=kw.pop("alpha", 0.7), label=label, **kw)
    xs = np.asarray(x, dtype=float)
    xs = xs[np.isfinite(xs)]
    lo, hi = (np.percentile(xs, [1, 99]) if xs.size else (0.0, 1.0))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    return ax


def moving_average(values, window: int):
    """Centred moving average with a shrinking window at the ends (same length as ``values``)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    half = window // 2
    return np.array([v[max(0, i - half):i + half + 1].mean() for i in range(len(v))])


def image_grid(ax, images, ncols: int, title: str = ""):
    """Show images (n, C, H, W) as one mosaic with ``ncols`` columns on ``ax``: grey (channel mean) unless C = 3,
    which is shown in colour, each image stretched to its own range (the images are normalised)."""
    import numpy as np

    imgs = np.asarray(images, dtype=float)
    n, c, h, w = imgs.shape
    colour = c == 3
    nrows = -(-n // ncols)
    mosaic = np.ones((nrows * (h + 1), ncols * (w + 1), 3)) if colour else np.full((nrows * (h + 1), ncols * (w + 1)),
                                                                                  np.nan)
    for k in range(n):
        r, q = divmod(k, ncols)
        cell = (slice(r * (h + 1), r * (h + 1) + h), slice(q * (w + 1), q * (w + 1) + w))
        if colour:
            img = imgs[k].transpose(1, 2, 0)
            mosaic[cell] = (img - img.min()) / max(np.ptp(img), 1e-12)
        else:
            mosaic[cell] = imgs[k].mean(0)
    ax.imshow(mosaic, cmap=None if colour else "gray_r")
    ax.set_title(title)
    ax.axis("off")


def loo_curve(ax, tracker, title: str = "", form: str = "diag"):
    """Test NLL per epoch (grey) and the LOO estimate at its checkpoints (black squares) of a ``LOOTracker``."""
    epochs, nll, _ = zip(*tracker.test)
    at, loo = zip(*tracker.loo)
    ax.plot(epochs, nll, color="0.6", lw=3, label="test NLL")
    ax.plot(at, [v[form] for v in loo], "ks-", ms=4, label="LOO estimate")
    ax.set(title=title, xlabel="epoch", ylabel="NLL")  # linear, as the paper's panels
    return ax


def evolution_curves(ax, binned, labels, title: str = ""):
    """Figs. 3(b)/11: one line per checkpoint of binned, sorted sensitivities (C, B); grey levels, earlier = thicker."""
    import numpy as np

    binned = np.asarray(binned)
    c = len(binned)
    for j, (row, lab) in enumerate(zip(binned, labels)):
        shade = 0.75 * (1 - j / max(c - 1, 1))
        ax.plot(np.arange(1, binned.shape[1] + 1), row, color=str(shade), lw=3.0 - 2.0 * j / max(c - 1, 1), label=lab)
    ax.set(title=title, xlabel="examples sorted by final sensitivity (bins)", ylabel="mean sensitivity per bin")
    return ax
