"""Task interference to TensorBoard: cosines, norms, conflict count and a heatmap.

From the all-reduced Gram matrix ``G`` alone (``SurgeryStats.gram``), so it costs
nothing beyond the per-task backward passes of the steps that measure
(``gradients.monitor_every``). Call it on rank 0 only (every rank holds the same ``G``).

Tags (namespaced like every megamt metric)::

    grad/cos/<task_a>/<task_b>   cosine of the two tasks' gradients (a < b in task order)
    grad/norm/<task>             norm of the task's loss gradient
    grad/conflicts               pairs with a negative cosine
    grad/cos_heatmap             the cosine matrix as an image
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megamt.gradients.methods import cosine_matrix


def interference_scalars(task_names: Sequence[str], gram: Tensor, present: Optional[Tensor] = None) -> dict[str, float]:
    """The scalars of one measurement: ``{tag: value}`` (tasks absent from the step are skipped)."""
    names = list(task_names)
    T = len(names)
    if gram.shape != (T, T):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected ({T}, {T}) for tasks {names}")
    G = gram.detach().double().cpu()
    here = (G.diagonal() > 0) if present is None else present.detach().cpu().bool()
    cos = cosine_matrix(G)
    out: dict[str, float] = {}
    conflicts = 0
    for a in range(T):
        if not here[a]:
            continue
        out[f"grad/norm/{names[a]}"] = float(G[a, a].clamp_min(0).sqrt())
        for b in range(a + 1, T):
            if here[b]:
                out[f"grad/cos/{names[a]}/{names[b]}"] = float(cos[a, b])
                conflicts += int(cos[a, b] < 0)
    out["grad/conflicts"] = float(conflicts)
    return out


def draw_matrix(fig, ax, names: Sequence[str], m: np.ndarray, vmin: float, vmax: float, fmt: str = ".2f") -> None:
    """One task x task matrix on ``ax``: diverging colours, task names on both axes, the values
    written in the cells for up to 12 tasks (NaN cells blank), a colour bar."""
    names = list(names)
    im = ax.imshow(m, cmap="RdBu", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)


def figure_chw(fig) -> np.ndarray:
    """A matplotlib figure as ``uint8 [3, H, W]`` (what TensorBoard's ``add_image`` takes); closes it."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].transpose(2, 0, 1).copy()
    plt.close(fig)
    return img


def cosine_heatmap(task_names: Sequence[str], cos: Tensor, present: Optional[Tensor] = None) -> np.ndarray:
    """The cosine matrix as an RGB image, ``uint8 [3, H, W]`` (CHW, what ``add_image`` takes)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(task_names)
    c = cos.detach().double().cpu().numpy().copy()
    if present is not None:
        mask = ~present.detach().cpu().numpy().astype(bool)
        c[mask, :] = np.nan
        c[:, mask] = np.nan
    size = 1.2 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=80)
    draw_matrix(fig, ax, names, c, -1, 1)
    ax.set_title("task gradient cosine")
    fig.tight_layout()
    return figure_chw(fig)


def log_task_gradients(writer, step: int, task_names: Sequence[str], gram: Tensor,
                       present: Optional[Tensor] = None, heatmap: bool = True) -> dict[str, float]:
    """Write the interference scalars (and the heatmap) of ``gram`` at ``step``; returns the scalars.

    ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
    ``add_scalar`` / ``add_image``); ``None`` only computes the scalars.
    """
    scalars = interference_scalars(task_names, gram, present)
    if writer is not None:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
        if heatmap:
            writer.add_image("grad/cos_heatmap", cosine_heatmap(task_names, cosine_matrix(gram), present), step,
                             dataformats="CHW")
    return scalars
