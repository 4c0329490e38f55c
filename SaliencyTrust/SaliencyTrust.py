"""SaliencyTrust: saliency maps of a chest X-ray or CT classifier as overlays, with how far each can be trusted.

A thin shell over ``SaliencyTrustLib`` (all logic, no Qt): the widget binds its controls to a
parameter node, snapshots it into a ``controller.Settings`` when Apply is pressed, and lets a
``controller.Run`` do the work (the bundle out of process, or the service over HTTP in a worker
thread that touches no MRML), polled by a timer so the UI stays responsive. The library puts one
overlay per method and a trust table under the input's study in the subject hierarchy. A CT volume
(a scalar volume of several slices) goes to a 3-D model: its maps lie over it in all three slice views,
with an optional volume rendering in the 3-D view.
"""

import contextlib
import importlib
import importlib.util
import tempfile
from pathlib import Path
from typing import Annotated, Union  # noqa: UP035  (parameterNodeWrapper reads these annotations; 5.8 lacks X | Y)

import qt
import slicer
import vtk
from SaliencyTrustLib import bundle, controller, deps, errors, inputs, process, scene, texts
from SaliencyTrustLib import client as libclient
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

with contextlib.suppress(ImportError):
    # Where it exists (Slicer >= 5.10), slicer.util.pip_install delegates to it: import it explicitly.
    import slicer.packaging  # noqa: F401

MODULE_DIR = Path(__file__).resolve().parent


DEFAULT_BUNDLE = bundle.find_bundle(MODULE_DIR)
#: Where a first run trains the demo's models unless the user chooses another folder: a user-writable
#: folder of their own (not the install tree, nor the settings folder, which roams on Windows).
DEFAULT_TRAIN_DIR = Path.home() / "SaliencyTrust"


def _methodNames() -> tuple:
    """The bundle's saliency methods (key -> name) with '', or none with the sentence that says why."""
    try:
        return texts.METHOD_NAMES, ""
    except errors.SaliencyTrustError as exc:
        return {}, str(exc)


#: Imported by the bundle process; SimpleITK, pydicom, numpy and scipy ship with Slicer.
NEEDED_MODULES = ("torch", "torchvision", "monai", "fire", "ignite", "skimage", "tqdm", "matplotlib")


class SaliencyTrust(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SaliencyTrust")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["SaliencyTrust team"]
        self.parent.helpText = _(
            "Research use only - not for diagnosis. Explains a chest X-ray classifier's prediction (or a 3-D "
            "classifier's on a CT volume: the maps lie over the CT in all three slice views) with eight "
            "saliency methods and shows, beside each map, whether the method passed the trust criteria of Arun et "
            "al. (Radiology: AI 2021) on an assessment data set: it points at the lesion, it changes when the "
            "network's weights are randomized, it agrees with a retrained copy and with a second model. Live "
            "checks for this image: agreement with a second replicate and with a randomized model, and AUPRC "
            "against a segmentation or ROI when one is given, scored as the assessment scored them (a blank map "
            "says so). Utility is compared with an average-mask prior and with a localization network (a U-Net "
            "trained on the lesion masks): a method fails when that network is significantly better. Every n in "
            "the table counts images.")
        self.parent.acknowledgementText = _("Built on MONAI and 3D Slicer.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """A SampleData entry that makes a SynthCXR DICOM study on this computer (no download)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="SaliencyTrust", sampleName="SynthCXR chest X-ray",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "SaliencyTrust.png"),
        uris=[], fileNames=[], nodeNames=[], customDownloader=_loadSynthStudy)


def _loadSynthStudy(source=None):
    """Generate a 320 px SynthCXR DICOM study with the bundle and load it through the DICOM database."""
    from DICOMLib import DICOMUtils

    folder = Path(tempfile.mkdtemp(prefix="SynthCXR-"))
    with slicer.util.tryWithErrorDisplay(_("Could not make the SynthCXR study."), waitCursor=True):
        study = process.make_sample_study(str(DEFAULT_BUNDLE), folder, timeout=300)
        if not slicer.dicomDatabase or not slicer.dicomDatabase.isOpen:
            slicer.util.selectModule("DICOM")  # opens (or creates) the application's DICOM database
        if slicer.dicomDatabase and slicer.dicomDatabase.isOpen and DICOMUtils.importDicom(
                str(study.parent), copyFiles=True):
            loaded = DICOMUtils.loadSeriesByUID([inputs.dicom_series_uid(study)])
            if loaded:
                return [slicer.mrmlScene.GetNodeByID(i) for i in loaded]
        # No DICOM database: load the file itself (no patient / study items then).
        return [slicer.util.loadVolume(str(study), {"singleFile": True})]
    return []


@parameterNodeWrapper
class SaliencyTrustParameterNode:
    """The module's state: every widget binds to one of these through its SlicerParameterName."""

    # A grey radiograph, or a picture loaded in colour (an RGB(A) vector volume, as published case images
    # are; the bundle reads a grey one as luminance). Label maps, also scalar volumes, are not offered.
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]  # noqa: UP007
    # The concrete node classes: the combo-box connector instantiates each one to read its class
    # name, so an abstract vtkMRMLNode here would fail in setup().
    scoreAgainst: Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsROINode, None]  # noqa: UP007
    bundleDir: Path = DEFAULT_BUNDLE  # ctkPathLineEdit binds to pathlib.Path fields
    modelDir: Path = DEFAULT_TRAIN_DIR / "models" / "opacity"
    trainDir: Path = DEFAULT_TRAIN_DIR  # where Train demo models writes (data/, models/<task>/, trust/)
    arch: str = ""  # the chosen model's name in the model folder (not bound: the choices depend on the folder)
    replicate: int = 0
    methods: str = ",".join(_methodNames()[0])  # filled from the method check boxes
    preset: Annotated[str, Choice(list(texts.PRESETS))] = "quick"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    volumeRendering: bool = False  # a CT volume's map also volume-rendered in the 3-D view
    useServer: bool = False
    serverUrl: str = "http://127.0.0.1:8000"


class SaliencyTrustWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: inputs, model, Apply/Cancel, progress, prediction, banner, method switcher, opacity, table."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._modelDirTimer = None
        self._listedModelDir = None  # the model folder the choices were listed from
        self._listedBundleDir = None  # and the bundle that listed them
        self._haveModels = False
        self._choices = {}  # the model folder's classifiers as last listed (name -> controller.ModelChoice)
        self._methodBoxes = {}
        self.results = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SaliencyTrust.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SaliencyTrustLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.timeout.connect(self.onPoll)
        grid = qt.QGridLayout(self.ui.methodsBox)
        grid.setContentsMargins(0, 0, 0, 0)
        names, problem = _methodNames()
        if problem:  # the bundle's method table could not be read: no method to choose, and the panel says why
            self.ui.statusLabel.setText(problem)
        for k, (m, name) in enumerate(names.items()):
            box = qt.QCheckBox(name)
            box.toggled.connect(self.onMethodsToggled)
            grid.addWidget(box, k // 2, k % 2)
            self._methodBoxes[m] = box
        for task, text in process.DEMO_TASKS.items():
            self.ui.taskSelector.addItem(text, task)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        # The folder is listed once the user stops typing (and after the parameter node has taken the
        # new path: this slot runs before the node's own connection, so it must not read or write it).
        self._modelDirTimer = qt.QTimer()
        self._modelDirTimer.setSingleShot(True)
        self._modelDirTimer.setInterval(400)
        self._modelDirTimer.timeout.connect(self.updateModelChoices)
        self.ui.modelPath.connect("currentPathChanged(QString)", self.onModelPathEdited)
        self.ui.bundlePath.connect("currentPathChanged(QString)", self.onBundlePathEdited)
        self.ui.archSelector.connect("currentIndexChanged(int)", self.onArchChanged)
        self.ui.replicateSelector.connect("currentIndexChanged(int)", self.onReplicateChanged)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.volumeRenderingCheckBox.connect("toggled(bool)", self.onVolumeRenderingToggled)
        self.ui.volumeRenderingCheckBox.enabled = False  # until a CT volume's maps are shown
        self.ui.fitLabel.setVisible(False)
        self.ui.bannerLabel.setVisible(False)
        self.ui.trainingWarningLabel.setVisible(False)
        # The token is a secret: typed here, kept in memory only (never in the scene or the settings).
        self.ui.serverTokenEdit.setEchoMode(qt.QLineEdit.Password)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module closed or reloaded: stop the timer and the run, drop the observers."""
        for timer in (self._timer, self._modelDirTimer):
            if timer is not None:
                timer.stop()
        if self.logic:
            self.logic.cancel()
        self.removeObservers()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self) -> None:
        """Reload & Test: reload the library too (Slicer reloads only this file by itself)."""
        import SaliencyTrustLib

        # In import order, so that each room binds the reloaded names of the rooms it imports.
        for mod in (errors, deps, bundle, texts, inputs, process, scene, libclient, controller, SaliencyTrustLib):
            importlib.reload(mod)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        # A run in flight belongs to the closing scene: its input goes, and node IDs restart after a
        # clear, so its maps must never reach the next scene (they would lie over another image).
        if self.logic.run is not None:
            self.logic.dropRun()
            self._busy(self.logic.busy)
            self.ui.statusLabel.setText(_("The scene was closed: the run was stopped and nothing was added."))
        self.setParameterNode(None)
        self.results = None
        self.ui.methodSelector.clear()
        self.ui.tableView.setMRMLTableNode(None)
        for label in (self.ui.predictionLabel, self.ui.assessmentLabel, self.ui.bannerLabel,
                      self.ui.trainingWarningLabel):
            label.setText("")
        self.ui.bannerLabel.setVisible(False)
        self.ui.trainingWarningLabel.setVisible(False)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            # The first volume the selector shows: a scalar or vector volume of exactly that class (a label
            # map is a scalar volume too, and the selector does not list it).
            mrmlScene = slicer.mrmlScene
            for i in range(mrmlScene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")):
                node = mrmlScene.GetNthNodeByClass(i, "vtkMRMLVolumeNode")
                if node.GetClassName() in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"):
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = node
        if self._parameterNode:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            if self._parameterNodeGuiTag is None:
                # Slicer 5.8's connectGui returns no tag (5.10 does), so disconnectGui could never
                # undo it; its tags are counted up from 0 per wrapper.
                self._parameterNodeGuiTag = self._parameterNode._nextParameterGUIsTag - 1
            chosen = {m.strip() for m in self._parameterNode.methods.split(",")}
            for m, box in self._methodBoxes.items():
                box.blockSignals(True)
                box.checked = m in chosen
                box.blockSignals(False)
            self.updateModelChoices()
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        """Apply needs an input and a model (local, or the server's), and nothing else running."""
        busy = self.logic is not None and self.logic.busy
        p = self._parameterNode
        problem = self._fitProblem()
        self.ui.fitLabel.setText(problem)
        self.ui.fitLabel.setVisible(bool(problem))
        ready = bool(p) and p.inputVolume is not None and (self._haveModels or p.useServer) and not problem
        self.ui.applyButton.enabled = ready and not busy
        self.ui.trainButton.enabled = not busy
        self.ui.cancelButton.enabled = busy and not self.logic.installing

    def _fitProblem(self) -> str:
        """Why the chosen local model cannot explain the chosen input ('' when it can, or cannot tell yet): a 2-D
        model and a CT volume, or a 3-D model and a radiograph. Other input problems are said on Apply."""
        p = self._parameterNode
        if not p or p.useServer or p.inputVolume is None:
            return ""
        choice = self._choices.get(p.arch)
        if choice is None:
            return ""
        try:
            dimension = inputs.check_input_volume(p.inputVolume)
        except errors.InputVolumeError:
            return ""
        if dimension == choice.dimension:
            return ""
        return texts.dimension_mismatch(p.inputVolume.GetName(), p.inputVolume.GetImageData().GetDimensions(),
                                        p.arch, choice.dimension)

    # ---- model folder ---------------------------------------------------------------------

    def onModelPathEdited(self, path: str) -> None:
        """The model folder field changed (each keystroke, or the node writing it back): list it later.

        Runs before the parameter node's own slot has stored ``path``; writing the node here (the
        architecture) would make it write its old folder back into the field.
        """
        if path != self._listedModelDir:
            self._modelDirTimer.start()

    def onBundlePathEdited(self, path: str) -> None:
        """The bundle reads the model folders: list them again with the new one, as for the model folder."""
        if path != self._listedBundleDir:
            self._modelDirTimer.start()

    def updateModelChoices(self) -> None:
        """Fill the model and replicate choices from the node's folder; say so when it has no usable model."""
        if not self._parameterNode:
            return
        path = str(self._parameterNode.modelDir)
        bundle = self._parameterNode.bundleDir
        self._listedModelDir, self._listedBundleDir = path, str(bundle)
        try:
            choices = controller.model_choices(path, bundle)
            message = controller.no_models_message(path, bundle)
        except errors.SaliencyTrustError as exc:  # the bundle folder holds no bundle: said, not raised in a slot
            choices, message = {}, str(exc)
        self._haveModels = bool(choices)
        self._choices = choices
        self.ui.modelStatusLabel.setText(message)
        self.ui.modelStatusLabel.setVisible(bool(message))
        self.ui.trainWidget.setVisible(bool(message))
        self.ui.archSelector.blockSignals(True)
        self.ui.archSelector.clear()
        for arch in choices:
            self.ui.archSelector.addItem(arch)
        self.ui.archSelector.blockSignals(False)
        if choices:
            wanted = self._parameterNode.arch if self._parameterNode.arch in choices else next(iter(choices))
            self.ui.archSelector.setCurrentIndex(list(choices).index(wanted))
            self.onArchChanged(self.ui.archSelector.currentIndex)
        self.updateButtons()

    def onArchChanged(self, index: int) -> None:
        if not self._parameterNode or index < 0:
            return
        arch = self.ui.archSelector.itemText(index)
        if self._parameterNode.arch != arch:
            self._parameterNode.arch = arch
        choice = controller.model_choices(self._parameterNode.modelDir, self._parameterNode.bundleDir).get(arch)
        seeds = choice.replicates if choice else []
        self.ui.replicateSelector.blockSignals(True)
        self.ui.replicateSelector.clear()
        for seed in seeds:
            self.ui.replicateSelector.addItem(_("copy {k}").format(k=seed), seed)
        self.ui.replicateSelector.blockSignals(False)
        if seeds:
            rep = self._parameterNode.replicate if self._parameterNode.replicate in seeds else seeds[0]
            self.ui.replicateSelector.setCurrentIndex(seeds.index(rep))
            if self._parameterNode.replicate != rep:
                self._parameterNode.replicate = rep

    def onReplicateChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.replicate = int(self.ui.replicateSelector.itemData(index))

    def onMethodsToggled(self, _checked: bool = False) -> None:
        if self._parameterNode:
            self._parameterNode.methods = ",".join(m for m, box in self._methodBoxes.items() if box.checked)

    def onTrain(self) -> None:
        """Train the demo's models for the chosen task in the background, into the chosen folder."""
        if self.logic.busy:  # a click that waited while something else ran
            return
        task = self.ui.taskSelector.currentData
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            if not self.ensureDependencies():
                return
            self.logic.startTraining(self._parameterNode, task, Path(self._parameterNode.trainDir))
            self._busy(True, _("Training the demo's models for {task} into {folder} (about 10 minutes)...").format(
                task=process.DEMO_TASKS[task], folder=self._parameterNode.trainDir), determinate=True)

    # ---- run ------------------------------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """The logic's check and install, once at a time: pip lets the event loop run while it works."""
        if self.logic.installing:
            return False
        self.logic.installing = True
        self.updateButtons()
        try:
            return self.logic.ensureDependencies()
        finally:
            self.logic.installing = False
            self.updateButtons()

    def _busy(self, busy: bool, text: str = "", determinate: bool = False) -> None:
        if busy:
            self.ui.progressBar.setRange(0, 100 if determinate else 0)  # 0..0: Qt's busy indicator
            self.ui.progressBar.setValue(0)
            self._timer.start()
        else:
            self.ui.progressBar.setRange(0, 100)
            self._timer.stop()
        if text:
            self.ui.statusLabel.setText(text)
        self.updateButtons()

    def onApply(self) -> None:
        if self.logic.busy:  # a click that waited while something else ran
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("SaliencyTrust could not start."), waitCursor=True):
            if not p.useServer and not self.ensureDependencies():
                return
            self.ui.statusLabel.setText(_("Exporting the image..."))
            self.logic.start(p, token=self.ui.serverTokenEdit.text or None)
            self._busy(True, _("Computing the maps..."))

    def onPoll(self) -> None:
        lines, finished = self.logic.poll()
        if self.logic.training is not None:
            fraction, text = self.logic.training.progress()
            self.ui.progressBar.setValue(int(round(100 * fraction)))
            if text:
                self.ui.statusLabel.setText(text)
        elif lines:
            self.ui.statusLabel.setText(lines[-1][-160:])
        if not finished:
            return
        try:
            outcome = self.logic.finish(self._parameterNode)
        except errors.CancelledError as exc:  # the user's own cancel: said quietly, not an error
            self.ui.statusLabel.setText(str(exc))
            return
        except errors.SaliencyTrustError as exc:
            self.ui.statusLabel.setText(str(exc))
            slicer.util.errorDisplay(str(exc))
            return
        finally:
            self._busy(self.logic.busy)
        if outcome is None:  # the run was dropped (scene closed)
            return
        if isinstance(outcome, process.TrainingOutcome):  # training ended: models were written
            self.ui.progressBar.setValue(100)
            # The widget's node is gone when the scene was closed while the module was hidden: write to
            # the scene's node, which the panel binds when it is entered again.
            node = self._parameterNode if self._parameterNode is not None else self.logic.getParameterNode()
            node.modelDir = outcome.model_dir
            self.updateModelChoices()
            text = _("Models trained in {path}.").format(path=outcome.model_dir)
            self.ui.statusLabel.setText(text + (" " + outcome.note if outcome.note else ""))
            return
        if self.results is not None:  # an earlier run's volume rendering would stay in the 3-D view
            scene.show_volume_rendering(self.results, None, _renderingLogic())
        self.results = outcome
        self.showResults()

    def onCancel(self) -> None:
        self.logic.cancel()
        self.ui.statusLabel.setText(_("Cancelling..."))

    def showResults(self) -> None:
        r = self.results
        self.ui.predictionLabel.setText(r.summary())
        banner = r.banner()
        self.ui.bannerLabel.setText(banner)
        self.ui.bannerLabel.setVisible(bool(banner))
        self.ui.assessmentLabel.setText(r.assessment_line())
        self.ui.trainingWarningLabel.setText(r.training_note)
        self.ui.trainingWarningLabel.setVisible(bool(r.training_note))
        self.ui.methodSelector.blockSignals(True)
        self.ui.methodSelector.clear()
        names = _methodNames()[0]
        for m in r.map_nodes:
            self.ui.methodSelector.addItem(names.get(m, m), m)
        self.ui.methodSelector.blockSignals(False)
        self.ui.tableView.setMRMLTableNode(r.table_node)
        server = f" ({_('server model')} {self.logic.lastServerModel})" if self.logic.lastServerModel else ""
        self.ui.statusLabel.setText(_("Done in {s} s.").format(s=r.prediction.get("seconds")) + server)
        volume = _isVolume(r)
        rendering = _renderingLogic()
        self.ui.volumeRenderingCheckBox.enabled = volume and rendering is not None
        self.ui.volumeRenderingCheckBox.toolTip = (
            _("Volume rendering needs the Volume Rendering module, which this Slicer does not have.")
            if volume and rendering is None else
            _("Also show the chosen map of a CT volume in the 3-D view, in the overlay's colours; values below 0.1 "
              "are transparent."))
        self.onMethodChanged(self.ui.methodSelector.currentIndex)
        slicer.util.resetSliceViews()  # fit the views to the image
        if volume and r.map_nodes:  # the three views through where the first map points most
            scene.jump_to_peak(slicer.mrmlScene, next(iter(r.map_nodes.values())))

    def onMethodChanged(self, index: int) -> None:
        method = self.ui.methodSelector.itemData(index) if index >= 0 else None
        self._show(method, self._parameterNode.opacity if self._parameterNode else 0.6)

    def onOpacityChanged(self, value: float) -> None:
        # The slider's own value: the parameter node may not have been updated yet.
        self._show(self.ui.methodSelector.currentData, value)

    def onVolumeRenderingToggled(self, checked: bool) -> None:
        # The check box's own value: the parameter node may not have been updated yet.
        self._render(self.ui.methodSelector.currentData, checked)

    def _show(self, method, opacity: float) -> None:
        if controller.show_method(slicer.mrmlScene, self.results, method, opacity):
            scene.show_legend(self.results, method, slicer.modules.colors.logic())
            self._render(method, bool(self._parameterNode and self._parameterNode.volumeRendering))

    def _render(self, method, visible: bool) -> None:
        """The chosen map volume-rendered in the 3-D view (a CT volume's maps only), or every rendering hidden."""
        if _isVolume(self.results):
            scene.show_volume_rendering(self.results, method if visible else None, _renderingLogic())


def _renderingLogic():
    """The Volume Rendering module's logic, or None in an application without it."""
    module = getattr(slicer.modules, "volumerendering", None)
    return module.logic() if module is not None else None


def _isVolume(results) -> bool:
    """Whether ``results`` are a CT volume's maps (several slices) rather than a radiograph's."""
    if results is None or not results.map_nodes:
        return False
    node = next(iter(results.map_nodes.values()))
    return node.GetImageData() is not None and node.GetImageData().GetDimensions()[2] > 1


class SaliencyTrustLogic(ScriptedLoadableModuleLogic):
    """Adapter from the parameter node to ``SaliencyTrustLib`` (one run at a time)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.run = None
        self.training = None
        self.installing = False  # the dependency install is running (it lets the event loop run)
        self.lastServerModel = None

    @property
    def busy(self) -> bool:
        return self.run is not None or self.training is not None or self.installing

    def getParameterNode(self):
        return SaliencyTrustParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """Install what the bundle needs into Slicer's Python, after asking; never replace Slicer's torch."""
        too_old = deps.python_problem()  # Slicer 5.8 (Python 3.9): said before anything is downloaded
        if too_old:
            slicer.util.errorDisplay(too_old)
            return False
        problem = deps.torch_problem()
        if problem:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("SaliencyTrust needs PyTorch {v} or later ({why}): install the PyTorch "
                                           "extension from the Extensions Manager and restart Slicer.").format(
                    v=deps.TORCH_MIN, why=problem))
                return False
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=f">={deps.TORCH_MIN}")
            if torch is None or deps.torch_problem():
                return False
        requirements = MODULE_DIR / "Resources" / "requirements.txt"
        missing = deps.unmet(deps.read_requirements(requirements))
        if missing:
            wheels = slicer.util.settingsValue("SaliencyTrust/WheelFolder", "") or None
            where = _("from the wheel folder {w}").format(w=wheels) if wheels else _("from the internet")
            if not slicer.util.confirmOkCancelDisplay(
                    _("SaliencyTrust runs a MONAI bundle and needs these Python packages in Slicer's Python:\n\n")
                    + "\n".join(missing)
                    + _("\n\nInstall them now {where}? Slicer's PyTorch is kept as it is.").format(where=where)):
                return False
            constraints = Path(tempfile.mkdtemp(prefix="SaliencyTrust-")) / "constraints.txt"
            constraints.write_text(deps.constraints_text())
            slicer.util.pip_install(deps.pip_arguments(requirements, constraints, wheels))
            importlib.invalidate_caches()
            still = deps.unmet(deps.read_requirements(requirements))
            if still:
                slicer.util.errorDisplay(_("These packages are still missing after installing: {m}").format(
                    m=", ".join(still)))
                return False
        absent = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
        if absent:
            slicer.util.errorDisplay(_("Python modules missing: {m}").format(m=", ".join(absent)))
            return False
        return True

    def settings(self, p, token: "str | None" = None) -> controller.Settings:
        """A snapshot of the parameter node (read on the Qt thread); ``token`` is the server's, from the panel."""
        methods = [m.strip() for m in p.methods.split(",") if m.strip()]
        if not methods:
            raise errors.SaliencyTrustError(_("Choose at least one saliency method."))
        choice = controller.model_choices(p.modelDir, p.bundleDir).get(p.arch)
        if choice is None and not p.useServer:
            raise errors.SaliencyTrustError(_("Choose a model: {folder} has no model named '{name}'.").format(
                folder=p.modelDir, name=p.arch))
        request = process.Request(bundle_dir=str(p.bundleDir), model_dir=choice.folder if choice else str(p.modelDir),
                                  arch=choice.arch if choice else "", replicate=p.replicate, methods=methods,
                                  preset=p.preset)
        server_model = slicer.util.settingsValue("SaliencyTrust/ServerModel", "") or None
        local = choice is not None and not p.useServer
        return controller.Settings(volume=p.inputVolume, score_node=p.scoreAgainst, request=request,
                                   use_server=p.useServer, server_url=p.serverUrl, token=token or None,
                                   server_model=server_model, training_note=choice.training_note if local else "",
                                   model_dimension=choice.dimension if local else None, model_name=p.arch)

    def start(self, p, token: "str | None" = None) -> None:
        """Check and export the input, then launch the bundle (local) or the upload (server); returns at once."""
        self.cancel()
        self.run = controller.Run(self.settings(p, token)).start()

    def startTraining(self, p, task: str, root: Path) -> None:
        """The demo's models for ``task`` under ``root``, in the background."""
        self.cancel()
        self.training = process.TrainProcess(p.bundleDir, root, task).start()

    def poll(self) -> tuple:
        if self.training is not None:
            return self.training.new_lines(), not self.training.running
        if self.run is None:
            return [], True
        return self.run.poll()

    def finish(self, p):
        """The ended work's outcome: Results of a run, a TrainingOutcome, or None (nothing was running)."""
        if self.training is not None:
            training, self.training = self.training, None
            return training.outcome()
        if self.run is None:
            return None
        run, self.run = self.run, None
        results = run.finish(slicer.mrmlScene)
        self.lastServerModel = run.model_name
        return results

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()
        if self.training is not None:
            self.training.cancel()

    def dropRun(self) -> None:
        """Stop the run and forget it: its results never reach the scene."""
        run, self.run = self.run, None
        if run is not None:
            run.cancel()
            run.discard()


class SaliencyTrustTest(ScriptedLoadableModuleTest):
    """Reload & Test inside a real Slicer: SynthCXR DICOM -> bundle -> overlays and table, in seconds.

    Needs no git checkout and no training: it uses the bundle the module found (installed beside it
    or in a checkout), a SynthCXR study and two untrained 64 px fixture replicates the bundle makes
    in seconds. It needs the bundle's Python dependencies; ctest runs it only when the build sets
    SaliencyTrust_TEST_WITH_DEPENDENCIES (see CMakeLists.txt), as SlicerTotalSegmentator does.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_parameter_node_fields_bind()
        self.setUp()
        self.test_bad_input_leaves_scene_unchanged()
        self.setUp()
        self.test_local_run()

    def test_parameter_node_fields_bind(self) -> None:
        """Every parameter-node field has a serializer, and node fields name concrete classes."""
        from slicer.parameterNodeWrapper import getNodeTypes, isNodeOrUnionOfNodes

        node = SaliencyTrustLogic().getParameterNode()
        for name, info in node.allParameters.items():
            if isNodeOrUnionOfNodes(info.unalteredType):
                self.assertTrue(getNodeTypes(info.unalteredType), name)

    def test_bad_input_leaves_scene_unchanged(self) -> None:
        self.delayDisplay("Bad input")
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.zeros((5, 16, 16), np.int16), name="CT-like")
        colour = slicer.util.addVolumeFromArray(np.zeros((5, 16, 16, 3), np.uint8), name="colour volume",
                                                nodeClassName="vtkMRMLVectorVolumeNode")
        before = slicer.mrmlScene.GetNumberOfNodes()
        self.assertEqual(inputs.check_input_volume(volume), 3)  # a CT volume: for a 3-D model
        with self.assertRaises(errors.InputVolumeError):
            inputs.check_model_fits(volume, 2, "a 2-D model")
        with self.assertRaises(errors.InputVolumeError):
            inputs.check_input_volume(colour)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_local_run(self) -> None:
        self.delayDisplay("Fixture models and a SynthCXR study, then the bundle")
        import numpy as np

        root = Path(tempfile.mkdtemp(prefix="SaliencyTrustTest-"))
        models = process.make_fixture_models(str(DEFAULT_BUNDLE), root / "models")
        study = process.make_sample_study(str(DEFAULT_BUNDLE), root / "study")
        volume = slicer.util.loadVolume(str(study), {"singleFile": True})
        request = process.Request(bundle_dir=str(DEFAULT_BUNDLE), model_dir=str(models),
                                  methods=("grad", "gradcam", "gbp"), preset="quick")
        results = controller.run_local(slicer.mrmlScene, volume, request, root / "work", timeout=900)
        self.assertEqual(set(results.map_nodes), {"grad", "gradcam", "gbp"})
        for node in results.map_nodes.values():
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            values = slicer.util.arrayFromVolume(node)
            self.assertTrue(values.min() >= 0 and values.max() <= 1)
            self.assertTrue(np.allclose(node.GetSpacing(), volume.GetSpacing()))
            self.assertEqual(scene.map_input(slicer.mrmlScene, node), volume)
        self.assertTrue(controller.show_method(slicer.mrmlScene, results, "gradcam", 0.5) > 0)
        self.assertIsNotNone(scene.show_legend(results, "gradcam", slicer.modules.colors.logic()))
        self.assertEqual(results.table_node.GetNumberOfRows(), 3)
        self.assertTrue(results.table_node.GetLocked())
        self.delayDisplay("Test passed")
