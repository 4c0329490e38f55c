"""Server mode: send the exported input to a SaliencyTrust service and lay its results out like a local run.

Standard library only (urllib), so it runs in Slicer's Python without extra packages. The
downloaded folder has the same ``prediction.json`` + ``maps/`` layout as the bundle writes, so
``scene.load_run_output`` builds the same scene from either mode.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from SaliencyTrustLib.errors import BundleError, CancelledError
from SaliencyTrustLib.process import Request


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, path in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}{"".join(path.suffixes)}"'
                "\r\nContent-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _open(req: urllib.request.Request, timeout: float):
    try:
        return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310  (the user's configured URL)
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read().decode()).get("detail", "")
        except (ValueError, AttributeError):
            detail = ""
        raise BundleError(f"The SaliencyTrust server refused the request (HTTP {exc.code}): {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BundleError(f"Cannot reach the SaliencyTrust server at {req.full_url}: {reason}") from None


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def server_info(url: str, token: str | None = None, timeout: float = 30.0) -> dict:
    """The service's ``GET /info``: its models (name -> architecture, replicates, ...), methods, presets."""
    with _open(urllib.request.Request(url.rstrip("/") + "/info", headers=_headers(token)), timeout) as r:
        return json.loads(r.read().decode())


def model_dimension(info: dict, model: str) -> int:
    """The spatial dimension of the service's model ``model`` (its ``/info`` ``dimension``: 2 or 3)."""
    return 3 if int((info.get("models") or {}).get(model, {}).get("dimension") or 2) == 3 else 2


def choose_model(info: dict, arch: str | None = None, name: str | None = None, dimension: int | None = None) -> str:
    """The service's model name to post to: ``name`` if the server has it, else the one model of
    architecture ``arch`` (``default`` when several are), one of the input's ``dimension`` (2: a radiograph,
    3: a CT volume) first when given; a clear error when none fits."""
    models = info.get("models") or {}
    if not models:
        raise BundleError("The SaliencyTrust server offers no model (its model folder is empty).")
    if name:
        if name in models:
            return name
        raise BundleError(f"The server has no model named '{name}'; it offers: {', '.join(sorted(models))}.")
    fits = sorted(k for k, m in models.items() if not arch or m.get("architecture") == arch)
    if not fits:
        offered = ", ".join(f"{k} ({m.get('architecture')})" for k, m in sorted(models.items()))
        raise BundleError(f"The server has no {arch} model; it offers: {offered}.")
    if dimension is not None:
        fits = [k for k in fits if model_dimension(info, k) == dimension] or fits
    return "default" if "default" in fits else fits[0]


def infer(url: str, model: str, image: str | Path, output_dir: str | Path, request: Request,
          mask: str | Path | None = None, token: str | None = None, timeout: float = 600.0,
          cancel: threading.Event | None = None, request_id: str | None = None) -> Path:
    """POST the image to ``{url}/infer/{model}``, download the maps; returns the local output folder.

    ``model`` is the service's model name (``choose_model``), not an architecture. ``cancel``, when
    set, stops the work between steps with :class:`CancelledError`; the job on the server is stopped
    by :func:`cancel` with the same ``request_id`` (then the POST returns at once, refused).
    """
    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise CancelledError()

    check()
    base = url.rstrip("/")
    out = Path(output_dir)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    fields = {"methods": ",".join(request.methods), "preset": request.preset, "replicate": str(request.replicate),
              "checks": "true" if request.checks else "false"}
    if getattr(request, "accept_any_input", False):
        fields["accept_any_input"] = "true"
    if request_id:
        fields["request_id"] = request_id
    files = {"image": Path(image), **({"mask": Path(mask)} if mask else {})}
    body, ctype = _multipart(fields, files)
    headers = {"Content-Type": ctype, **_headers(token)}
    try:
        with _open(urllib.request.Request(f"{base}/infer/{model}", data=body, headers=headers, method="POST"),
                   timeout) as r:
            prediction = json.loads(r.read().decode())
    except BundleError:
        check()  # refused because it was cancelled: say so, not an error
        raise
    local = {}
    for method, link in prediction["maps"].items():
        check()
        # The server's answer decides neither where a file goes nor which host gets the token.
        link = str(link)
        if not re.fullmatch(r"[a-z_]{1,32}", str(method)) or not link.startswith("/") or link.startswith("//"):
            raise BundleError(f"the server answered an unexpected map {method!r} at {link!r}; nothing was written")
        name = f"maps/{method}.nii.gz"
        with _open(urllib.request.Request(base + link, headers=headers), timeout) as r:
            (out / name).write_bytes(r.read())
        local[method] = name
    prediction["maps"] = local
    check()
    prediction["server"] = {"url": base, "id": prediction.get("id"), "model": model}
    (out / "prediction.json").write_text(json.dumps(prediction, indent=2))
    return out


def cancel(url: str, request_id: str, token: str | None = None, timeout: float = 10.0) -> bool:
    """Ask the service to drop job ``request_id`` (``POST /cancel/{id}``): a queued job never runs, a
    running one's result is thrown away. True when the server knew the job; never raises."""
    req = urllib.request.Request(f"{url.rstrip('/')}/cancel/{request_id}", data=b"", headers=_headers(token),
                                 method="POST")
    try:
        with _open(req, timeout) as r:
            return bool(json.loads(r.read().decode()).get("cancelled"))
    except (BundleError, ValueError):
        return False
