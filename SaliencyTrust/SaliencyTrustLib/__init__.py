"""SaliencyTrust module logic without Qt (testable with the slicer-core wheel), one room per concern.

* :mod:`~SaliencyTrustLib.inputs`: the scene's input checked and written for the bundle (volume, DICOM
  de-identified copy, intensity range, the mask to score against);
* :mod:`~SaliencyTrustLib.process`: the bundle out of process (request, child process, cancel, the demo's
  training, sample study and fixture models);
* :mod:`~SaliencyTrustLib.scene`: a finished run into MRML nodes (overlays, trust table, legends);
* :mod:`~SaliencyTrustLib.texts`: what the panel says (method and criterion names, help, sentences);
* :mod:`~SaliencyTrustLib.bundle`: where the bundle is, and its standard-library modules loaded by path
  (the model-folder reader, the method table);
* :mod:`~SaliencyTrustLib.errors`, :mod:`~SaliencyTrustLib.deps`, :mod:`~SaliencyTrustLib.client` (server
  mode) and :mod:`~SaliencyTrustLib.controller` (what the panel does, on top of the others).

The flow: ``inputs.check_input_volume`` -> ``inputs.prepare`` -> ``process.BundleProcess(...).start()`` ->
``scene.load_run_output`` (``controller.run_local`` does all four, blocking).
"""
