"""What the module's widget does, reached without the Slicer application.

(a) Every parameter-node field type works with Slicer's parameterNodeWrapper, checked the way its
    node combo-box connector does it (``getNodeTypes`` instantiates each node class to read its
    class name): an abstract class there crashes ``setup()`` in a real Slicer.
(b) The widget's logic paths through ``SaliencyTrustLib.controller`` with real MRML nodes and a
    real bundle process: method switcher pairing, opacity, cancel, results replacing the previous
    run under the input's study, the table a clinician reads. (Server-mode model choice runs
    against a real service in ``tests/service``.)
(c) The extension's CMake install carries the bundle, and the module's self-test scenario (fixture
    models, SynthCXR study, no training) runs from that install tree, outside the git checkout.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

MODULE_DIR = REPO / "SaliencyTrust"
slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
sys.path.insert(0, str(MODULE_DIR))

from SaliencyTrustLib import client, controller, deps, texts  # noqa: E402
from SaliencyTrustLib.bundle import find_bundle  # noqa: E402
from SaliencyTrustLib.errors import BundleError, CancelledError, SaliencyTrustError  # noqa: E402
from SaliencyTrustLib.inputs import dicom_series_uid  # noqa: E402
from SaliencyTrustLib.process import Request, TrainProcess, make_fixture_models, make_sample_study  # noqa: E402
from SaliencyTrustLib.scene import OVERLAY_FLOOR, RunOutput, map_input, nodes_by_class, run_nodes, show_legend  # noqa: E402
from SaliencyTrustLib.texts import CRITERIA, PRESETS, trust_word  # noqa: E402

from tests.slicer.test_module import load_dicom, request, table_rows  # noqa: E402

# ---------------------------------------------------------------------------------------------
# (a) parameter node field types


class _Validator:
    def __init__(self, *args, **kwargs) -> None:
        self.args = args


def _node_types(annotation) -> tuple[str, ...]:
    """Slicer's ``parameterNodeWrapper.util.getNodeTypes`` rule: instantiate each node class.

    Written from Base/Python/slicer/parameterNodeWrapper/util.py (Slicer main, 5.8-5.12 alike).
    """
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, slicer.vtkMRMLNode):
        return (annotation().GetClassName(),)
    if typing.get_origin(annotation) is typing.Union:
        classes = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode)]
        return tuple(c().GetClassName() for c in classes)
    raise TypeError(f"not a node annotation: {annotation}")


def _is_node_annotation(annotation) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return issubclass(annotation, slicer.vtkMRMLNode)
    return typing.get_origin(annotation) is typing.Union and any(
        isinstance(a, type) and issubclass(a, slicer.vtkMRMLNode) for a in typing.get_args(annotation))


def _parameter_annotations(source: str) -> dict:
    """The parameter node class's field annotations, evaluated against slicer-core's MRML classes."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SaliencyTrustParameterNode")
    namespace = {name: getattr(slicer, name) for name in dir(slicer) if name.startswith("vtkMRML")}
    namespace.update(typing.__dict__)
    namespace.update(Path=Path, WithinRange=_Validator, Choice=_Validator, texts=texts)
    return {n.target.id: eval(compile(ast.Expression(n.annotation), "<annotation>", "eval"), namespace)  # noqa: S307
            for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_every_parameter_node_node_field_names_concrete_classes():
    fields = _parameter_annotations((MODULE_DIR / "SaliencyTrust.py").read_text())
    nodes = {k: v for k, v in fields.items() if _is_node_annotation(v)}
    assert set(nodes) == {"inputVolume", "scoreAgainst"}
    assert _node_types(nodes["inputVolume"]) == ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")
    assert _node_types(nodes["scoreAgainst"]) == ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode")
    # The node types match what the .ui file's combo box lists.
    ui = (MODULE_DIR / "Resources" / "UI" / "SaliencyTrust.ui").read_text()
    assert "<string>vtkMRMLSegmentationNode</string><string>vtkMRMLMarkupsROINode</string>" in ui
    # The same check fails on the annotation the module had (an abstract class): this is the crash.
    with pytest.raises(TypeError, match="abstract"):
        _node_types(typing.Optional[slicer.vtkMRMLNode])  # noqa: UP045


def test_choice_fields_hold_their_default_and_the_bound_widgets_exist():
    fields = _parameter_annotations((MODULE_DIR / "SaliencyTrust.py").read_text())
    preset = typing.get_args(fields["preset"])
    assert preset[0] is str and list(preset[1].args[0]) == list(PRESETS)
    ui = (MODULE_DIR / "Resources" / "UI" / "SaliencyTrust.ui").read_text()
    bound = set(__import__("re").findall(r'SlicerParameterName" stdset="0"><string>(\w+)</string>', ui))
    assert bound <= set(fields), bound - set(fields)
    # Model, method and preset choices are lists, not free text.
    for free in ("archEdit", "methodsEdit", "presetEdit"):
        assert f'name="{free}"' not in ui
    for chosen in ("archSelector", "replicateSelector", "presetSelector", "methodsBox", "researchLabel"):
        assert f'name="{chosen}"' in ui


# ---------------------------------------------------------------------------------------------
# (b) the widget's logic paths


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.mrmlScene = s
    for name in ("Red", "Yellow", "Green"):
        c = s.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        c.SetLayoutName(name)
    yield s
    s.Clear(1)


def _composites(scene) -> list:
    return nodes_by_class(scene, "vtkMRMLSliceCompositeNode")


@pytest.mark.slow
def test_switcher_pairs_each_map_with_its_own_volume_and_applies_the_sliders_value(scene, trained_bundle, tmp_path):
    a = load_dicom(scene, trained_bundle["dicom"])
    b = load_dicom(scene, sorted((trained_bundle["data"] / "stage_2_train_images").glob("*.dcm"))[1])
    ra = controller.Run(controller.Settings(a, None, request(trained_bundle, methods=("grad", "gradcam"))),
                        tmp_path / "a").start()
    ra.process.wait(600)
    res_a = ra.finish(scene)
    # The user now selects volume b: switching maps of a's run must still show them over a.
    assert controller.show_method(scene, res_a, "gradcam", 0.35) == 3
    for c in _composites(scene):
        assert c.GetBackgroundVolumeID() == a.GetID() and c.GetForegroundVolumeID() == res_a.map_nodes[
            "gradcam"].GetID()
        assert c.GetForegroundOpacity() == pytest.approx(0.35)  # the value given, not a stale parameter
    assert map_input(scene, res_a.map_nodes["grad"]) is a and b is not a
    # Low values are transparent: Slicer's threshold on the map's display node.
    disp = res_a.map_nodes["gradcam"].GetDisplayNode()
    assert disp.GetApplyThreshold() and disp.GetLowerThreshold() == pytest.approx(OVERLAY_FLOOR)
    # A colour legend for the shown map only.
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    legend = show_legend(res_a, "gradcam", colors)
    assert legend is not None and legend.GetVisibility()
    show_legend(res_a, "grad", colors)
    assert not colors.GetColorLegendDisplayNode(res_a.map_nodes["gradcam"]).GetVisibility()
    # The work folder is gone.
    assert not ra.work.exists()


@pytest.mark.slow
def test_a_second_run_replaces_the_first_under_the_inputs_study_and_the_table_reads_in_words(
        scene, trained_bundle, tmp_path):
    volume = load_dicom(scene, trained_bundle["dicom"])
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, volume)  # what the DICOM module does when it loads a series

    def run(folder: str) -> RunOutput:
        r = controller.Run(controller.Settings(volume, None, request(trained_bundle, methods=("grad", "gradcam"))),
                           tmp_path / folder).start()
        r.process.wait(600)
        return r.finish(scene)

    first = run("one")
    assert sh.GetItemParent(first.folder_item) == study
    for node in (*first.map_nodes.values(), first.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == first.folder_item
    assert "densenet121" in sh.GetItemName(first.folder_item)
    n_nodes = scene.GetNumberOfNodes()
    second = run("two")
    assert all(not scene.IsNodePresent(n) for n in (*first.map_nodes.values(), first.table_node))
    assert sh.GetNumberOfItemChildren(study) == 2  # the volume and the new run's folder; the old folder went
    assert sh.GetItemParent(second.folder_item) == study and second.folder_item != first.folder_item
    assert scene.GetNumberOfNodes() == n_nodes  # replaced, not piled up
    assert len(run_nodes(scene, volume)) == 3

    # The table: headers in words, method names, read-only, rules in the header tooltips.
    table = second.table_node
    assert table.GetLocked() and table.GetUseColumnTitleAsColumnHeader()
    assert table.GetColumnTitle("reproducibility") == "Agrees with a second model"
    assert table.GetColumnTitle("randomization") == "Changes when weights are randomized"
    assert "Good: pass" in table.GetColumnDescription("utility")
    assert "Rule:" in table.GetColumnDescription("utility")
    rows = table_rows(table)
    assert [r["method"] for r in rows] == ["Gradient", "Grad-CAM"]
    saved = json.loads((trained_bundle["model"] / "results.json").read_text())
    for r, m in zip(rows, ("grad", "gradcam"), strict=True):
        passed = [saved["verdicts"][m][c]["passed"] for c in CRITERIA]
        if False in passed:
            assert r["trust"].startswith("Fails: ")
        elif all(p is True for p in passed):
            assert r["trust"] == "Passes all four"
        else:
            assert r["trust"].startswith("Not fully judged (n/a")
        assert "(n = " in r["details"]
    line = second.assessment_line()
    assert "synthetic SynthCXR images, not patients" in line and f"{saved['data']['n_images']} " in line
    assert second.summary().startswith("Lung opacity: predicted ")


def test_trust_word_never_counts_na_as_a_pass():
    assert trust_word({c: True for c in CRITERIA}) == ("Passes all four", [])
    word, fails = trust_word({"utility": True, "randomization": None, "repeatability": True,
                                "reproducibility": True})
    assert word.startswith("Not fully judged") and "changes when weights are randomized" in word and not fails
    word, fails = trust_word({"utility": False, "randomization": None, "repeatability": True,
                                "reproducibility": False})
    assert fails == ["utility", "reproducibility"] and word.startswith("Fails: points at the lesion")
    assert trust_word(None) == ("Unknown (no assessment)", [])


@pytest.mark.slow
def test_cancel_stops_the_bundles_process_tree_quietly_and_cleans_up(scene, trained_bundle, tmp_path):
    volume = load_dicom(scene, trained_bundle["dicom"])
    before = scene.GetNumberOfNodes()
    run = controller.Run(controller.Settings(volume, None, request(trained_bundle)), tmp_path / "c").start()
    pid = run.process._proc.pid
    run.cancel()
    lines, finished = run.poll()
    assert finished
    with pytest.raises(CancelledError):
        run.finish(scene)
    assert run.process._proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole group is gone
    assert scene.GetNumberOfNodes() == before and not run.work.exists()


def test_server_model_is_chosen_from_info_by_architecture():
    info = {"models": {"default": {"architecture": "inception_v3"}, "opacity": {"architecture": "densenet121"},
                       "pneumothorax": {"architecture": "densenet121"}}}
    assert client.choose_model(info, "inception_v3") == "default"
    assert client.choose_model(info, "densenet121") == "opacity"  # several: the first by name
    assert client.choose_model(info, None, "pneumothorax") == "pneumothorax"
    with pytest.raises(BundleError, match="no resnet50 model; it offers: default"):
        client.choose_model(info, "resnet50")
    with pytest.raises(BundleError, match="no model named 'x'"):
        client.choose_model(info, "densenet121", "x")
    with pytest.raises(BundleError, match="offers no model"):
        client.choose_model({"models": {}}, "densenet121")


@pytest.mark.slow
def test_train_demo_models_runs_in_the_background_and_can_be_cancelled(tmp_path):
    """The panel's first-run offer: the demo's training for one task, as a child process (tiny settings here)."""
    with pytest.raises(SaliencyTrustError, match="Unknown task"):
        TrainProcess(REPO / "monai_bundle", tmp_path / "x", "fracture")
    stopped = TrainProcess(REPO / "monai_bundle", tmp_path / "stopped", "opacity", python=sys.executable).start()
    stopped.cancel()
    with pytest.raises(CancelledError):
        stopped.result()
    tiny = ["--n", "48", "--size", "80", "--epochs", "1", "--densenet-epochs", "1", "--baseline-epochs", "1",
            "--skip-assessment", "--min-auc", "0"]
    train = TrainProcess(REPO / "monai_bundle", tmp_path / "demo", "pneumothorax", python=sys.executable,
                           extra_args=tiny).start()
    fractions = []
    while train.running:  # what the panel's progress bar shows, from the demo's own lines as they come
        fractions.append(train.progress()[0])
        time.sleep(0.2)
    train.wait(600)
    fractions.append(train.progress()[0])
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(0.99), fractions
    assert train.outcome().model_dir == train.model_dir
    assert train.model_dir == tmp_path / "demo" / "models" / "pneumothorax"
    choices = controller.model_choices(train.model_dir)  # the U-Net folder is a localizer: not offered
    assert {k: c.replicates for k, c in choices.items()} == {"densenet121": [0, 1], "inception_v3": [0]}
    assert choices["densenet121"].folder == str(train.model_dir / "densenet121")
    assert not (tmp_path / "demo" / "models" / "opacity").exists()  # one task only, no shortcut model
    assert not (tmp_path / "demo" / "models" / "opacity_shortcut").exists()
    record = json.loads((train.model_dir / "densenet121" / "seed0.metrics.json").read_text())
    assert record["task"] == "pneumothorax" and record["image_size"] == 80  # InceptionV3 needs >= 75 px
    assert controller.no_models_message(train.model_dir) == ""


def test_the_libs_copies_of_the_engines_names_agree_with_the_engine():
    from saliency_trust.results import CRITERION_TITLES
    from saliency_trust.saliency import METHODS
    from saliency_trust.saliency.presets import PRESETS

    assert tuple(texts.METHODS) == tuple(METHODS) and set(texts.METHOD_NAMES) == set(METHODS)
    assert set(texts.PRESETS) == set(PRESETS)
    assert texts.CRITERION_TITLES == CRITERION_TITLES


def test_model_folder_choices_and_the_empty_folder_sentence(tmp_path):
    assert controller.model_choices(tmp_path / "missing") == {}
    assert "No trained models in" in controller.no_models_message(tmp_path)
    # A broken manifest alone: the sentence says what is wrong with it, naming the field.
    broken = tmp_path / "mine"
    broken.mkdir()
    (broken / "model.json").write_text(json.dumps({"schema_version": 1, "network": "densenet121", "weights": "w.pt",
                                                   "input": {"size": 64}, "classes": ["a", "b"], "colour": 1}))
    assert controller.model_choices(tmp_path) == {}
    assert "'colour' is not a model.json field" in controller.no_models_message(tmp_path)
    # An older flat folder: one choice per architecture, named by it.
    for name in ("densenet121_seed1.pt", "densenet121_seed0.pt", "inception_v3_seed0.pt", "notes.pt"):
        (tmp_path / name).write_bytes(b"")
    choices = controller.model_choices(tmp_path)
    assert {k: (c.arch, c.replicates) for k, c in choices.items()} == {"densenet121": ("densenet121", [0, 1]),
                                                                     "inception_v3": ("inception_v3", [0])}
    assert choices["densenet121"].folder == str(tmp_path)
    assert controller.no_models_message(tmp_path) == ""


def test_dependencies_pin_the_torch_present_and_install_offline(tmp_path):
    import importlib.metadata

    text = deps.constraints_text()
    assert f"torch=={importlib.metadata.version('torch')}" in text
    assert f"numpy=={importlib.metadata.version('numpy')}" in text
    reqs = deps.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {r.name for r in reqs}
    assert "torch" not in names and "torchvision" not in names and "captum" not in names
    assert not deps.unmet(reqs), deps.unmet(reqs)  # this environment has them all
    assert deps.torch_problem() == ""
    from packaging.requirements import Requirement

    assert deps.unmet([Requirement("monai>=99")])[0].startswith("monai>=99 (found ")
    assert deps.unmet([Requirement("no-such-dist-xyz")]) == ["no-such-dist-xyz (not installed)"]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    args = deps.pip_arguments("req.txt", "c.txt", wheels)
    assert args == ["-r", "req.txt", "-c", "c.txt", "--no-index", "--find-links", str(wheels)]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        deps.pip_arguments("req.txt", "c.txt", tmp_path / "none")
    # Every module the bundle imports is installed by the requirements or ships with Slicer.
    module = (MODULE_DIR / "SaliencyTrust.py").read_text()
    needed = ast.literal_eval(module.split("NEEDED_MODULES = ", 1)[1].split("\n", 1)[0])
    assert "sklearn" not in needed and "nibabel" not in needed


# ---------------------------------------------------------------------------------------------
# (c) the extension's install tree


STUB = """
cmake_minimum_required(VERSION 3.16)
project(StubSlicerExtension NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
# Slicer's macro copies SCRIPTS and RESOURCES beside each other (CMake/SlicerMacroBuildScriptedModule.cmake
# through ctkMacroCompilePythonScript); the stub does the same for what this test needs.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    get_filename_component(d ${f} DIRECTORY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${f} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${d})
  endforeach()
endmacro()
set(BUILD_TESTING OFF)
add_subdirectory(@MODULE@ module)
"""


@pytest.mark.slow
def test_the_installed_extension_carries_the_bundle_and_runs_outside_the_checkout(tmp_path):
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    src = tmp_path / "stub"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(STUB.replace("@MODULE@", str(MODULE_DIR)))
    build, prefix = tmp_path / "build", tmp_path / "install"
    for cmd in ([cmake, "-S", str(src), "-B", str(build)], [cmake, "--install", str(build), "--prefix", str(prefix)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    modules = prefix / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    assert (modules / "SaliencyTrust.py").is_file()
    lib_files = [p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "SaliencyTrustLib").glob("*.py")]
    for rel in (*lib_files, "Resources/requirements.txt"):
        assert (modules / rel).is_file(), rel
    bundle = find_bundle(modules)
    assert bundle == modules / "SaliencyTrustBundle"
    for rel in ("configs/inference.json", "configs/metadata.json", "configs/trust.json", "configs/train.json",
                "saliency_trust/workflows/infer.py", "saliency_trust/workflows/sample.py"):
        assert (bundle / rel).is_file(), rel
    # Every engine source file is there (nothing forgotten by the glob).
    engine = {p.relative_to(REPO / "monai_bundle") for p in (REPO / "monai_bundle" / "saliency_trust").rglob("*.py")}
    assert engine <= {p.relative_to(bundle) for p in bundle.rglob("*.py")}
    # And its data: the model.json schema the manifest part reads (loaded by path by the panel, without torch).
    data = {p.relative_to(REPO / "monai_bundle") for p in (REPO / "monai_bundle" / "saliency_trust").rglob("*.json")}
    assert data and data <= {p.relative_to(bundle) for p in bundle.rglob("*.json")}

    # The module's self-test scenario from the install tree: fixture models, a SynthCXR study, the
    # bundle, with nothing of the checkout on the path (the engine comes from the install tree).
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    env_path = os.environ.pop("PYTHONPATH", None)
    try:
        models = make_fixture_models(bundle, tmp_path / "models", python=sys.executable)
        # The panel lists them and names the methods with the installed bundle's own files.
        assert list(controller.model_choices(models, bundle)) == ["densenet121"]
        assert texts.method_names(bundle) == texts.METHOD_NAMES
        study = make_sample_study(bundle, tmp_path / "study", python=sys.executable)
        assert dicom_series_uid(study).startswith("2.25.")
        volume = load_dicom(scene, study)
        assert volume.GetImageData().GetDimensions() == (320, 320, 1)
        req = Request(bundle_dir=str(bundle), model_dir=str(models), arch="densenet121",
                        methods=("grad", "gradcam"), preset="quick", device="cpu", python=sys.executable)
        run = controller.Run(controller.Settings(volume, None, req), tmp_path / "work").start()
        run.process.wait(600)
        res = run.finish(scene)
        # The bundle process imports the engine from the install tree, not from the checkout.
        where = subprocess.run([sys.executable, "-c", "import saliency_trust; print(saliency_trust.__file__)"],
                               env=dict(os.environ, PYTHONPATH=str(bundle)), capture_output=True, text=True,
                               check=True).stdout.strip()
        assert Path(where).is_relative_to(bundle), where
    finally:
        if env_path is not None:
            os.environ["PYTHONPATH"] = env_path
    assert set(res.map_nodes) == {"grad", "gradcam"}
    for node in res.map_nodes.values():
        assert node.GetImageData().GetDimensions() == (320, 320, 1)
        assert np.isfinite(slicer.util.arrayFromVolume(node)).all()
    assert res.prediction["model"]["image_size"] == 64 and res.prediction["task"] == "lung opacity"
    assert "No trust assessment" in res.assessment_line()
    scene.Clear(1)
