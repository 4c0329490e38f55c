"""The assessment report: the paper's figures as PNG files and one self-contained ``report.html``.

``report.html`` embeds its figures (base64 PNG) and styles, so it opens from a mail attachment
or a PACS note without the folder beside it. The verdict table comes first; every number in it
is also in ``results.json``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saliency_trust.report import figures
from saliency_trust.results import CRITERIA, CRITERION_TITLES, Results, Verdict


@dataclass
class ReportInputs:
    """Per-image values and example maps behind the figures (numpy, CPU)."""

    ids: list[str]
    images: np.ndarray  # [N, H, W] in [0, 1] (volumes: [N, D, H, W], every map and mask likewise)
    masks: np.ndarray  # [N, H, W] bool
    methods: list[str]
    auprc: dict[str, np.ndarray]
    auprc_untrained: dict[str, np.ndarray]
    auprc_prior: np.ndarray
    auprc_localization: np.ndarray | None
    trained_maps: dict[str, np.ndarray]  # primary model, [N, H, W]
    states: list[str]
    verdict_state: str | None
    state_ssim: dict[str, np.ndarray]  # [S, N]
    state_baseline: dict[str, float]
    state_examples: dict[str, np.ndarray]  # [S, H, W] for image ``example``
    repeat: dict[str, np.ndarray]
    reprod: dict[str, np.ndarray]
    agreement_baseline: np.ndarray | None
    repeat_chance: dict[str, np.ndarray] = field(default_factory=dict)
    reprod_chance: dict[str, np.ndarray] = field(default_factory=dict)
    agreement_examples: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # column -> method -> [H, W]
    threshold: float = 0.5
    example: int = 0
    state_replicates: dict[str, np.ndarray] = field(default_factory=dict)  # [R, S]: each replicate's curve
    spacing: tuple[float, float, float] | None = None  # volumes: voxel spacing (z, y, x) mm, for the views' aspect

    @property
    def volumes(self) -> bool:
        """Whether the images are volumes ``[N, D, H, W]``."""
        return self.images.ndim == 4


def _atomic(path: Path, data: bytes) -> None:
    from saliency_trust.data.imageio import atomic_write_bytes

    atomic_write_bytes(path, data)


def render_figures(inputs: ReportInputs) -> dict[str, bytes]:
    """All figures as ``{file name: PNG bytes}``."""
    import warnings

    with warnings.catch_warnings():
        # A state or method whose values are all undefined (blank maps) plots as a gap, not a warning.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _render_figures(inputs)


def _render_figures(inputs: ReportInputs) -> dict[str, bytes]:
    r, e = inputs, inputs.example
    if r.volumes:  # each example panel: axial | coronal over sagittal | MIP, through the lesion
        centre = figures.lesion_centre(r.masks[e])

        def view(v: np.ndarray, kind: str = "map") -> np.ndarray:
            return figures.volume_mosaic(v, centre, r.spacing, kind=kind)
    else:
        def view(v: np.ndarray, kind: str = "map") -> np.ndarray:
            return v
    image = view(r.images[e], "image")
    trained = {m: view(r.trained_maps[m][e]) for m in r.methods}
    out = {
        "utility.png": figures.utility_figure(r.methods, r.auprc, r.auprc_untrained, r.auprc_prior,
                                              localization=r.auprc_localization, image=image,
                                              mask=view(r.masks[e], "mask"), maps=trained, example_id=r.ids[e],
                                              example=e),
        "agreement.png": figures.agreement_figure(r.methods, r.repeat, r.reprod, baseline=r.agreement_baseline,
                                                  threshold=r.threshold, repeat_chance=r.repeat_chance,
                                                  reprod_chance=r.reprod_chance),
    }
    if r.volumes:
        out["volume_views.png"] = figures.volume_views_figure(
            r.methods, r.images[e], r.masks[e], {m: r.trained_maps[m][e] for m in r.methods}, spacing=r.spacing,
            example_id=r.ids[e], scores={m: float(r.auprc[m][e]) for m in r.methods})
    if r.states:
        out["randomization.png"] = figures.randomization_figure(r.methods, r.states, r.state_ssim, r.state_baseline,
                                                                verdict_state=r.verdict_state,
                                                                replicates=r.state_replicates or None)
        per_state = ({m: np.stack([view(v) for v in r.state_examples[m]]) for m in r.methods} if r.volumes
                     else r.state_examples)
        out["randomization_examples.png"] = figures.state_examples_figure(r.methods, r.states, image, trained,
                                                                          per_state=per_state)
    if r.agreement_examples:
        columns = ({name: {m: view(v) for m, v in col.items()} for name, col in r.agreement_examples.items()}
                   if r.volumes else r.agreement_examples)
        out["agreement_examples.png"] = figures.agreement_examples_figure(r.methods, image, columns)
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.3f}"
    return html.escape(str(v))


#: What ``n`` counts per criterion, in words (the verdict's n is always a count of images).
N_COUNTS = {"utility": "images", "randomization": "images (replicates averaged per image)",
            "repeatability": "images", "reproducibility": "images"}
#: The comparisons by name, in words (which one decided a FAIL).
LEG_NAMES = {"prior": "vs average-mask prior", "localization": "vs localization network", "chance": "vs chance"}


def cell_title(v: Verdict) -> str:
    """The hover text of a verdict: the rule in plain words, the numbers, the paper's rule."""
    parts = [v.plain or v.rule]
    if v.passed is None and v.why:
        parts.append(f"Not judged: {v.why}.")
    elif v.passed is False and v.why:
        parts.append(f"Fails {LEG_NAMES.get(v.decided_by, v.decided_by)}: {v.why}.")
    parts.append(f"Rule: {v.rule}.")
    for c in v.comparisons.values():
        if "p" in c and "alternative" in c:
            lo, hi = c.get("difference_ci95") or (None, None)
            p = c.get("p_holm") if c.get("correction") == "holm" else c.get("p")
            label = "Holm p" if c.get("correction") == "holm" else "p (uncorrected)"
            parts.append(f"vs {c['against']} on the same {c.get('n_pairs')} images: method {_fmt(c.get('method_mean'))}"
                         f", reference {_fmt(c.get('reference_mean'))}, paired difference {_fmt(c.get('difference'))} "
                         f"[{_fmt(lo)}, {_fmt(hi)}], {label}={'n/a' if p is None else format(p, '.2g')}.")
        elif "difference" in c:
            lo, hi = c.get("difference_ci95") or (None, None)
            parts.append(f"vs {c['against']}: mean difference {_fmt(c.get('difference'))} "
                         f"[{_fmt(lo)}, {_fmt(hi)}] over {c.get('n_pairs')} images.")
        elif "n_replicates" in c:
            parts.append(f"Replicate means {', '.join(_fmt(x) for x in c.get('means', []))} "
                         f"(SD {_fmt(c.get('sd'))}).")
        elif "mean_ssim_over_states" in c:
            parts.append(f"Whole cascade: mean SSIM over all states {_fmt(c.get('mean_ssim_over_states'))}.")
    if v.evidence:
        parts.append(f"Evidence: {v.evidence} ({v.evidence_rule}).")
    if v.n_undefined:
        parts.append(f"{v.n_undefined} left out ({v.undefined_why}).")
    if v.paper_rule:
        parts.append(f"Paper: {v.paper_rule}")
    if v.deviation:
        parts.append(f"Differs from the paper: {v.deviation}")
    return " ".join(parts)


def _cell(v: Verdict, criterion: str = "utility") -> str:
    cls, word = {True: ("pass", "PASS"), False: ("fail", "FAIL"), None: ("na", "n/a")}[v.passed]
    if v.passed is False and v.decided_by:
        word += f" ({html.escape(LEG_NAMES.get(v.decided_by, v.decided_by))})"
    detail = _fmt(v.value)
    if v.ci95:
        lo, hi = v.ci95
        detail += f" [{_fmt(lo)}, {_fmt(hi)}]"
    if v.reference is not None:
        detail += f" vs {_fmt(v.reference)}"
    detail += f", n={v.n} {N_COUNTS.get(criterion, 'images')}" + (
        f" (+{v.n_undefined} undefined)" if v.n_undefined else "")
    if v.evidence:
        detail += f"<br>evidence: {html.escape(v.evidence)}"
    cascade = v.comparisons.get("cascade") if v.comparisons else None
    if cascade and cascade.get("mean_ssim_over_states") is not None:
        detail += f"<br>whole cascade: {_fmt(cascade['mean_ssim_over_states'])}"
    why = f"<br><i>{html.escape(v.why)}</i>" if v.why else ""
    return f'<td class="{cls}" title="{html.escape(cell_title(v))}"><b>{word}</b><br>{detail}{why}</td>'


def verdict_table(results: Results) -> str:
    """The verdict table as an HTML ``<table>`` (hover a cell for its rule in words)."""
    rows = []
    for m in results.methods:
        label = figures.METHOD_LABELS.get(m, m)
        cells = "".join(_cell(results.verdict(m, c), c) for c in CRITERIA)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    head = "".join(f"<th>{html.escape(CRITERION_TITLES[c])}<br><span class='small'>{c}</span></th>" for c in CRITERIA)
    return f'<table class="verdicts"><tr><th>method</th>{head}</tr>{"".join(rows)}</table>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
td.pass{background:#e3f4e1}td.fail{background:#f9dcdc}td.na{background:#eee}
.banner{background:#fff4ce;border:1px solid #e0c060;padding:.5em 1em;margin:1em 0}
img{max-width:100%;border:1px solid #eee}.small{font-size:.8em;color:#555}
"""


def render_html(results: Results, pngs: Mapping[str, bytes]) -> str:
    """The self-contained report page."""
    cfg = results.provenance["config"]
    prov = results.provenance
    data = results.data
    preset = results.preset
    banner = ""
    if preset != "paper":
        banner = (f'<div class="banner">Computed with the <b>{html.escape(preset)}</b> preset (fewer integration '
                  "steps and noise samples than the paper's recipe): a demonstration, not the paper's numbers."
                  "</div>")
    failing = results.failing()
    summary = (f"<p><b>{len(failing)} of {len(results.methods)}</b> methods fail at least one criterion"
               f"{': ' + ', '.join(html.escape(m) for m in failing) if failing else ''}.</p>")
    degenerate = []
    for m in results.methods:
        counts = [f"{results.verdict(m, c).n_undefined} {c} ({results.verdict(m, c).undefined_why})"
                  for c in CRITERIA if results.verdict(m, c).n_undefined]
        if counts:
            degenerate.append(f"{m}: " + ", ".join(counts))
    degenerate_html = ("<p class='small'>Undefined values (blank maps, empty masks), counted and left out of "
                       "every mean, CI and test: " + "; ".join(html.escape(d) for d in degenerate) + "</p>"
                       ) if degenerate else ""
    skipped = data.get("skipped") or []
    skipped_html = (f"<p class='small'>{len(skipped)} lesion-positive image(s) skipped: "
                    + "; ".join(html.escape(f"{s['id']} ({s['why']})") for s in skipped[:20])
                    + (" ..." if len(skipped) > 20 else "") + "</p>") if skipped else ""
    volumes = isinstance(data.get("image_size"), list) or len(data.get("grid") or []) == 3
    generator = data.get("generator") or ("SynthCT" if volumes else "SynthCXR")
    synthetic = (f"<div class='banner'>Assessed on <b>{html.escape(generator)}</b> (generated "
                 f"{'volumes' if volumes else 'images'}), not on patients' "
                 f"{'scans' if volumes else 'radiographs'}.</div>") if results.synthetic else ""
    size = data.get("image_size")
    size_text = (" x ".join(str(n) for n in size) + " voxels" if isinstance(size, list)
                 else f"{size or 'native'} px")
    views_note = ("<p class='small'>Volumes: each example panel shows the axial and coronal slices (top) and the "
                  "sagittal slice and the maximum-intensity projection along z (bottom), the slices through the "
                  "lesion's centre of mass (or its largest cross-section); the last figure of this section draws "
                  "them one per panel.</p>") if volumes else ""
    deviations = "".join(f"<li>{html.escape(d)}</li>" for d in results.deviations)
    rand = results.randomization[0] if results.randomization else None
    rand_note = ""
    if rand:
        rand_note = (f"<p class='small'>The verdict reads state <b>{html.escape(rand['verdict_state'])}</b>"
                     + (f"; states beyond the paper's cascade ({html.escape(', '.join(rand['beyond_paper']))}) stay "
                        "on the curve, marked" if rand["beyond_paper"] else "")
                     + (f" ({html.escape(rand['verdict_state_source'])})" if rand.get("verdict_state_source") else "")
                     + f"; {len(results.randomization)} randomized replicate(s), each with its own random weights"
                     + ". Randomized models explain "
                     + ("their own prediction" if rand["target"] == "own" else "the trained model's class") + ".</p>")

    def img(name: str, alt: str) -> str:
        if name not in pngs:
            return ""
        data = base64.b64encode(pngs[name]).decode()
        return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'

    b = results.baselines
    loc = b.get("agreement_localization")
    loc_models = sorted({c.get("network", "the localization network") for c in cfg.get("localizers", [])})
    loc_text = (f"the localization network ({html.escape(', '.join(loc_models))}, the paper's high baseline)"
                if loc_models else "no localization network (none was given: the prior only)")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>SaliencyTrust report</title><style>{_CSS}</style></head><body>
<h1>Can these saliency maps be trusted?</h1>
<p class="small">Dataset <code>{html.escape(data['dataset_dir'])}</code>: {data['n_images']} lesion-positive
{'volumes' if volumes else 'images'} ({html.escape(data['split'])}) at {html.escape(size_text)}
({html.escape(data['image_size_source'])}); methods {', '.join(html.escape(m) for m in results.methods)};
device {html.escape(prov['device_name'])}; {prov['seconds']} s. Criteria of Arun et al., Radiology: AI 2021.</p>
{synthetic}{banner}
<h2>Verdicts</h2>{summary}{verdict_table(results)}
<p class="small">Cells: mean [95 % bootstrap CI over images] vs the criterion's reference (utility: the
average-mask prior's AUPRC; randomization: SSIM between maps of different images; agreement: the localization
networks' replicate SSIM, or chance without them), and n, the number of images the verdict used (randomization:
images, each the mean of its randomized replicates). A FAIL names the comparison that decided it. Utility is compared
with the average-mask prior (must be significantly above, Holm-corrected across methods) and with {loc_text} (must
not be significantly above the map, uncorrected: correcting a test whose rejection fails a method would make passing
easier). Randomization follows the paper's rule (mean of replicate means below the random-pair baseline) with an
evidence status beside it. Hover a cell for its rule in words and the tests. "n/a" is never counted as a pass.</p>
{degenerate_html}{skipped_html}
<h3>Where this run differs from the paper</h3><ul class="small">{deviations}</ul>
<h2>1. Localization utility</h2>
<p>AUPRC of each map against the ground truth on every lesion-positive image; grey boxes are the same method
on an untrained network, orange the average-mask prior built from the training masks
(mean {_fmt(b['utility_prior']['mean'])}), green the localization network's output
(mean {_fmt((b.get('utility_localization') or {}).get('mean'))}). Cyan: ground-truth outline.</p>
{views_note}{img('utility.png', 'utility box plots and overlays')}
{img('volume_views.png', 'slices through the lesion and maximum-intensity projections of the maps')}
<h2>2. Sensitivity to model randomization</h2>
<p>Blocks re-initialized from the top of the network down, one state per block. A trustworthy map changes:
its SSIM to the trained map should fall below the dashed line (SSIM between maps of different images).</p>
{rand_note}
{img('randomization.png', 'randomization curves')}
{img('randomization_examples.png', 'maps per randomization state')}
<h2>3. Repeatability and reproducibility</h2>
<p>SSIM between the maps of two replicates of one architecture, and between two architectures, per image;
localization-network replicates agree at {_fmt((loc or {}).get('mean'))} (the paper's comparison); grey:
chance (maps of different images); the dashed line at {_fmt(cfg['agreement_threshold'])} is the paper's
reference line, not the rule.</p>
{img('agreement.png', 'agreement box plots')}
{img('agreement_examples.png', 'maps from each model')}
<h2>Provenance</h2><pre class="small">{html.escape(_provenance_text(results))}</pre>
</body></html>"""


def _provenance_text(results: Results) -> str:
    p = results.provenance
    lines = [f"schema_version {results.schema_version}", f"preset {p['config']['preset']}",
             f"seed {p['config']['seed']}", f"data_range {p['config']['data_range']}",
             f"explain_class {p['config']['explain_class']}",
             f"randomization_target {p['config']['randomization_target']}",
             f"cam_resize {p['recipe']['cam_resize']}", f"processes {p.get('processes', 1)}"]
    lines += [f"classifier {c['arch']} {c['path']} sha256 {c['sha256'][:16]}" for c in p["config"]["classifiers"]]
    lines += [f"localizer {c['path']} sha256 {c['sha256'][:16]}" for c in p["config"]["localizers"]]
    lines += [f"{k} {v}" for k, v in sorted(p["versions"].items())]
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: Results, inputs: ReportInputs) -> Path:
    """Write ``figures/*.png`` and ``report.html`` under ``out_dir`` (atomically); returns the report path."""
    out = Path(out_dir)
    pngs = render_figures(inputs)
    for name, data in pngs.items():
        _atomic(out / "figures" / name, data)
    path = out / "report.html"
    _atomic(path, render_html(results, pngs).encode())
    return path


__all__ = ["ReportInputs", "cell_title", "render_figures", "render_html", "verdict_table", "write_report"]
