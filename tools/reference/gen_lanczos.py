"""Fixture 16: PIL's Lanczos resize, A1111's "Lanczos" hires-fix upscaler.

A1111's `UpscalerLanczos.do_upscale` (modules/upscaler.py) is
`img.resize((int(img.width * scale), int(img.height * scale)), resample=Image.LANCZOS)` on the decoded 8-bit RGB
first-pass image, and `Upscaler.upscale` finishes with the same call at the target size when the result is off.
So kiln's resize must give PIL's bytes: `Image.resize(size, resample=LANCZOS)` with the defaults `box=None` (the
whole image) and `reducing_gap=None` (no `reduce()` pre-pass), on mode "RGB". Pillow rounds to 8 bits between
its horizontal and vertical passes, and since Pillow 13 (python-pillow/Pillow#9549, `ImagingResampleInner` in
src/libImaging/Resample.c) runs the vertical pass first when `in_h - out_h > 0` and
`in_h - out_h > 2 * (in_w - out_w)`, so the cases cover both orders (`a_mixed`, `pattern_squash`: vertical first).

Writes `lanczos_src_pattern.png` (a synthetic high-contrast 48x40 pattern: 1-pixel checkerboard, hard 0/255 edges,
a hashed channel, so Lanczos rings and clips), one `lanczos_<case>.png` per case (PIL's output) and
`lanczos.json` (the case table + versions). The other sources are gen_vae_encoder.py's `vae_encoder_{a,b}.png`.
Every PNG is written with PIL and read back as RGB: the test compares bytes.
"""

import os

import numpy as np
from PIL import Image

from common import FIXTURES, versions, write_json

PATTERN = "lanczos_src_pattern.png"

# (case, source png, out width, out height). Sources: a 64x64, b 96 wide x 64 high, pattern 48 wide x 40 high.
CASES = [
    ("a_up1p5", "vae_encoder_a.png", 96, 96),  # hires fix x1.5
    ("a_up2", "vae_encoder_a.png", 128, 128),  # x2
    ("b_up1p25", "vae_encoder_b.png", 120, 80),  # x1.25, non-square
    ("b_down", "vae_encoder_b.png", 64, 43),  # downscale, non-integer factor (support widens)
    ("a_mixed", "vae_encoder_a.png", 96, 40),  # up in x, down in y
    ("a_vertical_only", "vae_encoder_a.png", 64, 96),  # same width: PIL skips the horizontal pass
    ("pattern_up1p5", PATTERN, 72, 60),
    ("pattern_up2", PATTERN, 96, 80),
    ("pattern_up1p25", PATTERN, 60, 50),
    ("pattern_down", PATTERN, 32, 27),
    # Pillow 13 runs the vertical pass first when in_h - out_h > 2 * (in_w - out_w) (and > 0):
    ("pattern_squash", PATTERN, 40, 20),  # 20 > 2 * 8: vertical pass first
    ("pattern_tie", PATTERN, 32, 8),  # 32 = 2 * 16: horizontal pass first
]


def pattern(h, w):
    """A deterministic high-contrast RGB8 image."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = np.where((x + y) % 2 == 0, 255, 0)
    g = np.where(((x // 5) + (y // 3)) % 2 == 0, 255, 0)
    b = (x * 37 + y * 91 + (x * y) % 13 * 17) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def read_rgb(name):
    with Image.open(os.path.join(FIXTURES, name)) as im:
        return im.convert("RGB")


def main():
    Image.fromarray(pattern(40, 48)).save(os.path.join(FIXTURES, PATTERN), format="PNG", optimize=False)
    cases = []
    for name, source, w, h in CASES:
        src = read_rgb(source)
        assert src.mode == "RGB"
        out = src.resize((w, h), resample=Image.Resampling.LANCZOS)
        assert out.size == (w, h) and out.mode == "RGB"
        png = f"lanczos_{name}.png"
        out.save(os.path.join(FIXTURES, png), format="PNG", optimize=False)
        assert read_rgb(png).tobytes() == out.tobytes()
        cases.append({"name": name, "source": source, "width": w, "height": h, "expected": png,
                      "source_size": list(src.size)})
    write_json("lanczos.json", {
        "cases": cases,
        "versions": {**versions(), "pillow": Image.__version__},
    })


if __name__ == "__main__":
    main()
