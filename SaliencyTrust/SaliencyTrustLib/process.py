"""The bundle out of process: what to run, the child process (its output, cancel, result), the demo's
training with its progress, and the small bundle commands (a sample study, fixture models).

Every child runs the bundle in its own process group, with the bundle on ``PYTHONPATH``, so cancel
stops its whole process tree; a Slicer whose Python is too old for the bundle is told so in one
sentence before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from SaliencyTrustLib import deps, texts
from SaliencyTrustLib.bundle import find_models
from SaliencyTrustLib.errors import BundleError, CancelledError, SaliencyTrustError


def require_supported_python() -> None:
    """Raise :class:`SaliencyTrustError` with one sentence when this Slicer's Python cannot run the bundle
    (Slicer 5.8 and older), before anything is generated, installed or launched."""
    problem = deps.python_problem()
    if problem:
        raise SaliencyTrustError(problem)


def default_python() -> str:
    """Slicer's Python without GUI (``PythonSlicer``) when there is one, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


@dataclass
class Request:
    """What to run: the bundle folder, the model (its folder, its architecture, the replicate), methods and preset.

    ``model_dir`` is one model folder (``model.json``), or an older flat folder where ``arch`` picks
    the architecture; ``arch`` also chooses the server's model by architecture in server mode.
    """

    bundle_dir: str
    model_dir: str
    arch: str = ""
    replicate: int = 0
    methods: Sequence[str] = field(default_factory=lambda: texts.METHODS)  # the bundle's: every method
    preset: str = "quick"
    device: str | None = None
    checks: bool = True
    python: str = field(default_factory=default_python)
    accept_any_input: bool = False  # run a DICOM the model was not made for (CT, lateral, multi-frame) anyway

    def command(self, image: str | Path, output_dir: str | Path, mask: str | Path | None = None) -> list[str]:
        """The ``monai.bundle run`` command line for ``configs/inference.json``."""
        configs = Path(self.bundle_dir) / "configs"
        cmd = [self.python, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
               "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(self.bundle_dir),
               "--image", str(image), "--output_dir", str(output_dir), "--model_dir", str(self.model_dir),
               "--replicate", str(int(self.replicate)),
               "--methods", json.dumps(list(self.methods)), "--preset", self.preset,
               "--checks", "True" if self.checks else "False"]
        if self.arch:
            cmd += ["--arch", self.arch]
        if mask is not None:
            cmd += ["--mask", str(mask)]
        if self.device:
            cmd += ["--device", self.device]
        if self.accept_any_input:
            cmd += ["--accept_any_input", "True"]
        return cmd


class ChildProcess:
    """A bundle command in a child process: non-blocking, output collected by a thread, cancellable."""

    what = "The bundle"

    def __init__(self, command: list[str], bundle_dir: str | Path, output_dir: str | Path) -> None:
        self.bundle_dir = str(bundle_dir)
        self.output_dir = Path(output_dir)
        self.command = command
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self.cancelled = False
        self.started_at = 0.0
        self._reader: threading.Thread | None = None

    def start(self) -> ChildProcess:
        """Launch the child; returns at once (a Slicer too old for the bundle is told so first)."""
        require_supported_python()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.bundle_dir, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Its own process group (POSIX session / Windows group), so that cancel stops everything it
        # started; no console window pops up on Windows.
        kwargs: dict = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(subprocess,
                                                                                        "CREATE_NO_WINDOW", 0)}
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, **kwargs)
        self.started_at = time.time()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def new_lines(self) -> list[str]:
        """Output lines that arrived since the last call (for a progress/log view)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self.lines += out
        return out

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cancel(self) -> None:
        """Stop the child and everything it started (its whole process tree, on every platform)."""
        if not self.running:
            return
        self.cancelled = True
        assert self._proc is not None
        kill_tree(self._proc)

    def wait(self, timeout: float | None = None) -> Path:
        """Block until the child ends; returns the output folder or raises :class:`BundleError`."""
        assert self._proc is not None, "start() first"
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise BundleError(f"{self.what} did not finish within {timeout:.0f} s and was stopped.") from None
        return self.result()

    def result(self) -> Path:
        """The output folder of a finished child, or :class:`BundleError` with the reason."""
        assert self._proc is not None and self._proc.poll() is not None
        if self._reader is not None:
            self._reader.join(timeout=30)  # the child's last lines (it has ended: its pipe closes)
        self.new_lines()
        if self.cancelled:
            raise CancelledError()
        if self._proc.returncode != 0:
            raise BundleError(failure_message(self.output_dir, self.lines, self._proc.returncode))
        self.check_output()
        return self.output_dir

    def check_output(self) -> None:
        """Raise :class:`BundleError` when the ended child did not leave what it should have."""


class BundleProcess(ChildProcess):
    """The bundle's inference workflow on one image (``configs/inference.json``)."""

    def __init__(self, request: Request, image: str | Path, output_dir: str | Path,
                 mask: str | Path | None = None) -> None:
        super().__init__(request.command(image, output_dir, mask), request.bundle_dir, output_dir)
        self.request = request

    def check_output(self) -> None:
        if not (self.output_dir / "prediction.json").is_file():
            raise BundleError(f"The bundle finished but wrote no prediction.json in {self.output_dir}.")


#: The demo's tasks a first run can train models for (SynthCXR, generated locally).
DEMO_TASKS = {"opacity": "lung opacity (RSNA-like, boxes)", "pneumothorax": "pneumothorax (SIIM-like, masks)"}

#: What the demo trains per task (``saliency_trust.workflows.demo``: two DenseNet121 and one InceptionV3
#: classifiers, two U-Net localizers), and the share of the time its trust assessment takes after them.
DEMO_TRAININGS = 5

ASSESSMENT_SHARE = 0.35


@dataclass
class TrainingOutcome:
    """A finished training: the new model folder, and what to tell the user beside success."""

    model_dir: Path
    note: str = ""


class TrainProgress:
    """Determinate progress of the demo from its own output: each ``monai.bundle`` run's input summary
    (architecture, seed, epoch cap) and the training helper's ``epoch k:`` lines."""

    def __init__(self, trainings: int = DEMO_TRAININGS, assessment: bool = True) -> None:
        self.trainings, self.assessment = trainings, assessment
        self.started = 0  # trainings begun
        self.finished = 0  # trainings that wrote their best weights
        self.arch, self.seed, self.cap, self.epoch = "U-Net", 0, 1, 0

    def feed(self, lines: Sequence[str]) -> None:
        import re

        for line in lines:
            line = line.split("\r")[-1]
            if "input summary of monai.bundle.scripts.run" in line:
                self.started += 1
                self.arch, self.seed, self.cap, self.epoch = "U-Net", 0, 1, 0
            elif (m := re.search(r"> arch: '([\w.-]+)'", line)) is not None:
                self.arch = m.group(1)
            elif (m := re.search(r"> seed: (\d+)", line)) is not None:
                self.seed = int(m.group(1))
            elif (m := re.search(r"> max_epochs: (\d+)", line)) is not None:
                self.cap = max(1, int(m.group(1)))
            elif (m := re.search(r"\bepoch (\d+): val_", line)) is not None:
                self.epoch = int(m.group(1))
            elif re.search(r"best val_\w+ .* -> ", line):
                self.finished = self.started

    def fraction(self) -> float:
        """0 to 1 (1 only when the process has ended)."""
        train_share = 1.0 - (ASSESSMENT_SHARE if self.assessment else 0.0)
        running = 0.0 if self.finished >= self.started else min(1.0, self.epoch / self.cap)
        done = min(self.trainings, self.finished + running) / self.trainings
        return min(0.99, done * train_share)

    def text(self) -> str:
        """What is being done now, in words."""
        if self.started == 0:
            return "Making the SynthCXR images..."
        if self.finished >= self.trainings and self.assessment:
            return "Assessing the maps' trust on the validation images..."
        n = min(self.started, self.trainings)
        return (f"Training {self.arch} copy {self.seed} ({n} of {self.trainings}), "
                f"epoch {self.epoch} of at most {self.cap}...")


class TrainProcess(ChildProcess):
    """The demo's models for one task, trained in the background: SynthCXR data, the bundle's
    ``train.json`` for each classifier and baseline, then the trust assessment (``trust.json``),
    so the panel has models and verdicts. About 10 minutes on a laptop CPU."""

    what = "Training"

    def progress(self) -> tuple[float, str]:
        """(fraction done, what is being done) from the lines read so far."""
        if not hasattr(self, "_progress"):
            self._progress = TrainProgress(assessment="--skip-assessment" not in self.command)
            self._fed = 0
        self._progress.feed(self.lines[self._fed:])
        self._fed = len(self.lines)
        return self._progress.fraction(), self._progress.text()

    def outcome(self) -> TrainingOutcome:
        """Success when classifiers were written, with a note when the run also reported a problem
        (a validation AUC below the demo's bar, or a failure after the models were saved)."""
        try:
            self.result()
            note = ""
        except CancelledError:
            raise
        except BundleError as exc:
            if not self._classifiers():
                raise
            note = str(exc)
        warnings = [ln.strip() for ln in self.lines if ln.strip().startswith(("WARNING:", "NOTE:"))]
        if warnings:
            note = (note + " " if note else "") + warnings[-1]
        if note:
            note = "Note: " + note
        return TrainingOutcome(self.model_dir, note)

    def _classifiers(self) -> list:
        """The classifiers this run wrote (a replicate saved since it started); older ones do not count."""
        if not self.model_dir.is_dir():
            return []
        out = []
        for f in find_models(self.model_dir, self.bundle_dir).values():
            if isinstance(f, Exception) or f.kind != "classifier":
                continue
            if any(p.is_file() and p.stat().st_mtime >= self.started - 1.0 for p in f.replicates.values()):
                out.append(f)
        return out

    def __init__(self, bundle_dir: str | Path, out_dir: str | Path, task: str = "opacity",
                 python: str | None = None, extra_args: Sequence[str] = ()) -> None:
        if task not in DEMO_TASKS:
            raise SaliencyTrustError(f"Unknown task '{task}'; choose one of {', '.join(DEMO_TASKS)}.")
        cmd = [python or default_python(), "-m", "saliency_trust.workflows.demo", "--out", str(out_dir),
               "--tasks", task, "--no-shortcut", *extra_args]
        self.started = time.time()  # models written before this run do not count as its success
        super().__init__(cmd, bundle_dir, out_dir)
        self.task = task

    @property
    def model_dir(self) -> Path:
        """Where the trained models (and their results.json) are."""
        return self.output_dir / "models" / self.task

    def check_output(self) -> None:
        if not self._classifiers():
            raise BundleError(f"Training finished but left no model in {self.model_dir}.")


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc`` and its descendants: SIGTERM to its process group on POSIX (SIGKILL after
    ``grace`` s), ``taskkill /T /F`` on Windows (``terminate`` alone would leave DataLoader workers)."""
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    else:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0), check=False)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def failure_message(output_dir: Path, lines: Sequence[str], returncode: int) -> str:
    """One readable sentence for a failed bundle run: its ``error.json`` or the last error line."""
    err = Path(output_dir) / "error.json"
    if err.is_file():
        e = json.loads(err.read_text())
        where = f"{Path(e['source']).name}: " if e.get("source") else ""
        return f"The bundle could not explain this image - {where}{e['problem']}"
    tail = [ln for ln in lines if ln.strip()]
    errors = [ln for ln in tail if "Error" in ln.split(":")[0] or ln.startswith(("Error", "error"))]
    last = (errors or tail or ["no output"])[-1].strip()
    return f"The bundle process failed (exit code {returncode}): {last}"


def _bundle_command(bundle_dir: str | Path, args: list[str], python: str | None = None,
                    timeout: float = 600.0) -> str:
    """Run ``python -m <args>`` with the bundle importable; its stdout, or BundleError with the reason."""
    require_supported_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(bundle_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    flags = 0 if os.name == "posix" else getattr(subprocess, "CREATE_NO_WINDOW", 0)
    try:
        r = subprocess.run([python or default_python(), "-m", *args], capture_output=True, text=True, env=env,
                           timeout=timeout, creationflags=flags, check=False)
    except subprocess.TimeoutExpired:
        raise BundleError(f"'{args[0]}' did not finish within {timeout:.0f} s.") from None
    if r.returncode != 0:
        raise BundleError(failure_message(Path("."), (r.stdout + r.stderr).splitlines(), r.returncode))
    return r.stdout


def make_sample_study(bundle_dir: str | Path, out_dir: str | Path, python: str | None = None,
                      timeout: float = 300.0, seed: int | None = None) -> Path:
    """A lesion-positive 320 px SynthCXR DICOM study made by the bundle under ``out_dir``; returns the file."""
    args = ["saliency_trust.workflows.sample", "--study", str(out_dir)]
    if seed is not None:
        args += ["--seed", str(seed)]
    out = _bundle_command(bundle_dir, args, python, timeout)
    path = Path(out.strip().splitlines()[-1])
    if not path.is_file():
        raise BundleError(f"The bundle did not write the sample study in {out_dir}.")
    return path


def make_fixture_models(bundle_dir: str | Path, out_dir: str | Path, python: str | None = None,
                        timeout: float = 300.0) -> Path:
    """A model folder of two untrained 64 px DenseNet121 replicates (seconds, no training) for the module's
    self-test; returns that folder."""
    out = _bundle_command(bundle_dir, ["saliency_trust.workflows.sample", "--fixture-models", str(out_dir)], python,
                          timeout)
    return Path(out.strip().splitlines()[-1])


def run_bundle(request: Request, image: str | Path, output_dir: str | Path, mask: str | Path | None = None,
               timeout: float | None = None) -> Path:
    """Blocking convenience: run the bundle and return its output folder."""
    return BundleProcess(request, image, output_dir, mask).start().wait(timeout)
