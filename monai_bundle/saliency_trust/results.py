"""The assessment's one results model: :class:`Results`, written as ``results.json`` and read back.

Everything that shows an assessment (``per_image.csv``, ``report.html``, the verdict copy in
``inference.json``'s ``prediction.json``, the service's ``/info``, the demo's printout and the
Slicer table through that copy) reads a :class:`Results` or its JSON through :func:`load_results`,
never by walking the raw dictionaries itself.

The JSON is strict: an undefined number (the mean of nothing, a Spearman of a blank map) is
``null``, never ``NaN``. Importing this module needs neither torch nor numpy, so a light reader
(the HTTP service's ``/info``) stays light.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3
CRITERIA = ("utility", "randomization", "repeatability", "reproducibility")

#: Column headers in words (the Slicer table, the report): the direction that is good is "yes".
CRITERION_TITLES = {
    "utility": "Points at the lesion",
    "randomization": "Changes when weights are randomized",
    "repeatability": "Agrees with a retrained copy",
    "reproducibility": "Agrees with a second model",
}


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON without NaN / Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return strict(value.item())  # numpy / torch scalars
    return value


@dataclass
class Verdict:
    """One method on one criterion: pass / fail / undetermined, with the rule and the numbers behind it."""

    passed: bool | None
    rule: str
    plain: str = ""  # the rule in words a clinician reads
    why: str = ""  # the reason for a fail or an undetermined verdict
    value: float | None = None  # mean of the per-image values the verdict used
    ci95: list[float | None] | None = None
    reference: float | None = None  # the main comparison's reference mean
    n: int = 0  # images (or image pairs) with a defined value
    n_undefined: int = 0  # images left out: blank maps, empty masks
    undefined_why: str = ""
    comparisons: dict[str, dict] = field(default_factory=dict)
    paper_rule: str = ""
    deviation: str = ""  # how this rule differs from the paper's, on purpose
    state: str | None = None  # randomization: the state the verdict read
    reference_ci95: list[float | None] | None = None
    threshold: float | None = None
    threshold_role: str = ""
    decided_by: str = ""  # the comparison that decided a FAIL (or left the verdict undetermined)
    evidence: str | None = None  # randomization: pass / fail / inconclusive from the bootstrap over images
    evidence_rule: str = ""

    def __post_init__(self) -> None:
        # In memory as in the JSON: an undefined number is None, never NaN.
        for name in ("value", "reference", "ci95", "reference_ci95", "comparisons", "threshold"):
            setattr(self, name, strict(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        """From a verdict dictionary (unknown keys are refused: a schema mismatch, not silently dropped)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"verdict has unknown field(s) {unknown}")
        return cls(**d)

    def word(self) -> str:
        """``pass``, ``FAIL`` or ``n/a``."""
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]


@dataclass
class Results:
    """What one assessment found: data used, per-criterion summaries, baselines, verdicts, provenance."""

    methods: list[str]
    data: dict  # dataset, split rule, image size and its source, ids used, skipped ids with reasons
    utility: dict[str, dict]  # method -> AUPRC summary and counts
    randomization: list[dict]  # one per randomized replicate: states, curves, verdict state
    repeatability: dict[str, dict]
    reproducibility: dict[str, dict]
    baselines: dict
    verdicts: dict[str, dict[str, Verdict]]
    provenance: dict
    deviations: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name in ("data", "utility", "randomization", "repeatability", "reproducibility", "baselines",
                     "provenance"):
            setattr(self, name, strict(getattr(self, name)))

    # -- reading ---------------------------------------------------------------------------------
    def verdict(self, method: str, criterion: str) -> Verdict:
        """The verdict of ``method`` on ``criterion``."""
        return self.verdicts[method][criterion]

    def passed(self, method: str) -> dict[str, bool | None]:
        """``{criterion: passed}`` for one method."""
        return {c: self.verdicts[method][c].passed for c in CRITERIA}

    def failing(self) -> list[str]:
        """Methods that fail at least one criterion (an undetermined criterion is not a pass)."""
        return [m for m in self.methods if any(v is False for v in self.passed(m).values())]

    def passes_all(self, method: str) -> bool:
        """True only when every criterion was judged and passed (n/a never counts as passing)."""
        return all(v is True for v in self.passed(method).values())

    @property
    def preset(self) -> str:
        """The saliency preset the maps were computed with."""
        return str(self.provenance["config"]["preset"])

    @property
    def n_images(self) -> int:
        """Lesion-positive images assessed."""
        return int(self.data["n_images"])

    @property
    def synthetic(self) -> bool:
        """Whether the images were SynthCXR (generated), not patients' radiographs."""
        return bool(self.data.get("synthetic"))

    def usage_lines(self) -> list[str]:
        """How many images each criterion used (range over methods), for printouts."""
        lines = [f"{self.n_images} lesion-positive images assessed ({self.data['split']}); "
                 f"{len(self.data.get('skipped', []))} skipped without ground truth"]
        for c in CRITERIA:
            vs = [self.verdicts[m][c] for m in self.methods]
            if all(v.rule == "not run" for v in vs):
                lines.append(f"  {c}: {vs[0].why}")
                continue
            lo, hi = min(v.n for v in vs), max(v.n for v in vs)
            text = f"  {c}: {lo} images per method" if lo == hi else f"  {c}: {lo}-{hi} images per method"
            undefined = sum(v.n_undefined for v in vs)
            if undefined:
                text += f" ({undefined} undefined over all methods: blank maps or empty masks, left out)"
            lines.append(text)
        return lines

    def verdict_copy(self, methods: list[str] | None = None) -> dict:
        """The compact copy that ``prediction.json`` and the service carry beside one image's maps."""
        ms = [m for m in (methods or self.methods) if m in self.verdicts]
        return {"schema_version": self.schema_version, "preset": self.preset, "n_images": self.n_images,
                "synthetic": self.synthetic, "dataset": self.data.get("dataset_dir"),
                "criteria": list(CRITERIA), "titles": CRITERION_TITLES,
                "methods": {m: self.passed(m) for m in ms},
                "details": {m: {c: strict(asdict(self.verdicts[m][c])) for c in CRITERIA} for m in ms}}

    # -- writing ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain, strict-JSON-ready dictionary."""
        d = asdict(self)
        return strict(d)

    def to_json(self) -> str:
        """Strict JSON (``allow_nan=False``: an undefined value is null)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> Results:
        """From :meth:`to_dict`'s form; an older schema is refused with one sentence."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"results of schema version {version}; this version reads {SCHEMA_VERSION}: "
                             "run the assessment again")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"results have unknown field(s) {unknown}")
        body = dict(d)
        body["verdicts"] = {m: {c: Verdict.from_dict(v) for c, v in crit.items()} for m, crit in d["verdicts"].items()}
        return cls(**body)

    @classmethod
    def from_json(cls, text: str) -> Results:
        """Parse strict JSON (NaN / Infinity are refused)."""
        def no_constants(name: str) -> None:
            raise ValueError(f"results JSON holds {name}; it must be strict JSON")

        return cls.from_dict(json.loads(text, parse_constant=no_constants))


def load_results(path: str | Path) -> Results:
    """Read a ``results.json``; a missing, unreadable or outdated file raises ValueError naming it."""
    path = Path(path)
    try:
        return Results.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from None


__all__ = ["CRITERIA", "CRITERION_TITLES", "SCHEMA_VERSION", "Results", "Verdict", "load_results", "strict"]
