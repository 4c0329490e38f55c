"""The paper's three figure families, drawn with matplotlib's Agg backend into PNG bytes.

1. utility: per-method AUPRC box plots (trained, untrained network) against the average-mask
   prior and the localization network, and example overlays with the ground-truth outline;
2. randomization: mean SSIM to the trained map per cascading state with its 95 % band and the
   random-pair baseline, and one image's maps across the states;
3. agreement: repeatability and reproducibility SSIM box plots with the threshold and the
   localization-network baseline, and the same image's maps from each replicate / architecture.

Volumes ``[D, H, W]`` are drawn as three orthogonal slices through the lesion and a maximum-intensity
projection (:func:`lesion_centre`, :func:`volume_views`): in the example grids each panel is a
:func:`volume_mosaic` (axial | coronal over sagittal | MIP, physical aspect kept), and
:func:`volume_views_figure` draws the example volume's views one per panel, with titles.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from saliency_trust.methods import LABELS

#: The labels people read, from the one method table (``saliency_trust.methods.LABELS``); kept under this name.
METHOD_LABELS = LABELS
MAP_CMAP = "inferno"  # perceptually uniform, readable in grey


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _finite(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v[np.isfinite(v)]


def _box(ax, groups: Sequence[np.ndarray], labels: Sequence[str], colors: Sequence[str]) -> None:
    data = [_finite(g) if len(_finite(g)) else np.array([np.nan]) for g in groups]
    bp = ax.boxplot(data, patch_artist=True, widths=0.6, showfliers=True)
    for patch, c in zip(bp["boxes"], colors, strict=True):
        patch.set_facecolor(c)
        patch.set_alpha(0.75)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=35, ha="right", fontsize=8)


def _outline(ax, mask: np.ndarray) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="cyan", linewidths=1.0)


def _overlay(ax, image: np.ndarray, sal: np.ndarray | None, mask: np.ndarray | None, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    if sal is not None:
        ax.imshow(sal, cmap=MAP_CMAP, vmin=0, vmax=1, alpha=0.55)
    if mask is not None:
        _outline(ax, mask)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def utility_figure(methods: Sequence[str], auprc: Mapping[str, np.ndarray], untrained: Mapping[str, np.ndarray],
                   prior: np.ndarray, *, localization: np.ndarray | None, image: np.ndarray, mask: np.ndarray,
                   maps: Mapping[str, np.ndarray], example_id: str, example: int = 0) -> bytes:
    """Box plots of per-image AUPRC per method with both baselines, and overlays of image ``example``."""
    plt = _plt()
    fig = plt.figure(figsize=(max(8, 1.6 * len(methods) + 2), 7.2))
    ax = fig.add_axes((0.07, 0.48, 0.9, 0.47))
    groups, labels, colors = [], [], []
    for m in methods:
        groups += [auprc[m], untrained[m]]
        labels += [f"{METHOD_LABELS.get(m, m)}", f"{m} untrained"]
        colors += ["#3b75af", "#bbbbbb"]
    groups.append(prior)
    labels.append("average-mask prior")
    colors.append("#e08a2c")
    if localization is not None:
        groups.append(localization)
        labels.append("localization net")
        colors.append("#4a9a4a")
    _box(ax, groups, labels, colors)
    ax.axhline(float(np.nanmean(prior)), color="#e08a2c", ls="--", lw=1, label="prior mean")
    ax.set_ylabel("AUPRC per image")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Localization utility: AUPRC against the ground truth (higher is better)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    n = len(methods) + 1
    for k in range(n):
        a = fig.add_axes((0.02 + k * 0.96 / n, 0.02, 0.96 / n - 0.01, 0.33))
        if k == 0:
            _overlay(a, image, None, mask, f"{example_id}\nground truth")
        else:
            m = methods[k - 1]
            _overlay(a, image, maps[m], mask, f"{METHOD_LABELS.get(m, m)}\nAUPRC {float(auprc[m][example]):.2f}")
    return _png(fig)


def randomization_figure(methods: Sequence[str], states: Sequence[str], ssim: Mapping[str, np.ndarray],
                         baseline: Mapping[str, float], *, verdict_state: str | None = None,
                         replicates: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Mean SSIM to the trained map per cascading state, with the baseline.

    With ``replicates`` (per method ``[R, S]``: each randomized replicate's mean over images per
    state) and R >= 2 the curve is the mean over replicates with a +- SD band, as the paper drew it;
    otherwise the mean over images of ``ssim`` (``[S, N]``) with its 95 % band. A dotted vertical line
    marks the state the verdict reads; states after it (beyond the paper's cascade) are shaded.
    """
    plt = _plt()
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), squeeze=False, sharey=True)
    x = np.arange(len(states) + 1)
    for k, m in enumerate(methods):
        ax = axes[k // cols][k % cols]
        reps = np.asarray(replicates[m], dtype=float) if replicates is not None and m in replicates else None
        if reps is not None and reps.shape[0] >= 2:  # the paper's band: mean +- SD over replicates
            mean = np.concatenate([[1.0], np.nanmean(reps, 0)])
            half = np.concatenate([[0.0], np.nanstd(reps, 0, ddof=1)])
        else:
            per_state = np.asarray(ssim[m], dtype=float)  # [S, N]
            mean = np.concatenate([[1.0], np.nanmean(per_state, 1)])
            sd = np.concatenate([[0.0], np.nanstd(per_state, 1)])
            nn = np.concatenate([[1], np.isfinite(per_state).sum(1)])
            half = 1.96 * sd / np.sqrt(np.maximum(nn, 1))
        ax.plot(x, mean, "o-", ms=3, color="#3b75af")
        ax.fill_between(x, mean - half, mean + half, color="#3b75af", alpha=0.25)
        if np.isfinite(baseline[m]):
            ax.axhline(baseline[m], color="#c0392b", ls="--", lw=1)
        if verdict_state in states:
            k_v = list(states).index(verdict_state) + 1
            ax.axvline(k_v, color="#555", ls=":", lw=1)
            if k_v < len(states):
                ax.axvspan(k_v + 0.5, len(states) + 0.5, color="#999", alpha=0.15, lw=0)
        ax.set_title(METHOD_LABELS.get(m, m), fontsize=9)
        ax.set_xticks(x, ["trained", *states], rotation=90, fontsize=6)
        ax.set_ylim(-0.1, 1.05)
        if k % cols == 0:
            ax.set_ylabel("SSIM to trained map")
    for k in range(len(methods), rows * cols):
        axes[k // cols][k % cols].axis("off")
    band = ("mean +- SD over the randomized replicates" if replicates is not None
            and any(np.asarray(v).shape[0] >= 2 for v in replicates.values()) else "95 % band over images")
    fig.suptitle(f"Cascading randomization, top block first ({band}; dashed: SSIM between maps of different "
                 "images; dotted: the state the verdict reads; shaded: beyond the paper's cascade)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def state_examples_figure(methods: Sequence[str], states: Sequence[str], image: np.ndarray,
                          trained: Mapping[str, np.ndarray], *, per_state: Mapping[str, np.ndarray]) -> bytes:
    """One image's map per method (rows) for the trained model and each randomized state (columns)."""
    plt = _plt()
    cols = len(states) + 1
    fig, axes = plt.subplots(len(methods), cols, figsize=(1.15 * cols, 1.2 * len(methods)), squeeze=False)
    for r, m in enumerate(methods):
        for c in range(cols):
            ax = axes[r][c]
            sal = trained[m] if c == 0 else per_state[m][c - 1]
            ax.imshow(sal, cmap=MAP_CMAP, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("trained" if c == 0 else states[c - 1], fontsize=5, rotation=60, ha="left")
            if c == 0:
                ax.set_ylabel(m, fontsize=7)
    fig.subplots_adjust(wspace=0.03, hspace=0.05)
    return _png(fig)


def agreement_figure(methods: Sequence[str], repeat: Mapping[str, np.ndarray], reprod: Mapping[str, np.ndarray], *,
                     baseline: np.ndarray | None, threshold: float,
                     repeat_chance: Mapping[str, np.ndarray] | None = None,
                     reprod_chance: Mapping[str, np.ndarray] | None = None) -> bytes:
    """Repeatability and reproducibility SSIM box plots with chance, the U-Net baseline and the 0.5 line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(methods) * 2), 4), squeeze=False, sharey=True)
    panels = ((axes[0][0], repeat, repeat_chance or {}, "Repeatability: replicate vs replicate"),
              (axes[0][1], reprod, reprod_chance or {}, "Reproducibility: two architectures"))
    for ax, values, chance, title in panels:
        if not values:
            ax.text(0.5, 0.5, "not assessed", ha="center", va="center")
            ax.set_title(title, fontsize=9)
            continue
        groups = [values[m] for m in methods]
        labels = [METHOD_LABELS.get(m, m) for m in methods]
        colors = ["#3b75af"] * len(methods)
        if baseline is not None:
            groups.append(baseline)
            labels.append("localization net")
            colors.append("#4a9a4a")
        _box(ax, groups, labels, colors)
        for k, m in enumerate(methods):
            c = chance.get(m)
            if c is not None and np.isfinite(c).any():
                ax.plot([k + 0.7, k + 1.3], [np.nanmean(c)] * 2, color="#777", lw=2,
                        label="chance (different images)" if k == 0 else None)
        ax.axhline(threshold, color="#c0392b", ls="--", lw=1, label=f"paper's reference line {threshold}")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(-0.1, 1.05)
        ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("SSIM per image")
    fig.tight_layout()
    return _png(fig)


def agreement_examples_figure(methods: Sequence[str], image: np.ndarray, columns: Mapping[str, Mapping]) -> bytes:
    """The same image's maps per method (rows) from each model (columns: replicate A, B, other arch)."""
    plt = _plt()
    names = list(columns)
    fig, axes = plt.subplots(len(methods), len(names), figsize=(1.5 * len(names), 1.35 * len(methods)),
                             squeeze=False)
    for r, m in enumerate(methods):
        for c, name in enumerate(names):
            _overlay(axes[r][c], image, columns[name][m], None, name if r == 0 else "")
            if c == 0:
                axes[r][c].text(-0.08, 0.5, m, transform=axes[r][c].transAxes, rotation=90, va="center",
                                ha="right", fontsize=7)
    fig.subplots_adjust(wspace=0.03, hspace=0.08)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------
# Volumes: three orthogonal slices through the lesion and a maximum-intensity projection

#: The four views of a volume, in the order :func:`volume_views` gives them.
VIEWS = ("axial", "coronal", "sagittal", "MIP")


def lesion_centre(mask: np.ndarray) -> tuple[int, int, int]:
    """The ``(z, y, x)`` slices a volume's figures cut through: along each axis the slice through the lesion mask's
    centre of mass, or, where that slice misses the lesion (two lesions apart), the slice with the largest
    cross-section of it; the volume's centre when the mask is empty."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"expected a [D, H, W] mask, got shape {m.shape}")
    if not m.any():
        return tuple(n // 2 for n in m.shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        area = m.sum(axis=other)
        com = int(round(float((np.arange(m.shape[axis]) * area).sum() / area.sum())))
        centre.append(com if area[com] > 0 else int(np.argmax(area)))
    return tuple(centre)  # type: ignore[return-value]


def volume_views(volume: np.ndarray, centre: tuple[int, int, int], *, projection: str = "max") -> list[np.ndarray]:
    """The :data:`VIEWS` of ``volume`` ``[D, H, W]``: the axial (``[H, W]``), coronal (``[D, W]``) and sagittal
    (``[D, H]``) slices through ``centre``, and the projection along z (``[H, W]``): the maximum (``"max"``,
    maps and CT) or, for a mask, ``"any"`` (its outline is where the lesion lies in any slice)."""
    v = np.asarray(volume)
    z, y, x = centre
    proj = v.any(axis=0) if projection == "any" else v.max(axis=0)
    return [v[z], v[:, y, :], v[:, :, x], proj]


def _stretch(panel: np.ndarray, rows: float, order: int) -> np.ndarray:
    """``panel`` with its rows resampled by the factor ``rows`` (z spacing over in-plane spacing)."""
    if abs(rows - 1.0) < 1e-6:
        return panel
    from scipy import ndimage

    n = max(1, int(round(panel.shape[0] * rows)))
    out = ndimage.zoom(panel.astype(np.float64), (n / panel.shape[0], 1.0), order=order, mode="nearest",
                       grid_mode=True)
    return out.astype(panel.dtype) if panel.dtype == bool else out


def volume_mosaic(volume: np.ndarray, centre: tuple[int, int, int], spacing: tuple[float, float, float] | None = None,
                  *, kind: str = "map") -> np.ndarray:
    """One 2-D picture of a volume: axial | coronal over sagittal | MIP (:func:`volume_views`), the slices through
    ``centre``, rows of the coronal and sagittal views stretched to the physical aspect (``spacing`` z, y, x mm).

    ``kind``: ``"map"`` (gaps NaN, so an overlay leaves them clear), ``"image"`` (gaps 0) or ``"mask"`` (bool,
    the projection panel the lesion in any slice). The 2-D figure functions draw it like an image.
    """
    if kind not in ("map", "image", "mask"):
        raise ValueError(f"kind must be 'map', 'image' or 'mask', got {kind!r}")
    views = volume_views(volume, centre, projection="any" if kind == "mask" else "max")
    rows = 1.0 if spacing is None else float(spacing[0]) / float(spacing[1])
    order = 0 if kind == "mask" else 1
    axial, coronal, sagittal, mip = views[0], _stretch(views[1], rows, order), _stretch(views[2], rows, order), views[3]
    fill = False if kind == "mask" else (np.nan if kind == "map" else 0.0)
    dtype = bool if kind == "mask" else np.float64
    h = max(axial.shape[0], coronal.shape[0]) + 1 + max(sagittal.shape[0], mip.shape[0])
    w = max(axial.shape[1], sagittal.shape[1]) + 1 + max(coronal.shape[1], mip.shape[1])
    out = np.full((h, w), fill, dtype=dtype)
    top = max(axial.shape[0], coronal.shape[0]) + 1
    left = max(axial.shape[1], sagittal.shape[1]) + 1
    for panel, (r, c) in zip((axial, coronal, sagittal, mip), ((0, 0), (0, left), (top, 0), (top, left)),
                             strict=True):
        out[r : r + panel.shape[0], c : c + panel.shape[1]] = panel
    return out


def volume_views_figure(methods: Sequence[str], image: np.ndarray, mask: np.ndarray, maps: Mapping[str, np.ndarray],
                        *, spacing: tuple[float, float, float] | None = None, example_id: str = "",
                        scores: Mapping[str, float] | None = None) -> bytes:
    """The example volume: one row for the CT with the lesion outline, then one per method, four columns: the axial,
    coronal and sagittal slices through the lesion (:func:`lesion_centre`) and the maximum-intensity projection
    of the map along z (the lesion's projection outlined)."""
    plt = _plt()
    centre = lesion_centre(mask)
    aspect = 1.0 if spacing is None else float(spacing[0]) / float(spacing[1])
    rows = len(methods) + 1
    d, h, w = np.asarray(image).shape
    row_height = 1.55 * max(h, d * aspect) / w + 0.2  # inches: four panels of about 1.55 in across, the tallest
    height = row_height * rows + 0.7
    fig, axes = plt.subplots(rows, 4, figsize=(7.2, height), squeeze=False)
    image_views = volume_views(image, centre)
    mask_views = volume_views(mask, centre, projection="any")
    for r in range(rows):
        m = methods[r - 1] if r else None
        sal_views = volume_views(maps[m], centre) if m else [None] * 4
        for c, view in enumerate(VIEWS):
            ax = axes[r][c]
            background = image_views[c] if c < 3 else image_views[3]
            ax.imshow(background, cmap="gray", vmin=0, vmax=1, aspect=aspect if c in (1, 2) else 1.0)
            if sal_views[c] is not None:
                ax.imshow(sal_views[c], cmap=MAP_CMAP, vmin=0, vmax=1, alpha=0.55 if c < 3 else 0.8,
                          aspect=aspect if c in (1, 2) else 1.0)
            _outline(ax, mask_views[c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                where = {"axial": f"z={centre[0]}", "coronal": f"y={centre[1]}", "sagittal": f"x={centre[2]}",
                         "MIP": "max over z"}[view]
                ax.set_title(f"{view} ({where})", fontsize=7)
            if c == 0:
                label = "CT + lesion" if m is None else METHOD_LABELS.get(m, m)
                if m is not None and scores and m in scores:
                    label += f"\nAUPRC {float(scores[m]):.2f}" if np.isfinite(scores[m]) else "\n(blank map)"
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"{example_id}: slices through the lesion (cyan outline) and the maps' maximum-intensity "
                 "projection", fontsize=8)
    fig.subplots_adjust(wspace=0.04, hspace=0.15, top=1.0 - 0.6 / height, bottom=0.01)
    return _png(fig)
