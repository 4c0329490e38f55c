"""SaliencyTrust: saliency maps of a chest X-ray classifier as overlays, with how far each can be trusted.

A thin shell over ``SaliencyTrustLib`` (all logic, no Qt): the widget binds its controls to a
parameter node, starts the bundle's inference workflow out of process (PythonSlicer), polls it
with a timer so the UI stays responsive, and hands the finished outputs to the library, which
puts one overlay per method and a trust table into the scene.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Optional  # noqa: UP035  (parameterNodeWrapper reads these annotations)

import qt
import slicer
from SaliencyTrustLib import logic as lib
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
#: The bundle ships beside the module in a source checkout; the setting below overrides it.
DEFAULT_BUNDLE = MODULE_DIR.parent / "monai_bundle"
#: Imported by the bundle process; SimpleITK, pydicom, numpy, scipy already ship with Slicer.
NEEDED_MODULES = ("torch", "monai", "ignite", "skimage", "sklearn", "nibabel", "tqdm")


class SaliencyTrust(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SaliencyTrust")
        self.parent.categories = [_("Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["SaliencyTrust team"]
        self.parent.helpText = _(
            "Explains a chest X-ray classifier's prediction with eight saliency methods and shows, beside each map, "
            "whether the method passed the trust criteria of Arun et al. (Radiology: AI 2021) on validation data: "
            "localization utility, sensitivity to weight randomization, repeatability and reproducibility. "
            "Live checks for this image: agreement with a second replicate and with a randomized model, and "
            "AUPRC against a segmentation or ROI when one is given.")
        self.parent.acknowledgementText = _("Built on MONAI and 3D Slicer.")


@parameterNodeWrapper
class SaliencyTrustParameterNode:
    """The module's state: every widget binds to one of these through its SlicerParameterName."""

    inputVolume: vtkMRMLScalarVolumeNode
    scoreAgainst: Optional[vtkMRMLNode]  # noqa: UP045  segmentation or markups ROI
    bundleDir: Path = DEFAULT_BUNDLE  # ctkPathLineEdit binds to pathlib.Path fields
    modelDir: Path = DEFAULT_BUNDLE / "models"
    arch: str = "inception_v3"
    replicate: int = 0
    methods: str = ",".join(lib.METHODS)
    preset: str = "quick"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    useServer: bool = False
    serverUrl: str = "http://127.0.0.1:8000"


class SaliencyTrustWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: inputs, Apply/Cancel, progress, prediction, banner, method switcher and opacity."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self.results = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SaliencyTrust.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SaliencyTrustLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.methodSelector.connect("currentTextChanged(QString)", self.onMethodChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.bannerLabel.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, node) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ---- run ------------------------------------------------------------------------------

    def onApply(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("SaliencyTrust could not start."), waitCursor=True):
            if not p.useServer and not self.logic.ensureDependencies():
                return
            self.ui.statusLabel.setText(_("Exporting the image..."))
            self.logic.start(p)
            self.ui.applyButton.setEnabled(False)
            self.ui.cancelButton.setEnabled(True)
            self.ui.progressBar.setMaximum(0)  # busy indicator
            self._timer = qt.QTimer()
            self._timer.timeout.connect(self.onPoll)
            self._timer.start(500)

    def onPoll(self) -> None:
        lines, finished = self.logic.poll()
        if lines:
            self.ui.statusLabel.setText(lines[-1][-120:])
        if not finished:
            return
        self._timer.stop()
        self.ui.progressBar.setMaximum(100)
        self.ui.applyButton.setEnabled(True)
        self.ui.cancelButton.setEnabled(False)
        try:
            self.results = self.logic.finish(self._parameterNode)
        except lib.SaliencyTrustError as exc:
            self.ui.statusLabel.setText(str(exc))
            slicer.util.errorDisplay(str(exc))
            return
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
        self.ui.methodSelector.blockSignals(True)
        self.ui.methodSelector.clear()
        for m in r.map_nodes:
            self.ui.methodSelector.addItem(m)
        self.ui.methodSelector.blockSignals(False)
        self.ui.tableView.setMRMLTableNode(r.table_node)
        self.ui.statusLabel.setText(_("Done in {s} s.").format(s=r.prediction.get("seconds")))
        self.onMethodChanged(self.ui.methodSelector.currentText)

    def onMethodChanged(self, method: str) -> None:
        if self.results and method in self.results.map_nodes:
            lib.show_overlay(slicer.mrmlScene, self._parameterNode.inputVolume, self.results.map_nodes[method],
                             self._parameterNode.opacity)

    def onOpacityChanged(self, value: float) -> None:
        self.onMethodChanged(self.ui.methodSelector.currentText)


class SaliencyTrustLogic(ScriptedLoadableModuleLogic):
    """Adapter from the parameter node to ``SaliencyTrustLib`` (one run at a time)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.process = None
        self.work = None
        self.server = None  # (thread, {"out" | "error": ...}) while a server request runs
        self.cancelled = False

    def getParameterNode(self):
        return SaliencyTrustParameterNode(super().getParameterNode())

    def ensureDependencies(self) -> bool:
        """Install what the bundle needs into Slicer's Python, after asking; torch via the PyTorch extension."""
        missing = [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
        if not missing:
            return True
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_("SaliencyTrust needs PyTorch: install the PyTorch extension from the "
                                           "Extensions Manager and restart Slicer."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                             torchVersionRequirement=">=2.4") is None:
                return False
        requirements = self.resourcePath("requirements.txt")
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(requirements), requester="SaliencyTrust")
        else:
            text = Path(requirements).read_text()
            if not slicer.util.confirmOkCancelDisplay(
                    _("SaliencyTrust runs a MONAI bundle and needs these Python packages in Slicer's Python:\n\n")
                    + text + _("\nInstall them now? This takes a few minutes and needs internet access.")):
                return False
            for line in text.splitlines():
                line = line.split("#")[0].strip()
                if line:
                    slicer.util.pip_install(line)
        return all(importlib.util.find_spec(m) is not None for m in NEEDED_MODULES)

    def resourcePath(self, name: str) -> str:
        return str(MODULE_DIR / "Resources" / name)

    def request(self, p) -> lib.Request:
        methods = [m.strip() for m in p.methods.split(",") if m.strip()]
        return lib.Request(bundle_dir=str(p.bundleDir), model_dir=str(p.modelDir), arch=p.arch, replicate=p.replicate,
                           methods=methods, preset=p.preset)

    def start(self, p) -> None:
        """Check and export the input, then launch the bundle (local) or the upload (server); returns at once."""
        self.cancel()
        self.cancelled = False
        self.work = Path(tempfile.mkdtemp(prefix="SaliencyTrust-"))
        image, mask = lib.prepare(p.inputVolume, p.scoreAgainst, self.work / "input")
        if p.useServer:
            from SaliencyTrustLib import client

            token = os.environ.get("SALIENCY_TRUST_TOKEN") or slicer.util.settingsValue("SaliencyTrust/Token", "")
            box = {}
            request, url, out = self.request(p), p.serverUrl, self.work / "output"

            def call() -> None:  # the HTTP round trip off the Qt thread; no Qt or MRML calls in here
                try:
                    box["out"] = client.infer(url, p.arch, image, out, request, mask=mask, token=token or None)
                except Exception as exc:  # handed to finish() on the Qt thread
                    box["error"] = exc

            thread = threading.Thread(target=call, daemon=True)
            thread.start()
            self.server, self.process = (thread, box), None
        else:
            self.process = lib.BundleProcess(self.request(p), image, self.work / "output", mask).start()

    def poll(self) -> tuple[list[str], bool]:
        if self.server is not None:
            return [], not self.server[0].is_alive()
        if self.process is None:
            return [], True
        return self.process.new_lines(), not self.process.running

    def finish(self, p):
        try:
            if self.server is not None:
                box = self.server[1]
                if self.cancelled:
                    raise lib.BundleError("Cancelled; nothing was added to the scene.")
                if "error" in box:
                    err = box["error"]
                    raise err if isinstance(err, lib.SaliencyTrustError) else lib.BundleError(str(err))
                out = box["out"]
            else:
                out = self.process.result()
            return lib.load_results(slicer.mrmlScene, p.inputVolume, out)
        finally:
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)
            self.process, self.work, self.server = None, None, None

    def cancel(self) -> None:
        self.cancelled = True
        if self.process is not None:
            self.process.cancel()


class SaliencyTrustTest(ScriptedLoadableModuleTest):
    """The pytest scenario inside a real Slicer: SynthCXR DICOM -> bundle -> overlays and table.

    Trains two small DenseNet121 replicates first (about a minute on a laptop CPU).
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_bad_input_leaves_scene_unchanged()
        self.setUp()
        self.test_local_run()

    def _bundle(self) -> tuple[Path, Path, Path]:
        import subprocess
        import sys

        root = Path(tempfile.mkdtemp(prefix="SaliencyTrustTest-"))
        py = lib.default_python()
        env = dict(os.environ, PYTHONPATH=str(DEFAULT_BUNDLE))
        subprocess.run([py, "-m", "saliency_trust.data.synth", "--task", "opacity", "--n", "48", "--size", "64",
                        "--seed", "11", "--out", str(root / "data")], check=True, env=env)
        configs = DEFAULT_BUNDLE / "configs"
        for seed in (0, 1):
            subprocess.run([py, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json"),
                            "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(DEFAULT_BUNDLE),
                            "--dataset_dir", str(root / "data"), "--output_dir", str(root / "models"),
                            "--arch", "densenet121", "--seed", str(seed), "--max_epochs", "2",
                            "--image_size", "64", "--batch_size", "8"], check=True, env=env)
        dicom = next(iter(sorted((root / "data" / "stage_2_train_images").glob("*.dcm"))))
        logging.info("SaliencyTrustTest data in %s (%s)", root, sys.executable)
        return root, root / "models", dicom

    def test_bad_input_leaves_scene_unchanged(self) -> None:
        self.delayDisplay("Bad input")
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.zeros((5, 16, 16), np.int16), name="CT-like")
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(lib.InputVolumeError):
            lib.check_input_volume(volume)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)

    def test_local_run(self) -> None:
        self.delayDisplay("Training two small replicates and running the bundle")
        root, models, dicom = self._bundle()
        volume = slicer.util.loadVolume(str(dicom), {"singleFile": True})
        request = lib.Request(bundle_dir=str(DEFAULT_BUNDLE), model_dir=str(models), arch="densenet121",
                              methods=("grad", "gradcam", "gbp"), preset="quick")
        results = lib.run_local(slicer.mrmlScene, volume, request, root / "work", timeout=900)
        self.assertEqual(set(results.map_nodes), {"grad", "gradcam", "gbp"})
        import numpy as np

        for node in results.map_nodes.values():
            self.assertEqual(node.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            values = slicer.util.arrayFromVolume(node)
            self.assertTrue(values.min() >= 0 and values.max() <= 1)
            self.assertTrue(np.allclose(node.GetSpacing(), volume.GetSpacing()))
        lib.show_overlay(slicer.mrmlScene, volume, results.map_nodes["gradcam"], 0.5)
        self.assertEqual(results.table_node.GetNumberOfRows(), 3)
        self.delayDisplay("Test passed")
