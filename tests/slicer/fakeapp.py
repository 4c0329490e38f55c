# ruff: noqa: N801, N802, N807, N815  (Qt, CTK and Slicer names, as PythonQt spells them)
"""The Slicer application around a scripted module, without the application: what the widget tier needs.

Real: the MRML scene and nodes and ``slicer.util`` (the ``slicer-core`` wheel), and Slicer's own
``parameterNodeWrapper`` at a release tag (``../shared/slicer_sources/<tag>``, Slicer's unmodified
files; not in this repository). Fake: the Qt widgets (:mod:`tests.slicer.fakeqt`), ``slicer.app``,
``slicer.modules``, ``slicer.i18n`` and ``slicer.ScriptedLoadableModule``. The last is written from
``Base/Python/slicer/ScriptedLoadableModule.py`` at v5.10.0 (checked: the same at v5.8.1): the
widget takes its parent's layout, ``resourcePath`` goes through ``slicer.util.modulePath``,
``onReload`` calls ``slicer.util.reloadScriptedModule`` (the wheel's real one), and the logic's
``getParameterNode`` returns the scene's singleton ``vtkMRMLScriptedModuleNode`` tagged with the
module's name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

from tests.slicer import fakeqt

SOURCES = Path(os.environ.get("SALIENCY_TRUST_SLICER_SOURCES", Path(__file__).resolve().parents[3] / "shared"
                              / "slicer_sources"))
TAGS = ("v5.10.0", "v5.8.1")


# ---------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule, as Slicer 5.8 / 5.10 define it (the parts a module uses)


def _scripted_loadable_module(slicer) -> types.ModuleType:
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            super().__init__()
            self.moduleName = self.__class__.__name__.removesuffix("Widget")
            self.developerMode = slicer.util.settingsValue("Developer/DeveloperMode", False,
                                                           converter=slicer.util.toBool)
            self.parent = parent
            self.layout = self.parent.layout()
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

        def resourcePath(self, filename: str) -> str:
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def cleanup(self) -> None:
            pass

        def _onModuleAboutToBeUnloaded(self, moduleName: str) -> None:
            if moduleName == self.moduleName:
                self.cleanup()
                slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)",
                                                      self._onModuleAboutToBeUnloaded)

        def setup(self) -> None:
            pass  # the developer section is off (Developer/DeveloperMode unset)

        def onReload(self) -> None:
            slicer.util.reloadScriptedModule(self.moduleName)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            super().__init__()
            self.moduleName = self.__class__.__name__.removesuffix("Logic")
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    return mod


# ---------------------------------------------------------------------------------------------
# slicer.app and slicer.modules


class ModuleManager(fakeqt.QObject):
    moduleAboutToBeUnloaded = fakeqt.Signal()


class LayoutManager:
    def __init__(self) -> None:
        self.resets = 0

    def resetSliceViews(self) -> None:
        self.resets += 1


class App(fakeqt.QObject):
    startupCompleted = fakeqt.Signal()

    def __init__(self, settings_file: Path) -> None:
        super().__init__()
        self.slicerUserSettingsFilePath = str(settings_file)
        self.applicationName = "Slicer"
        self._modules = ModuleManager()
        self._layout = LayoutManager()

    def testingEnabled(self) -> bool:
        return False  # message boxes are "shown" (recorded), as for a user

    def moduleManager(self) -> ModuleManager:
        return self._modules

    def layoutManager(self) -> LayoutManager:
        return self._layout

    def settings(self) -> fakeqt.QSettings:
        return fakeqt.QSettings()

    userSettings = settings

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass

    def processEvents(self) -> None:
        fakeqt.process_events()


class ModulePanel(fakeqt.qMRMLWidget):
    """``qSlicerScriptedLoadableModuleWidget``: owns the Python widget, enters / exits it, reloads it."""

    def __init__(self, harness) -> None:
        super().__init__()
        self.harness = harness
        self.setLayout(fakeqt.QVBoxLayout())
        self.isEntered = False
        self.widget = None

    def create(self):
        module = sys.modules["SaliencyTrust"]
        self.widget = module.SaliencyTrustWidget(self)
        self.widget.setup()
        self.harness.slicer.modules.SaliencyTrustWidget = self.widget
        return self.widget

    reload = create

    def enter(self) -> None:
        self.isEntered = True
        self.widget.enter()

    def exit(self) -> None:
        self.widget.exit()
        self.isEntered = False


def load_parameter_node_wrapper(tag: str) -> types.ModuleType:
    """Slicer's ``parameterNodeWrapper`` package at ``tag``, imported as ``slicer.parameterNodeWrapper``."""
    package = SOURCES / tag / "slicer" / "parameterNodeWrapper"
    for name in [n for n in sys.modules if n.startswith("slicer.parameterNodeWrapper")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("slicer.parameterNodeWrapper", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["slicer.parameterNodeWrapper"] = module
    spec.loader.exec_module(module)
    return module
