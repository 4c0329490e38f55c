"""MONAI-Label-style HTTP service: maps and trust metrics for one uploaded image.

    python -m saliency_trust.serve --bundle monai_bundle --host 127.0.0.1 --port 8000

Endpoints (OpenAPI at ``/openapi.json``, docs at ``/docs``):

* ``GET /info``: models (architecture, replicates, task and classes, training data,
  dataset-level verdicts), methods, presets; a model is a model folder under ``--models-dir``,
  named by its path there (``opacity/densenet121``);
* ``POST /infer/{model}``: multipart upload ``image`` (DICOM, NIfTI, NRRD or PNG, or for a 3-D model a
  CT volume: NIfTI, NRRD or a zip of one DICOM series; the type is read from the content, never from
  the name), optional ``mask`` (on the image's grid), and form fields ``methods``,
  ``preset``, ``replicate``, ``checks``, ``accept_any_input`` (run a DICOM the model was not made
  for: CT, a lateral view, a multi-frame image). Runs the bundle's inference workflow and returns its
  ``prediction.json`` with ``maps`` turned into links under ``/results/{id}/maps/...`` (NIfTI on
  the input's grid);
* ``GET /results/{id}/{file}``: a result file, until the result expires (``--ttl`` seconds);
* ``POST /cancel/{request_id}``: stop the job a client named with the form field ``request_id`` of its
  ``POST /infer``: a queued job never runs, a running one's result is dropped (the worker finishes
  the image it is on); that POST then returns 409 at once.

MONAI Label's clients (``MONAILabelClient`` of its scripts, its Slicer module and OHIF plugin)
call the same endpoints in their own shapes, accepted beside ours: ``GET /info/`` (trailing
slash; the info carries MONAI Label's ``name``, ``labels`` and per-model ``type``, ``labels``,
``dimension``, ``description``, ``config``), and ``POST /infer/{model}?image=<id>`` with the image
as ``file``, an optional ``label`` (our ``mask``) and a JSON ``params`` field holding ``methods``,
``preset``, ``replicate``, ``checks`` and ``method`` (the map to send back; the first method by
default). Such a request is answered as MONAI Label answers: a multipart reply of the JSON
``params`` (our prediction, links to every map) and the one map as a NIfTI file named ``image``;
``?output=json`` gives the JSON alone, ``?output=image`` the map alone. An image can also be sent
ahead as MONAI Label's clients do: ``PUT /datastore/?image=<id>`` (then ``/infer`` by that id) or
``PUT /session/`` (then ``/infer`` with ``?session_id=``; ``GET`` and ``DELETE /session/{id}``); such
images expire like results. An id with nothing uploaded is refused with a sentence saying so.

Requests are queued for one worker thread that owns the device and keeps one instance of each
network; a request waits at most ``--timeout`` seconds (queue time included) and then gets 504.
Security: binds to 127.0.0.1 unless told otherwise and refuses a non-loopback address without a
token; ``SALIENCY_TRUST_TOKEN`` set = every endpoint needs ``Authorization: Bearer <token>``;
uploads are capped (``--max-upload-mb``); a zip is checked before anything in it is unpacked: its
member count (at most :data:`MAX_ZIP_MEMBERS`), its declared unpacked size (``--max-unzipped-mb``),
and every member's name (no absolute path, drive, ``..``, link or encrypted member), and the reader
unpacks each member under its base name only; no path is built from user input (result ids and file
names are looked up, not joined); logs carry request ids, sizes and timings, never file names,
DICOM tags or other identifiers. ``/info`` gives each model's ``dimension``: 2 (it explains one
radiograph) or 3 (a CT volume).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from saliency_trust.data.imageio import SUFFIX, sniff
from saliency_trust.networks.modelfolder import ManifestError, ModelFolder, find_models
from saliency_trust.results import load_results
from saliency_trust.saliency import METHODS
from saliency_trust.saliency.presets import PRESETS
from saliency_trust.settings import InferenceRequest

log = logging.getLogger("saliency_trust.serve")
TOKEN_ENV = "SALIENCY_TRUST_TOKEN"
#: A client's name for its job (``POST /infer``'s ``request_id``, then ``POST /cancel/{request_id}``).
JOB_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
#: The most members a zipped DICOM series may hold (the volume reader's slice limit, plus a few other files).
MAX_ZIP_MEMBERS = 4096 + 64
#: What a zipped series may unpack to by default (its members' declared sizes, summed), MiB.
MAX_UNZIPPED_MB = 1024.0


# ---------------------------------------------------------------------------------------------
# Content sniffing


def is_zip(head: bytes) -> bool:
    """Whether an upload starts as a zip file does (a local file header, or the end record of an empty zip)."""
    return head.startswith((b"PK\x03\x04", b"PK\x05\x06"))


def zip_problem(path: Path, *, max_unzipped: int, max_members: int = MAX_ZIP_MEMBERS) -> str | None:
    """Why an uploaded zip must not be unpacked (one sentence), or None. Read from its central directory only:
    the member count, the declared unpacked size (the reader stops at each member's declared size, so a
    member cannot unpack to more), and each member's name (absolute, a drive, ``..``, a link, encrypted)."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"not a readable zip file ({exc})"
    files = [m for m in members if not m.is_dir()]
    if not files:
        return "the zip holds no file"
    if len(members) > max_members:
        return f"the zip holds {len(members)} entries, over the limit of {max_members} for one series"
    total = sum(m.file_size for m in files)
    if total > max_unzipped:
        return (f"the zip unpacks to {total / 2**20:.0f} MiB, over the limit of {max_unzipped / 2**20:.0f} MiB "
                "for one series")
    for m in members:
        name = m.filename.replace("\\", "/")
        parts = name.split("/")
        if (name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in parts or "\0" in name
                or not name.strip("/")):
            return f"the zip has a member named {m.filename[:80]!r} (an absolute path or one leaving the folder)"
        if (m.external_attr >> 16) & 0o170000 == 0o120000:
            return f"the zip member {m.filename[:80]!r} is a link; zip the series' files themselves"
        if m.flag_bits & 0x1:
            return f"the zip member {m.filename[:80]!r} is encrypted"
    return None



# ---------------------------------------------------------------------------------------------
# Models and results


@dataclass
class Model:
    """One servable model: a model folder (``model.json``, or an older ``<arch>_seed<k>.pt`` folder) and its
    replicates, plus the ``results.json`` of its assessment when one is in the folder."""

    name: str
    folder: ModelFolder

    @property
    def replicates(self) -> list[int]:
        return list(self.folder.replicates)

    def info(self) -> dict:
        m = self.folder.record()
        res = self.folder.folder / "results.json"
        verdicts, assessment = None, None
        if res.is_file():
            try:
                r = load_results(res)
                verdicts = {meth: r.passed(meth) for meth in r.methods}
                assessment = {"preset": r.preset, "n_images": r.n_images, "synthetic": r.synthetic,
                              "failing": r.failing()}
            except ValueError as exc:
                assessment = {"error": str(exc)}
        f = self.folder
        return {"name": self.name, "architecture": f.network_label, "replicates": self.replicates,
                # A 3-D model explains a CT volume (input.size [D, H, W], its HU window); a 2-D one a radiograph.
                "dimension": f.spatial_dims, "image_size": None if f.is_volume else f.image_size,
                "input_size": list(f.input_size) if f.input_size else None, "window_hu": f.window_hu,
                "task": self.folder.task, "classes": self.folder.classes,
                "finding_class": self.folder.finding_class, "manifest": not self.folder.implied,
                "training": {k: m.get(k) for k in ("n_train", "n_val", "max_epochs", "val_auc", "best_epoch")}
                | {"dataset": Path(m["dataset_dir"]).name if m.get("dataset_dir") else None,
                   # The record's own flag (train.json writes it), else SynthCXR's marker in the data folder:
                   # a client warns over such a model's maps.
                   "synthetic": bool(m["synthetic"]) if m.get("synthetic") is not None else (
                       bool(m.get("dataset_dir")) and any((Path(m["dataset_dir"]) / marker).is_file()
                                                          for marker in ("synthcxr.json", "synthct.json")))},
                "verdicts": verdicts, "assessment": assessment}


def discover_models(bundle: Path, models_dir: Path | None = None) -> dict[str, Model]:
    """The classifiers under ``models_dir`` (default ``<bundle>/models``), named by their path in it
    (:func:`~saliency_trust.networks.find_models`); a folder whose manifest is broken is logged and skipped."""
    out: dict[str, Model] = {}
    for name, found in find_models(models_dir or bundle / "models").items():
        if isinstance(found, ManifestError):
            log.warning("model %s skipped: %s", name, found)
        elif found.kind == "classifier":
            out[name] = Model(name, found)
    return out


@dataclass
class Result:
    folder: Path
    files: dict[str, Path]
    expires: float


@dataclass
class State:
    bundle: Path
    models: dict[str, Model]
    work: Path
    token: str | None
    max_upload: int
    timeout: float
    ttl: float
    max_queue: int
    device: str | None
    #: what an uploaded zip (a DICOM series) may unpack to, bytes
    max_unzipped: int = int(MAX_UNZIPPED_MB * 2**20)
    results: dict[str, Result] = field(default_factory=dict)
    #: images uploaded ahead of ``/infer`` the MONAI Label way (``PUT /datastore/``, ``PUT /session/``), by
    #: ``("image", id)`` or ``("session", id)``; they expire like results
    uploads: dict[tuple[str, str], Result] = field(default_factory=dict)
    #: jobs waiting or running, by the ``request_id`` their client gave (what ``POST /cancel`` stops)
    jobs: dict[str, asyncio.Future] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: int = 0
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "saliency-trust-gpu"))
    #: the clock results expire by (monotonic seconds); injectable so expiry can be tested without waiting
    clock: Callable[[], float] = time.monotonic

    def sweep(self) -> int:
        """Remove expired results and their files; returns how many."""
        now = self.clock()
        with self.lock:
            gone = [k for k, r in self.results.items() if r.expires <= now]
            for k in gone:
                shutil.rmtree(self.results.pop(k).folder, ignore_errors=True)
            old = [k for k, r in self.uploads.items() if r.expires <= now]
            for k in old:
                shutil.rmtree(self.uploads.pop(k).folder, ignore_errors=True)
        return len(gone)

    def stored(self, kind: str, key: str | None) -> Path | None:
        """An image uploaded ahead (``kind`` ``image`` or ``session``) that has not expired, or None."""
        self.sweep()
        with self.lock:
            up = self.uploads.get((kind, key)) if key else None
        return up.files["image"] if up is not None and up.files["image"].is_file() else None


# ---------------------------------------------------------------------------------------------
# MONAI Label's request and reply shapes


#: What a MONAI Label ``params`` object may set here (anything else, such as ``client_id``, is ignored).
MONAI_LABEL_PARAMS = ("methods", "preset", "replicate", "checks", "method", "accept_any_input")
#: Images uploaded ahead (datastore and sessions) kept at most at once.
MAX_UPLOADS = 256
#: MONAI Label's ``?output=``: the multipart reply (``all``, its default), the JSON alone or the map alone.
MONAI_LABEL_OUTPUTS = ("all", "json", "image")


def monai_label_model_info(m: Model) -> dict:
    """A model as MONAI Label's ``/info/`` lists it: type, labels, dimension, description, config.

    The type is MONAI Label's ``others``: a saliency map is a continuous heat map, not a label map,
    so it is not offered to the label-map (segmentation) tools of MONAI Label's viewers.
    """
    task = m.folder.task or "finding"
    return {"type": "others", "labels": list(m.folder.classes or []), "dimension": m.folder.spatial_dims,
            "description": f"{m.folder.network_label} ({task}): one saliency map per request (params.method), the "
                           "prediction, live checks and trust verdicts in the reply's params",
            "config": {"methods": ",".join(METHODS), "method": "gradcam", "preset": "quick", "checks": True}}


@dataclass
class RequestShape:
    """One ``/infer`` request, ours or MONAI Label's, reduced to the upload(s) and the options."""

    image: UploadFile | Path  # a Path: an image uploaded ahead (datastore or session)
    mask: UploadFile | None
    options: dict
    monai_label: bool
    method: str | None = None
    output: str = "all"


def request_shape(image: UploadFile | None, file: UploadFile | None, mask: UploadFile | None,
                  label: UploadFile | None, *, params: str | None, image_id: str | None,
                  output: str | None, stored: Path | None = None) -> RequestShape:
    """Which shape a request has (any of MONAI Label's fields makes it MONAI Label's) and what it asks for.
    ``stored`` is the image uploaded ahead under the request's image id or session, used when none is sent."""
    monai_label = any(x is not None for x in (file, label, params, image_id, output, stored))
    if image is not None and file is not None:
        raise HTTPException(422, "send the image once, as 'image' or as 'file' (MONAI Label), not both")
    if mask is not None and label is not None:
        raise HTTPException(422, "send the mask once, as 'mask' or as 'label' (MONAI Label), not both")
    upload = image if image is not None else file if file is not None else stored
    if upload is None:
        if image_id:
            raise HTTPException(422, f"no image {image_id!r} here (never uploaded, or expired) and no file sent: "
                                     "upload it first (PUT /datastore/?image=<id>, or a session) or send it as "
                                     "the multipart field 'file'")
        raise HTTPException(422, "no image: send it as the multipart field 'image' (or 'file', as MONAI Label does)")
    options: dict = {}
    if params:
        try:
            given = json.loads(params)
        except ValueError:
            given = None
        if not isinstance(given, dict):
            raise HTTPException(422, "params must be a JSON object")
        options = {k: v for k, v in given.items() if k in MONAI_LABEL_PARAMS and v is not None}
    method = options.pop("method", None)
    if method is not None and not isinstance(method, str):
        raise HTTPException(422, "params.method must be one method's name")
    if output is not None and output not in MONAI_LABEL_OUTPUTS:
        raise HTTPException(422, f"output {output!r} is not offered; choose from {list(MONAI_LABEL_OUTPUTS)}")
    return RequestShape(upload, mask if mask is not None else label, options, monai_label, method, output or "all")


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"{name} must be an integer, got {value!r}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value)


def monai_label_reply(result: dict, out: Path, local: dict[str, str], *, shape: RequestShape, rid: str) -> Any:
    """The reply MONAI Label gives: multipart of the JSON ``params`` and one map named ``image``
    (``output=all``), or the JSON alone, or the map alone."""
    method = shape.method or result["methods"][0]
    name = f"saliency_{method}_{rid[:12]}.nii.gz"  # clients save a reply's file by its name: one per result
    result["file"] = {"method": method, "name": name}
    if shape.output == "json":
        return result
    path = out / local[method]
    if shape.output == "image":
        return FileResponse(path, media_type="application/gzip", filename=name)
    boundary = uuid.uuid4().hex
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n'
        "Content-Type: application/json\r\n\r\n".encode(), json.dumps(result).encode(), b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: application/gzip\r\n\r\n".encode(), path.read_bytes(), b"\r\n",
        f"--{boundary}--\r\n".encode()])
    return Response(body, media_type=f"multipart/form-data; boundary={boundary}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The app


def create_app(state: State) -> FastAPI:
    """The FastAPI application over ``state``."""
    @asynccontextmanager
    async def lifespan(app):
        async def sweeper() -> None:
            while True:
                await asyncio.sleep(max(0.5, min(state.ttl / 4, 60.0)))
                state.sweep()

        task = asyncio.create_task(sweeper())
        yield
        task.cancel()
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="SaliencyTrust", version="1", description=__doc__.split("\n\n")[0], lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > 2 * state.max_upload + 2**20:  # image + mask + form
            return JSONResponse({"detail": f"upload exceeds the {state.max_upload // 2**20} MiB limit"},
                                status_code=413)
        if state.token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.token}".encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/info")
    @app.get("/info/", include_in_schema=False)  # MONAI Label's clients ask here and do not follow redirects
    def info() -> dict:
        """Models, methods and presets this service offers (with the fields MONAI Label's clients read)."""
        models = {k: m.info() | monai_label_model_info(m) for k, m in state.models.items()}
        return {"name": "SaliencyTrust", "description": "Saliency maps of chest X-ray and CT classifiers and how far "
                "each can be trusted (Arun et al., Radiology: AI 2021). Research use only.", "version": "1",
                "labels": [], "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {}, "datastore": {},
                "models": models, "methods": list(METHODS),
                "presets": {k: v.name for k, v in PRESETS.items()}, "max_upload_mb": state.max_upload / 2**20,
                "timeout_s": state.timeout, "result_ttl_s": state.ttl}

    async def save_upload(upload: UploadFile, folder: Path, stem: str) -> Path:
        head = b""
        size = 0
        tmp = folder / f".{stem}.part"
        with tmp.open("wb") as f:
            while chunk := await upload.read(1 << 20):
                size += len(chunk)
                if size > state.max_upload:
                    raise HTTPException(413, f"{stem} upload exceeds the {state.max_upload // 2**20} MiB limit")
                if len(head) < 4096:
                    head += chunk[: 4096 - len(head)]
                f.write(chunk)
        if size == 0:
            raise HTTPException(400, f"{stem} upload is empty")
        kind = sniff(head)
        if kind is None and stem == "image" and is_zip(head):  # a zipped DICOM series (a 3-D model's input)
            problem = zip_problem(tmp, max_unzipped=state.max_unzipped)
            if problem is not None:
                raise HTTPException(413 if "over the limit" in problem else 422, f"uploaded image: {problem}")
            path = folder / "image.zip"
            tmp.replace(path)
            return path
        if kind is None:
            what = "a DICOM, NIfTI, NRRD or PNG file, or a zip of a DICOM series" if stem == "image" else \
                "a NIfTI or NRRD file (or a DICOM or PNG image)"
            raise HTTPException(415, f"{stem} upload is not {what} (checked by content)")
        path = folder / f"{stem}{SUFFIX[kind]}"
        tmp.replace(path)
        return path

    @app.post("/infer/{model:path}")
    async def infer(model: str, *, image: UploadFile | None = File(None), mask: UploadFile | None = File(None),
                    methods: str | None = Form(None), preset: str | None = Form(None),
                    replicate: int | None = Form(None), checks: bool | None = Form(None),
                    accept_any_input: bool | None = Form(None), request_id: str | None = Form(None),
                    file: UploadFile | None = File(None), label: UploadFile | None = File(None),
                    params: str | None = Form(None), image_id: str | None = Query(None, alias="image"),
                    output: str | None = Query(None), session_id: str | None = Query(None)) -> Any:
        """Explain one image: prediction, live checks, verdicts and links to the maps.

        Ours: the upload ``image`` (and ``mask``) with form fields. MONAI Label's: the upload ``file``
        (and ``label``), a JSON ``params`` field and ``?image=<id>&output=``; answered as MONAI Label does.
        """
        stored = None
        if image is None and file is None:
            stored = state.stored("session", session_id) if session_id else state.stored("image", image_id)
            if session_id and stored is None:
                raise HTTPException(422, "no such session (never created, removed or expired): create one with "
                                         "PUT /session/ or send the image as 'file'")
        shape = request_shape(image, file, mask, label, params=params, image_id=image_id, output=output,
                              stored=stored)
        options = shape.options | {k: v for k, v in {"methods": methods, "preset": preset, "replicate": replicate,
                                                     "checks": checks, "accept_any_input": accept_any_input}.items()
                                 if v is not None}
        image, mask = shape.image, shape.mask
        if model not in state.models:
            raise HTTPException(404, f"no model named {model!r}; GET /info lists them")
        m = state.models[model]
        methods = options.get("methods", ",".join(METHODS))
        if isinstance(methods, list | tuple):
            methods = ",".join(str(x) for x in methods)
        preset, replicate = str(options.get("preset", "quick")), _int(options.get("replicate", -1), "replicate")
        checks = _bool(options.get("checks", True))
        accept_any = _bool(options.get("accept_any_input", False))
        wanted = [x.strip() for x in str(methods).replace("[", "").replace("]", "").replace('"', "").split(",")
                  if x.strip()]
        bad = [x for x in wanted if x not in METHODS]
        if bad or not wanted:
            raise HTTPException(422, f"unknown methods {bad}; choose from {list(METHODS)}")
        if preset not in PRESETS:
            raise HTTPException(422, f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        if shape.method is not None and shape.method not in wanted:
            raise HTTPException(422, f"params.method {shape.method!r} is not among the methods asked for {wanted}")
        rep = m.replicates[0] if replicate < 0 else replicate
        if rep not in m.replicates:
            raise HTTPException(422, f"model {model!r} has replicates {m.replicates}, not {rep}")
        if request_id is not None and not JOB_ID.fullmatch(request_id):
            raise HTTPException(422, "request_id must be 8 to 64 letters, digits, '-' or '_'")
        if request_id is not None and request_id in state.jobs:  # another job's name: never overwritten
            raise HTTPException(409, f"request_id {request_id!r} names a job still running; choose another")
        rid = uuid.uuid4().hex
        folder = state.work / rid
        (folder / "in").mkdir(parents=True)
        t0 = time.time()
        running = None
        try:
            if isinstance(image, Path):  # uploaded ahead: a copy, so the stored image outlives this request
                img_path = folder / "in" / image.name
                shutil.copyfile(image, img_path)
            else:
                img_path = await save_upload(image, folder / "in", "image")
            mask_path = await save_upload(mask, folder / "in", "mask") if mask is not None else None
            try:  # every option checked once, before the request waits in the queue
                request = InferenceRequest(image=img_path, output_dir=folder / "out", model_dir=m.folder.folder,
                                           arch=m.folder.arch, replicate=rep, methods=tuple(wanted), preset=preset,
                                           mask=mask_path, map_format="nifti", device=state.device, checks=checks,
                                           cache_networks=True, accept_any_input=accept_any)
            except ValueError as exc:
                raise HTTPException(422, str(exc).replace(str(m.folder.folder), model)) from None
            with state.lock:
                if state.pending >= state.max_queue:
                    raise HTTPException(503, f"queue full ({state.max_queue} requests waiting); retry later")
                state.pending += 1
            waiting = None
            try:
                running = state.executor.submit(_run, m, request)
                waiting = asyncio.wrap_future(running)
                if request_id is not None:
                    state.jobs[request_id] = waiting
                result = await asyncio.wait_for(asyncio.shield(waiting), timeout=state.timeout)
            except asyncio.CancelledError:
                if not waiting.cancelled():
                    raise  # this request's own task was cancelled (the server is stopping)
                # POST /cancel: a queued job never ran; a running one's folder goes when it ends.
                running.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))
                log.info("request %s: cancelled by its client after %.1f s", rid, time.time() - t0)
                raise HTTPException(409, "cancelled by the client") from None
            except TimeoutError:
                # The worker may still be busy with it: its folder goes when the job ends (worker thread callback).
                running.add_done_callback(lambda _f: shutil.rmtree(folder, ignore_errors=True))
                log.info("request %s: timed out after %.1f s", rid, time.time() - t0)
                raise HTTPException(504, f"no result within {state.timeout:g} s (queue wait included)") from None
            finally:
                with state.lock:
                    state.pending -= 1
                if request_id is not None and waiting is not None and state.jobs.get(request_id) is waiting:
                    state.jobs.pop(request_id, None)
        except HTTPException as exc:
            if exc.status_code not in (409, 504):  # those: the worker's callback removes the folder
                shutil.rmtree(folder, ignore_errors=True)
            raise
        except OSError as exc:  # the work folder: full disk or quota; nothing half-written is served
            shutil.rmtree(folder, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("request %s: work folder full (%s)", rid, exc.strerror)
                raise HTTPException(507, "the server's work folder is full; retry later") from None
            log.exception("request %s: I/O error", rid)
            raise HTTPException(500, f"internal I/O error ({exc.strerror or type(exc).__name__})") from None
        except Exception as exc:  # a fault in the worker: this request fails, the service goes on
            shutil.rmtree(folder, ignore_errors=True)
            log.exception("request %s: worker failed", rid)
            raise HTTPException(500, f"internal error in the worker ({type(exc).__name__}); "
                                     "the request was dropped") from None
        if "error" in result:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("request %s: rejected (%s) in %.2f s", rid, result["error"]["type"], time.time() - t0)
            raise HTTPException(422, result["error"]["message"])
        shutil.rmtree(folder / "in", ignore_errors=True)
        files = {rel: folder / "out" / rel for rel in result["maps"].values()}
        files["prediction.json"] = folder / "out" / "prediction.json"
        with state.lock:
            state.results[rid] = Result(folder, files, state.clock() + state.ttl)
        result["id"] = rid
        result["expires_in_s"] = state.ttl
        local = dict(result["maps"])
        result["maps"] = {k: f"/results/{rid}/{rel}" for k, rel in result["maps"].items()}
        log.info("request %s: %d methods, %.2f s", rid, len(wanted), time.time() - t0)
        if not shape.monai_label:
            return result
        return monai_label_reply(result, folder / "out", local, shape=shape, rid=rid)

    @app.post("/cancel/{request_id}")
    async def cancel(request_id: str) -> dict:
        """Stop the job its client named ``request_id``: a queued job never runs, a running one's result is
        dropped. 404 when no such job is waiting or running (it may have ended)."""
        waiting = state.jobs.get(request_id)
        if waiting is None or waiting.done():
            raise HTTPException(404, "no such job waiting or running (it may have ended)")
        waiting.cancel()
        return {"cancelled": True, "request_id": request_id}

    async def store(kind: str, key: str, upload: UploadFile) -> dict:
        with state.lock:
            if len(state.uploads) >= MAX_UPLOADS and (kind, key) not in state.uploads:
                raise HTTPException(503, f"{MAX_UPLOADS} uploaded images are waiting; retry when some expire")
        folder = state.work / "uploads" / uuid.uuid4().hex  # never a name from the request
        folder.mkdir(parents=True)
        try:
            path = await save_upload(upload, folder, "image")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with state.lock:
            old = state.uploads.pop((kind, key), None)
            state.uploads[(kind, key)] = Result(folder, {"image": path}, state.clock() + state.ttl)
        if old is not None:
            shutil.rmtree(old.folder, ignore_errors=True)
        return {"expires_in_s": state.ttl}

    @app.put("/datastore/")
    @app.put("/datastore", include_in_schema=False)
    async def datastore_upload(file: UploadFile = File(...), image_id: str | None = Query(None, alias="image"),
                               params: str | None = Form(None)) -> dict:
        """MONAI Label's image upload: kept under ``image`` (or a new id) until it expires, for ``/infer``."""
        key = image_id or uuid.uuid4().hex
        return {"image": key, **await store("image", key, file)}

    @app.put("/session/")
    @app.put("/session", include_in_schema=False)
    async def session_create(files: list[UploadFile] = File(...), params: str | None = Form(None)) -> dict:
        """MONAI Label's session: the uploaded image kept under a new session id until it expires."""
        if len(files) != 1:
            raise HTTPException(422, f"a session holds one radiograph; {len(files)} files were sent")
        sid = uuid.uuid4().hex
        return {"session_id": sid, **await store("session", sid, files[0])}

    @app.get("/session/{sid}")
    def session_get(sid: str) -> dict:
        """A session that has not expired (404 otherwise)."""
        if state.stored("session", sid) is None:
            raise HTTPException(404, "no such session (it may have expired)")
        return {"session_id": sid}

    @app.delete("/session/{sid}")
    def session_remove(sid: str) -> dict:
        """Remove a session and its image."""
        with state.lock:
            up = state.uploads.pop(("session", sid), None)
        if up is None:
            raise HTTPException(404, "no such session (it may have expired)")
        shutil.rmtree(up.folder, ignore_errors=True)
        return {"session_id": sid, "removed": True}

    @app.get("/results/{rid}/{name:path}")
    def results(rid: str, name: str):
        """A file of a result that has not expired yet."""
        state.sweep()
        with state.lock:
            r = state.results.get(rid)
            path = r.files.get(name) if r else None
        if path is None or not path.is_file():
            raise HTTPException(404, "no such result (it may have expired)")
        media = "application/json" if name.endswith(".json") else "application/gzip"
        return FileResponse(path, media_type=media, filename=Path(name).name)

    return app


def _run(m: Model, request: InferenceRequest) -> dict:
    """The bundle's inference workflow in the worker thread; user errors come back as a dict."""
    from saliency_trust.data.errors import DataError
    from saliency_trust.workflows.infer import run_inference

    try:
        return run_inference(request)
    except DataError as exc:  # name the upload, never the server's path
        mask = request.mask
        what = "mask" if mask is not None and Path(exc.source).name == mask.name else "image"
        return {"error": {"type": "DataError", "message": f"uploaded {what}: {exc.problem}"}}
    except (ValueError, FileNotFoundError) as exc:
        return {"error": {"type": type(exc).__name__, "message": str(exc).replace(str(m.folder.folder), m.name)}}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(prog="python -m saliency_trust.serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="monai_bundle", help="bundle folder")
    p.add_argument("--models-dir", default=None, help="folder of model folders (default <bundle>/models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=64.0)
    p.add_argument("--max-unzipped-mb", type=float, default=MAX_UNZIPPED_MB,
                   help="what an uploaded zip of a DICOM series may unpack to")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queue wait included")
    p.add_argument("--ttl", type=float, default=900.0, help="seconds a result stays downloadable")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most")
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default=None, help="where results live (default: a fresh temporary folder)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(a.host) and token is None:
        p.error(f"refusing to listen on {a.host} without a token: set {TOKEN_ENV}")
    bundle = Path(a.bundle).resolve()
    models = discover_models(bundle, Path(a.models_dir).resolve() if a.models_dir else None)
    if not models:
        p.error(f"no models found under {a.models_dir or bundle / 'models'} (folders with a model.json, or "
                "older <arch>_seed<k>.pt files)")
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="saliency-trust-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    state = State(bundle, models, work, token, int(a.max_upload_mb * 2**20), a.timeout, a.ttl, a.max_queue, a.device,
                  max_unzipped=int(a.max_unzipped_mb * 2**20))
    log.info("serving %d model(s) %s on %s:%d (auth %s)", len(models), sorted(models), a.host, a.port,
             "on" if token else "off")
    import uvicorn

    try:
        uvicorn.run(create_app(state), host=a.host, port=a.port, log_level="warning", access_log=False)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
