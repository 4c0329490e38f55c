"""SaliencyTrustLib inside Slicer: no Qt in the library, bad input refused with the scene unchanged."""

import ast
import unittest
from pathlib import Path

import numpy as np
import slicer

LIB = Path(__file__).resolve().parents[2] / "SaliencyTrustLib"


class SaliencyTrustLibTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_library_imports_no_qt(self):
        for path in LIB.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    self.assertFalse(name.split(".")[0] in ("qt", "ctk", "PythonQt"), f"{path.name} imports {name}")

    def test_a_ct_volume_needs_a_3d_model(self):
        from SaliencyTrustLib import errors, inputs

        volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), np.int16))
        before = slicer.mrmlScene.GetNumberOfNodes()
        self.assertEqual(inputs.check_input_volume(volume), 3)
        with self.assertRaises(errors.InputVolumeError):
            inputs.check_model_fits(volume, 2, "a 2-D model")
        self.assertEqual(before, slicer.mrmlScene.GetNumberOfNodes())


if __name__ == "__main__":
    unittest.main()
