"""Write ``tf1_resize_golden.npz``: outputs of real TensorFlow ``tf.compat.v1.image.resize_bilinear``.

TF1's default bilinear resize (``align_corners=False``, ``half_pixel_centers=False``) is what the
TF1-era PAIR Grad-CAM used to bring the CAM to the image grid, and what the engine's
``cam_resize="tf1_legacy"`` claims to reproduce (``tests/saliency/test_tf1_resize.py`` checks it
against the file this script writes).

TensorFlow is NOT a dependency of the project. This script was run once, in a throwaway virtualenv
outside the repository::

    python3.11 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfenv/bin/python tests/saliency/golden/make_tf1_resize_golden.py

and its output committed. It imports only numpy and tensorflow (nothing from the project).

Each case ``k`` stores, with keys prefixed ``c{k}_``:

* ``input``: float64 ``[B, h, w]`` random values in [0, 1) (fixed seed);
* ``size``: the output ``(H, W)``;
* ``rows`` / ``cols``: the output rows and columns kept (all of them for small outputs; for large
  ones every 11th (11 is coprime with the 40-row period of 8 -> 320) plus the last six, where the legacy mode
  clamps, to keep the file a few KB);
* ``output``: TF's result at ``[B, rows, cols]``. TF computes and returns float32 whatever the
  input dtype, so this is float32 data stored as float32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# (input h, w) -> (output H, W): square and non-square, up- and down-sampling, the network grids of
# the study (8x8 -> 320 and 299 for InceptionV3, 7x7 -> 224 for DenseNet121), degenerate 1-pixel axes.
CASES = [
    ((2, 2), (112, 112)),
    ((3, 5), (7, 13)),
    ((8, 8), (320, 320)),
    ((8, 8), (7, 13)),
    ((8, 8), (299, 299)),
    ((7, 7), (224, 224)),
    ((5, 3), (2, 2)),
    ((1, 4), (3, 9)),
    ((2, 2), (64, 64)),
    ((6, 4), (17, 40)),
]
SEED = 20210101
FULL_LIMIT = 48  # outputs up to this size along an axis are stored whole


def kept(n_out: int) -> np.ndarray:
    """Output indices stored along one axis: all of a small axis; else every 11th and the last 6."""
    if n_out <= FULL_LIMIT:
        return np.arange(n_out)
    return np.unique(np.r_[np.arange(0, n_out, 11), np.arange(n_out - 6, n_out)])


def main() -> None:
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tf1_resize_golden.npz"))
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {"n_cases": np.array(len(CASES)), "tf_version": np.array(tf.__version__),
                                     "seed": np.array(SEED)}
    for k, ((h, w), (H, W)) in enumerate(CASES):
        x = rng.random((2, h, w))  # float64, two maps per case (a batch)
        y = tf.compat.v1.image.resize_bilinear(x[..., None], [H, W], align_corners=False,
                                               half_pixel_centers=False).numpy()[..., 0]
        assert y.dtype == np.float32 and y.shape == (2, H, W), (y.dtype, y.shape)
        rows, cols = kept(H), kept(W)
        arrays[f"c{k}_input"] = x
        arrays[f"c{k}_size"] = np.array([H, W])
        arrays[f"c{k}_rows"] = rows.astype(np.int16)
        arrays[f"c{k}_cols"] = cols.astype(np.int16)
        arrays[f"c{k}_output"] = y[:, rows][:, :, cols]
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes), TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
