"""What the module's panel does, without Qt: one run at a time, local or on a server, and the overlay.

The widget in ``SaliencyTrust.py`` is a shell over this: it snapshots the parameter node into a
:class:`Settings` on the Qt thread, calls :meth:`Run.start`, polls :meth:`Run.poll` from a timer,
calls :meth:`Run.finish` when it says so, and routes the method switcher and the opacity slider to
:func:`show_method`. Everything here is tested with the ``slicer-core`` wheel and a real service.

Threading rule: only the caller's (Qt) thread touches MRML. The server round trip runs in a worker
thread that sees plain values (paths, strings, a :class:`~SaliencyTrustLib.process.Request`) and
nothing else.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from SaliencyTrustLib import bundle, inputs, process, scene, texts
from SaliencyTrustLib.errors import BundleError, CancelledError, SaliencyTrustError


@dataclass
class Settings:
    """A snapshot of the panel's choices, taken on the Qt thread before a run starts."""

    volume: object  # vtkMRMLScalarVolumeNode
    score_node: object | None  # vtkMRMLSegmentationNode | vtkMRMLMarkupsROINode | None
    request: process.Request
    use_server: bool = False
    server_url: str = ""
    token: str | None = None
    server_model: str | None = None  # the service's model name; None: chosen from /info by architecture
    training_note: str = ""  # a warning about the local model's training data (ModelChoice.training_note)
    model_dimension: int | None = None  # the local model's: 2 (radiographs) or 3 (CT volumes); None: not checked
    model_name: str = ""  # the local model's name in its folder (said when it cannot explain the input)


class Run:
    """One run of the bundle (local child process) or of the service (HTTP in a worker thread)."""

    def __init__(self, settings: Settings, work_dir: str | Path | None = None) -> None:
        self.settings = settings
        self.work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="SaliencyTrust-"))
        self.process: process.BundleProcess | None = None
        self._thread: threading.Thread | None = None
        self._box: dict = {}
        self._cancel = threading.Event()
        self.model_name: str | None = None  # the service model used (server mode)
        self.request_id = uuid.uuid4().hex  # names the server's job, so that a cancel can reach it

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def start(self) -> Run:
        """Check and export the input (MRML: on this thread), then launch; returns at once."""
        s = self.settings
        if s.model_dimension is not None and not s.use_server:  # said before anything is written or started
            inputs.check_model_fits(s.volume, s.model_dimension, s.model_name or s.request.arch or "chosen")
        dimension = inputs.check_input_volume(s.volume)
        image, mask = inputs.prepare(s.volume, s.score_node, self.work / "input")
        out = self.work / "output"
        if s.use_server:
            from SaliencyTrustLib import client

            request, url, token, name, cancel, box = s.request, s.server_url, s.token, s.server_model, \
                self._cancel, self._box
            rid = self.request_id
            input_name, dims = s.volume.GetName(), tuple(s.volume.GetImageData().GetDimensions())

            def call() -> None:  # plain values only: no Qt, no MRML in this thread
                try:
                    info = client.server_info(url, token)
                    model = client.choose_model(info, request.arch, name, dimension=dimension)
                    served = client.model_dimension(info, model)
                    if served != dimension:
                        raise BundleError(texts.dimension_mismatch(input_name, dims, model, served))
                    box["model"] = model
                    box["synthetic"] = bool((info["models"][model].get("training") or {}).get("synthetic"))
                    box["dimension"] = served
                    box["out"] = client.infer(url, model, image, out, request, mask=mask, token=token,
                                              cancel=cancel, request_id=rid)
                except Exception as exc:  # handed to finish() on the caller's thread
                    box["error"] = exc

            self._thread = threading.Thread(target=call, name="SaliencyTrust-server", daemon=True)
            self._thread.start()
        else:
            self.process = process.BundleProcess(s.request, image, out, mask).start()
        return self

    def poll(self) -> tuple[list[str], bool]:
        """New output lines and whether the run has ended (a cancelled run ends at once)."""
        if self.cancelled:
            return [], True
        if self._thread is not None:
            return [], not self._thread.is_alive()
        if self.process is None:
            return [], True
        return self.process.new_lines(), not self.process.running

    def cancel(self) -> None:
        """Stop the run: the child's whole process tree, or the server's job (its cancel endpoint, from a
        thread: the GUI does not wait on the network) and the download at its next step."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        if self.process is not None:
            self.process.cancel()
        if self._thread is not None and self._thread.is_alive():
            from SaliencyTrustLib import client

            s, rid = self.settings, self.request_id
            threading.Thread(target=client.cancel, args=(s.server_url, rid, s.token), daemon=True,
                             name="SaliencyTrust-cancel").start()

    def discard(self) -> None:
        """Forget a cancelled run without loading anything (its work folder goes)."""
        self._cancel.set()
        self._cleanup()

    def finish(self, mrml_scene, input_node=None) -> scene.RunOutput:
        """The ended run's results into ``mrml_scene`` (MRML: call on the Qt thread).

        Raises :class:`~SaliencyTrustLib.errors.CancelledError` after a cancel (not an error to show)
        and :class:`~SaliencyTrustLib.errors.SaliencyTrustError` with the reason otherwise. The
        work folder goes in every case, except while a cancelled server thread still writes to it.
        """
        volume = input_node if input_node is not None else self.settings.volume
        try:
            if self.cancelled:
                raise CancelledError()
            if self._thread is not None:
                if "error" in self._box:
                    err = self._box["error"]
                    raise err if isinstance(err, SaliencyTrustError) else BundleError(str(err))
                self.model_name = self._box.get("model")
                out = self._box["out"]
                ct = self._box.get("dimension") == 3
                note = "" if not self._box.get("synthetic") else (
                    texts.SYNTHETIC_CT_TRAINING_NOTE if ct else texts.SYNTHETIC_TRAINING_NOTE)
            else:
                assert self.process is not None, "start() first"
                out = self.process.result()
                note = self.settings.training_note
            results = scene.load_run_output(mrml_scene, volume, out)
            results.training_note = note
            return results
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            # A cancelled download still running: its folder goes when it ends.
            def later() -> None:
                thread.join()
                shutil.rmtree(self.work, ignore_errors=True)

            threading.Thread(target=later, daemon=True).start()
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def show_method(mrml_scene, results: scene.RunOutput | None, method: str | None, opacity: float) -> int:
    """Show ``method``'s map over the volume it was computed on (not whatever is selected now).

    ``opacity`` is the slider's own new value. Returns the number of slice views set (0 when there
    is nothing to show).
    """
    if results is None or not method or method not in results.map_nodes:
        return 0
    node = results.map_nodes[method]
    if not mrml_scene.IsNodePresent(node):  # the run was replaced or the user deleted the map
        return 0
    background = scene.map_input(mrml_scene, node)
    if background is None:
        return 0
    return scene.show_overlay(mrml_scene, background, node, opacity)


@dataclass
class ModelChoice:
    """One classifier the panel offers: where it is, its architecture and its replicates."""

    folder: str
    arch: str
    replicates: list[int]
    training_note: str = ""  # said over the prediction: e.g. the model learnt from synthetic images
    dimension: int = 2  # 2: explains one radiograph; 3: explains a CT volume (model.json input.size [D, H, W])


def model_choices(model_dir: str | Path, bundle_dir: str | Path | None = None) -> dict[str, ModelChoice]:
    """The classifiers under ``model_dir`` by name (the bundle's listing: folders with a ``model.json``,
    named by their path there, or the architectures of an older ``<arch>_seed<k>.pt`` folder).
    Localization networks and folders whose manifest is broken are left out."""
    if not Path(model_dir).is_dir():
        return {}
    out = {}
    for name, found in bundle.find_models(model_dir, bundle_dir).items():
        if isinstance(found, Exception) or found.kind != "classifier":
            continue
        dimension = bundle.manifest_dimension(found)
        try:
            note = texts.training_note(found.record(), dimension)
        except Exception:  # an unreadable record: no note rather than no model
            note = ""
        out[name] = ModelChoice(str(found.folder), found.network_label, list(found.replicates), note, dimension)
    return out


def model_problems(model_dir: str | Path, bundle_dir: str | Path | None = None) -> list[str]:
    """One sentence per model folder under ``model_dir`` that cannot be used (a broken ``model.json``)."""
    if not Path(model_dir).is_dir():
        return []
    return [str(found) for found in bundle.find_models(model_dir, bundle_dir).values() if isinstance(found, Exception)]


def no_models_message(model_dir: str | Path, bundle_dir: str | Path | None = None) -> str:
    """One sentence for a model folder without usable models ('' when it has some)."""
    if model_choices(model_dir, bundle_dir):
        return ""
    problems = model_problems(model_dir, bundle_dir)
    if problems:
        return f"No usable model in {model_dir}: {problems[0]}"
    return (f"No trained models in {model_dir}: choose a model folder (with a model.json) or a folder of them, "
            "or train the demo's models for a task (Train demo models).")


def run_local(mrml_scene, volume, request: process.Request, work_dir: str | Path, score_node=None,
              timeout: float | None = None) -> scene.RunOutput:
    """The whole local flow, blocking (the widget drives the same steps through :class:`Run`). A model of the other
    kind (a 2-D model and a CT volume, or a 3-D model and a radiograph) is refused in one sentence first."""
    work = Path(work_dir)
    try:
        dimension = bundle.model_dimension(request.model_dir, request.arch, request.bundle_dir)
    except Exception:  # an unreadable model folder: the bundle says why in its own sentence
        dimension = None
    if dimension is not None:
        inputs.check_model_fits(volume, dimension, request.arch or Path(request.model_dir).name)
    image, mask = inputs.prepare(volume, score_node, work / "input")
    out = process.run_bundle(request, image, work / "output", mask, timeout=timeout)
    return scene.load_run_output(mrml_scene, volume, out)
