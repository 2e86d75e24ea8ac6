"""Pixel error between PNG pairs, for the GPU parity check (tools/gpu/check.sh).

    python3 tools/gpu/compare_png.py A.png B.png [A2.png B2.png ...]

Prints one JSON object per pair: max and mean absolute error over all RGB values, in 1/255 units.
"""

import json
import sys

import numpy as np
from PIL import Image


def main():
    files = sys.argv[1:]
    if not files or len(files) % 2:
        sys.exit("usage: compare_png.py A.png B.png [A2.png B2.png ...]")
    for a, b in zip(files[::2], files[1::2]):
        x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
        if x.shape != y.shape:
            print(json.dumps({"a": a, "b": b, "error": f"sizes differ: {x.shape} vs {y.shape}"}))
            continue
        d = np.abs(x - y)
        print(json.dumps({"a": a, "b": b, "max": int(d.max()), "mean": float(d.mean())}))


if __name__ == "__main__":
    main()
