"""Pictures of a run: expert-load heatmaps (experts x steps, one panel per MoE layer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_heatmap(steps: list[int], counts: np.ndarray, path: Path, title: str = "") -> Path:
    """counts: (steps, layers, experts). Colour = load relative to the mean (1.0 = balanced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=np.float64)
    n_layers = counts.shape[1]
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 2.2 * n_layers + 0.6), squeeze=False, sharex=True)
    for layer in range(n_layers):
        rel = counts[:, layer, :] / np.maximum(counts[:, layer, :].mean(axis=1, keepdims=True), 1e-9)
        ax = axes[layer, 0]
        im = ax.imshow(
            rel.T,
            aspect="auto",
            cmap="magma",
            vmin=0.0,
            vmax=max(2.0, float(rel.max())),
            extent=(steps[0] - 0.5, steps[-1] + 0.5, rel.shape[1] - 0.5, -0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        fig.colorbar(im, ax=ax, label="load / mean")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or "expert load")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
