"""SaliencyTrust module logic without Qt (testable with the slicer-core wheel)."""

from SaliencyTrustLib.logic import (
    CRITERIA,
    METHODS,
    TABLE_COLUMNS,
    BundleError,
    BundleProcess,
    InputVolumeError,
    Request,
    Results,
    SaliencyTrustError,
    check_input_volume,
    load_results,
    prepare,
    run_bundle,
    run_local,
    show_overlay,
)

__all__ = ["CRITERIA", "METHODS", "TABLE_COLUMNS", "BundleError", "BundleProcess", "InputVolumeError", "Request",
           "Results", "SaliencyTrustError", "check_input_volume", "load_results", "prepare",
           "run_bundle", "run_local", "show_overlay"]
