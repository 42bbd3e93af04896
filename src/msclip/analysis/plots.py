"""Line plots of per-layer statistics (matplotlib Agg), written with msclip.io."""
from __future__ import annotations

import os
from pathlib import Path

from msclip import io as mio


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    plt = pyplot()
    try:
        return mio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def save_layer_plot(rows: list[dict], key: str, ylabel: str, path: str | os.PathLike) -> Path:
    """`rows[i][key]` against `rows[i]["layer"]`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["layer"] for r in rows], [r[key] for r in rows], marker="o")
    ax.set_xlabel("trunk layer")
    ax.set_ylabel(ylabel)
    if key == "nmi":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
