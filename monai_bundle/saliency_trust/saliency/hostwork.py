"""Host-side work that runs beside the device: thread pools, the images' content hashes, and
the model's weights fingerprint.

Both SG/SIG noise seeds and XRAI segment keys come from a SHA-256 of each image's float32
bytes (about a millisecond per 320 px image); the noise seeds also mix in a SHA-256 of the
model's weights (:func:`weights_fingerprint`), so two models never share noise unless their
weights are identical. :func:`content_hashes` hashes a batch once per
``explain`` call on a pool of threads (hashlib releases the GIL on large buffers), and the
seeds and keys are derived from copies of the hash state, so each image's bytes are read
once however many methods need them, and the device is not kept waiting for a serial loop.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _forget_pools() -> None:
    """In a forked child: the parent's threads are not there, so start afresh on first use."""
    global _POOLS, _LOCK
    _POOLS, _LOCK = {}, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


def host_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def pool(name: str) -> ThreadPoolExecutor:
    """The process's pool of host threads called ``name`` (one per kind of work, made on first use)."""
    with _LOCK:
        if name not in _POOLS:
            _POOLS[name] = ThreadPoolExecutor(max_workers=min(32, host_threads()), thread_name_prefix=name)
        return _POOLS[name]


def _float32_bytes(image: torch.Tensor | np.ndarray) -> memoryview:
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    return memoryview(np.ascontiguousarray(image, dtype=np.float32)).cast("B")


def content_hash(image: torch.Tensor | np.ndarray) -> Any:
    """SHA-256 state after one image's float32 bytes (``[C, H, W]`` order); copy it to derive from it."""
    return hashlib.sha256(_float32_bytes(image))


def content_hashes(images: torch.Tensor | Sequence[torch.Tensor | np.ndarray]) -> list[Any]:
    """:func:`content_hash` of each image of a batch, on host threads when there are several."""
    items = list(images)
    if len(items) < 2 or host_threads() < 2:
        return [content_hash(im) for im in items]
    if isinstance(images, torch.Tensor):  # one host copy, then views: the threads only hash
        host = images.detach().to("cpu", torch.float32).contiguous().numpy()
        items = list(host)
    return list(pool("image-hashes").map(content_hash, items))


def derived(state: Any, tag: str) -> bytes:
    """The digest of the hashed image followed by ``tag`` (the state itself is left as it was)."""
    h = state.copy()
    h.update(tag.encode())
    return h.digest()


def seed_from(state: Any, seed: int, model_key: str = "") -> int:
    """A 63-bit generator seed from an image's hash state, a recipe seed and a model's fingerprint.

    The tag hashed after the image is ``str(seed)``, then ``"|" + model_key`` when one is given.
    """
    tag = str(seed) + (f"|{model_key}" if model_key else "")
    return int.from_bytes(derived(state, tag)[:8], "little") & (2**63 - 1)


def sample_seed(state: Any, seed: int, model_key: str, sample: int) -> int:
    """The generator seed of one noise sample of a volume: :func:`seed_from`'s tag followed by ``#sample``.

    Volumes draw each SG/SIG sample from its own generator, so any chunk of samples can be made
    alone and the noise does not depend on how the samples are chunked.
    """
    tag = str(seed) + (f"|{model_key}" if model_key else "") + f"#{sample}"
    return int.from_bytes(derived(state, tag)[:8], "little") & (2**63 - 1)


#: Fingerprint per live module, with the (pointer, version) signature of its tensors it was made from.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 of a model's state (names, dtypes, shapes and bytes of every parameter and buffer).

    Equal for two models with identical weights, different otherwise. Cached per module until any
    of its tensors is replaced or modified in place (PyTorch's version counter), so it costs one
    pass over the weights per model state, not per call.
    """
    items = list(model.state_dict(keep_vars=True).items())
    signature = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in items)
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(memoryview(data.view(torch.uint8).numpy()))
    digest = h.hexdigest()
    _FINGERPRINTS[model] = (signature, digest)
    return digest
