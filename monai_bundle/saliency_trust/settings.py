"""Every option of an assessment and of an inference, validated and defaulted once.

The module imports the standard library only (the Slicer module can load it by path); checking a
preset's recipe overrides imports :mod:`saliency_trust.saliency.presets` when an
:class:`AssessmentSettings` is built.

:class:`AssessmentSettings` is what ``configs/trust.json`` builds (a ``_target_`` block) and what
:func:`~saliency_trust.workflows.assess.run_assessment` runs; :class:`InferenceRequest` is its twin
for :func:`~saliency_trust.workflows.infer.run_inference`, the service and the Slicer module's
command. Both are frozen: a stage reads them and never changes them. The preset-dependent defaults
and the rules derived from several options (which class a randomized model explains, the SSIM data
range) are properties here, so no stage decides them again. ``to_config()`` is the settings part of
the resume key and of ``results.json``'s ``provenance.config``.

A new assessment option is one field here (with its check in ``__post_init__``), its line in
``trust.json`` (the default, and its ``@`` reference in the ``settings`` block), and the place that
uses it; ``to_config()`` takes every field by itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: Which class each model's maps explain: its prediction (the paper) or its finding class.
EXPLAIN_CLASSES = ("predicted", "finding")
#: Which class a randomized model explains: its own prediction (the paper's pipeline) or the trained model's.
TARGETS = ("own", "trained")
#: The presets of :mod:`saliency_trust.saliency.presets`.
PRESETS = ("paper", "quick")
#: Randomization evidence: "pass" when the upper CI bound of SSIM minus chance is at most this.
EQUIVALENCE_MARGIN = 0.05
#: The map files inference writes.
MAP_FORMATS = ("nrrd", "nifti")


def default_data_range(preset: str) -> float:
    """SSIM's data range when none is given: 2.0 with the paper preset (what scikit-image <= 0.19 silently used
    on the paper's float maps), 1.0 otherwise."""
    return 2.0 if preset == "paper" else 1.0


def default_target(preset: str) -> str:
    """The class a randomized model explains when none is given: its own prediction with the paper preset (the
    paper's pipeline), the trained model's class otherwise."""
    return "own" if preset == "paper" else "trained"


def _frozen(value: Any) -> Any:
    """An immutable copy of a JSON-like value: lists become tuples, dicts :class:`_FrozenDict`, all the way down."""
    if isinstance(value, Mapping):
        return _FrozenDict({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    """The JSON form of a value held by a settings object."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thawed(v) for k, v in value.items()}
    return value


def _model_ref(value: Any) -> Any:
    """A classifier or localizer entry kept as given (a path becomes a string; a dict an immutable mapping)."""
    if isinstance(value, str | Path):
        return str(value)
    if isinstance(value, Mapping):
        return _FrozenDict({k: (str(v) if isinstance(v, str | Path) else _frozen(v)) for k, v in value.items()})
    return value  # a ModelFolder object


class _FrozenDict(dict):
    """A dict that refuses changes, so a settings object's entries cannot change behind its back."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("settings are frozen; build a new settings object with dataclasses.replace")

    __setitem__ = __delitem__ = __ior__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an int to Python, never a count or a seed here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_bools(obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


def _check_recipe(preset: str, overrides: Mapping[str, Any]) -> None:
    """Unknown presets and recipe settings fail here, before any work (the engine's own check)."""
    from saliency_trust.saliency.presets import get_recipe

    get_recipe(preset, **dict(overrides))


def _check_methods(methods: Sequence[str] | None) -> None:
    from saliency_trust.methods import METHODS

    if methods is not None:
        bad = [m for m in methods if m not in METHODS]
        _check(not bad, f"unknown method(s) {bad}; choose from {list(METHODS)}")


@dataclass(frozen=True, kw_only=True)
class AssessmentSettings:
    """Every option of a four-criteria assessment (``configs/trust.json``), checked once when built.

    ``classifiers``: model folders (or weight files; see
    :func:`~saliency_trust.workflows.assess.model_entries`): the first folder's first two replicates
    give repeatability, its first three go through cascading randomization (``randomize`` limits
    them), the first classifier of another architecture gives reproducibility. ``localizers``: the
    first gives the high utility baseline, the first two the agreement baseline.
    ``split``: ``auto``, ``test``, ``all`` or a file of image ids (see ``assess._select``).
    ``randomization_target`` None is the preset's default (:attr:`target_rule`); ``data_range`` None
    is the preset's (:attr:`ssim_data_range`).
    """

    dataset_dir: Path
    output_dir: Path
    classifiers: tuple[Any, ...]
    localizers: tuple[Any, ...] = ()
    methods: tuple[str, ...] | None = None
    preset: str = "paper"
    recipe_overrides: Mapping[str, Any] = field(default_factory=dict)
    n_images: int = 100
    image_size: int | None = None
    split: str = "auto"
    include_training_images: bool = False
    seed: int = 0
    data_range: float | None = None
    pairs_per_image: int = 50
    agreement_threshold: float = 0.5
    equivalence_margin: float = EQUIVALENCE_MARGIN
    explain_class: str = "predicted"
    randomization_target: str | None = None
    randomize: int | None = None
    full_cascade: bool = False
    device: str | None = None
    block: int = 16
    report: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__  # normalize the given values once (frozen afterwards)
        put(self, "dataset_dir", Path(self.dataset_dir))
        put(self, "output_dir", Path(self.output_dir))
        for name in ("classifiers", "localizers"):
            value = getattr(self, name)
            if value is None:
                value = ()
            elif isinstance(value, str | Path | Mapping) or not isinstance(value, Sequence):
                value = (value,)  # one model
            put(self, name, tuple(_model_ref(v) for v in value))
        if self.methods is not None:
            put(self, "methods", tuple(dict.fromkeys([self.methods] if isinstance(self.methods, str)
                                                     else self.methods)))
        put(self, "recipe_overrides", _frozen(dict(self.recipe_overrides or {})))
        _check(bool(self.classifiers), "no classifiers to assess")
        _check(self.methods is None or len(self.methods) > 0, "methods must be None (all) or name at least one")
        _check_methods(self.methods)
        _check_bools(self, ("include_training_images", "full_cascade", "report", "progress"))
        _check(self.preset in PRESETS, f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        _check_recipe(self.preset, self.recipe_overrides)
        _check(_is_int(self.n_images) and self.n_images >= 2,
               f"n_images must be an integer of at least 2, got {self.n_images!r}")
        _check(self.image_size is None or (_is_int(self.image_size) and self.image_size >= 16),
               f"image_size must be None or an integer of at least 16 px, got {self.image_size!r}")
        _check(isinstance(self.split, str | Path) and str(self.split) != "",
               f"split must be 'auto', 'test', 'all' or a file of image ids, got {self.split!r}")
        put(self, "split", str(self.split))
        _check(_is_int(self.seed) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        _check(self.data_range is None or (isinstance(self.data_range, int | float) and self.data_range > 0),
               f"data_range must be None or a positive number, got {self.data_range!r}")
        _check(_is_int(self.pairs_per_image) and self.pairs_per_image >= 1,
               f"pairs_per_image must be a positive integer, got {self.pairs_per_image!r}")
        _check(isinstance(self.agreement_threshold, int | float) and math.isfinite(self.agreement_threshold),
               f"agreement_threshold must be a number, got {self.agreement_threshold!r}")
        _check(isinstance(self.equivalence_margin, int | float) and 0 < self.equivalence_margin < 1,
               f"equivalence_margin must be in (0, 1), got {self.equivalence_margin!r}")
        _check(self.explain_class in EXPLAIN_CLASSES,
               f"explain_class must be one of {EXPLAIN_CLASSES}, got {self.explain_class!r}")
        _check(self.randomization_target is None or self.randomization_target in TARGETS,
               f"randomization_target must be one of {TARGETS}, got {self.randomization_target!r}")
        _check(self.randomize is None or (_is_int(self.randomize) and self.randomize >= 0),
               f"randomize must be None or a non-negative integer, got {self.randomize!r}")
        _check(_is_int(self.block) and self.block >= 1, f"block must be a positive integer, got {self.block!r}")

    @classmethod
    def from_options(cls, dataset_dir: str | Path, output_dir: str | Path, classifiers: Any,
                     localizers: Any = (), **options: Any) -> AssessmentSettings:
        """Settings from the older call form ``(dataset_dir, output_dir, classifiers, localizers, **options)``."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise TypeError(f"unknown assessment option(s) {bad}; known: {sorted(known)}")
        return cls(dataset_dir=dataset_dir, output_dir=output_dir, classifiers=classifiers, localizers=localizers,
                   **options)

    @property
    def ssim_data_range(self) -> float:
        """SSIM's data range: given, else 2.0 with the paper preset (what scikit-image <= 0.19 silently used on
        the paper's float maps) and 1.0 otherwise."""
        return float(self.data_range) if self.data_range is not None else default_data_range(self.preset)

    @property
    def own_target(self) -> str:
        """The randomization target rule as configured: given, else ``own`` with the paper preset, ``trained``."""
        return self.randomization_target or default_target(self.preset)

    @property
    def target_rule(self) -> str:
        """The class a randomized state explains: with ``explain_class: finding`` every state explains the
        finding class (the trained model's target), else :attr:`own_target`."""
        return "trained" if self.explain_class == "finding" else self.own_target

    @property
    def overrides(self) -> dict[str, Any]:
        """The recipe overrides as a plain dict (a copy)."""
        return dict(self.recipe_overrides)

    def to_config(self) -> dict[str, Any]:
        """The settings that decide the numbers, resolved, as JSON: the resume key's and ``provenance.config``'s
        settings part. Every field is in it (a new option needs no line here) except those that change no
        number (:data:`_NOT_IN_CONFIG`) and the models, which the plan records with their weights' hashes."""
        out = {_CONFIG_NAMES.get(f.name, f.name): _thawed(getattr(self, f.name)) for f in fields(self)
               if f.name not in _NOT_IN_CONFIG}
        out.update(dataset_dir=str(self.dataset_dir.resolve()), data_range=self.ssim_data_range,
                   randomization_target=self.own_target)
        return out


#: Assessment fields that change no number (or that the plan records resolved): not in ``to_config()``.
_NOT_IN_CONFIG = frozenset({"output_dir", "classifiers", "localizers", "device", "report", "progress"})
#: Fields whose resolved value the plan records under the plain name (the number of images used, the
#: methods computed): ``to_config()`` names what was asked.
_CONFIG_NAMES = {"n_images": "n_requested", "methods": "methods_asked"}


@dataclass(frozen=True, kw_only=True)
class InferenceRequest:
    """Every option of one inference (``configs/inference.json``, the service, the Slicer module's command).

    ``model_dir`` is a model folder (``model.json``) or an older flat folder where ``arch`` picks the
    architecture; ``replicate`` None is the first. ``intensity_range`` states the range a non-DICOM
    image's values are in; ``accept_any_input`` lets through a DICOM the model was not made for.
    ``cache_networks`` keeps loaded networks for the next call (the service's workers).
    """

    image: Path
    output_dir: Path
    model_dir: Path
    arch: str | None = None
    replicate: int | None = None
    methods: tuple[str, ...] | None = None
    preset: str = "paper"
    mask: Path | None = None
    map_format: str = "nrrd"
    image_size: int | None = None
    intensity_range: tuple[float, float] | None = None
    accept_any_input: bool = False
    checks: bool = True
    seed: int = 0
    device: str | None = None
    cache_networks: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        for name in ("image", "output_dir", "model_dir"):
            _check(getattr(self, name) not in (None, ""), f"{name} is required")
            put(self, name, Path(getattr(self, name)))
        if self.mask not in (None, ""):
            put(self, "mask", Path(self.mask))
        else:
            put(self, "mask", None)
        if self.methods is not None:
            put(self, "methods", tuple(dict.fromkeys([self.methods] if isinstance(self.methods, str)
                                                     else self.methods)))
        _check(self.methods is None or len(self.methods) > 0, "methods must be None (all) or name at least one")
        _check_methods(self.methods)
        _check_bools(self, ("accept_any_input", "checks", "cache_networks"))
        _check(self.preset in PRESETS, f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        _check(self.map_format in MAP_FORMATS, f"map_format must be one of {sorted(MAP_FORMATS)}, "
                                               f"got {self.map_format!r}")
        _check(self.replicate is None or (_is_int(self.replicate) and self.replicate >= 0)
               or (isinstance(self.replicate, str) and self.replicate.isdigit()),
               f"replicate must be None or a non-negative integer, got {self.replicate!r}")
        if self.replicate is not None:
            put(self, "replicate", int(self.replicate))
        _check(self.image_size is None or (_is_int(self.image_size) and self.image_size >= 16),
               f"image_size must be None or an integer of at least 16 px, got {self.image_size!r}")
        if self.intensity_range is not None:
            lo_hi = tuple(float(v) for v in self.intensity_range)
            _check(len(lo_hi) == 2 and all(math.isfinite(v) for v in lo_hi) and lo_hi[0] < lo_hi[1],
                   f"intensity_range must be two finite numbers lo < hi, got {self.intensity_range!r}")
            put(self, "intensity_range", lo_hi)
        _check(_is_int(self.seed) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")

    def to_config(self) -> dict[str, Any]:
        """The request as JSON (what ``prediction.json`` records of how it was made)."""
        return {f.name: _thawed(getattr(self, f.name)) for f in fields(self) if f.name != "cache_networks"}


__all__ = ["EQUIVALENCE_MARGIN", "EXPLAIN_CLASSES", "MAP_FORMATS", "PRESETS", "TARGETS", "AssessmentSettings",
           "InferenceRequest", "default_data_range", "default_target"]
