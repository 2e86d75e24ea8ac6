"""Fixture: variation.json -- A1111's variation seeds ("Variation seed", "Variation strength",
"Resize seed from width/height") with the CPU random number generator source.

The formula is AUTOMATIC1111 stable-diffusion-webui 1.10's `modules/rng.py` (`ImageRNG.first`, `ImageRNG.next`,
`slerp`, `randn`, `create_generator` with `randn_source == "CPU"`), re-expressed here in torch. A1111 itself is not
imported (it is not on PyPI). For one image of latent shape (C, H, W):

1. noise_shape = (C, from_h, from_w) when both resize-from sides are > 0, else (C, H, W).
2. strength != 0: subnoise = torch.randn(noise_shape) right after torch.manual_seed(subseed) (a fresh generator).
3. noise = the image generator's first draw when noise_shape == shape, else torch.randn(noise_shape) right after
   torch.manual_seed(seed).
4. subnoise drawn: noise = slerp(strength, noise, subnoise), normalising over dim 1 (the height axis of the 3-D
   tensor), falling back to low*val + high*(1-val) when the mean cosine exceeds 0.9995.
5. resized: x = the image generator's first draw of the full shape; x[:, ty:ty+h, tx:tx+w] =
   noise[:, dy:dy+h, dx:dx+w] with A1111's centring arithmetic (Python floor division); noise = x.
6. next(): the image generator's next draw of the full shape.

Each case stores `first` (the initial noise, unscaled) and `next` (the draw after it).
"""

import torch

from common import f32, setup_torch, tensor_json, versions, write_json

CASES = [
    # (name, seed, subseed, strength, shape (C, H, W), resize_from (latent h, w) or None)
    ("strength_0", 42, 7, 0.0, (4, 8, 8), None),
    ("strength_0p05", 42, 7, 0.05, (4, 8, 8), None),
    ("strength_0p3", 42, 7, 0.3, (4, 8, 8), None),
    ("strength_1", 42, 7, 1.0, (4, 8, 8), None),
    ("subseed_above_2p32", 1234, 2**32 + 99, 0.3, (4, 8, 12), None),
    ("subseed_is_seed", 3, 3, 0.3, (4, 8, 8), None),
    ("resize_6x10_strength_0", 5, 9, 0.0, (4, 8, 8), (6, 10)),
    ("resize_6x10_strength_0p3", 42, 7, 0.3, (4, 8, 8), (6, 10)),
    ("resize_11x9_strength_0p7", 77, 2**40 + 5, 0.7, (4, 8, 12), (11, 9)),
]


def slerp(val, low, high):
    """A1111's slerp, written from its formula: dim 1 of a (C, H, W) tensor is the height axis."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    a = (torch.sin((1.0 - val) * omega) / so).unsqueeze(1)
    b = (torch.sin(val * omega) / so).unsqueeze(1)
    return a * low + b * high


def seeded_randn(seed, shape):
    """A1111's `randn(seed, shape)` with the CPU source: re-seed the global generator, draw."""
    torch.manual_seed(seed)
    return torch.randn(shape, device="cpu")


def image_noise(seed, subseed, strength, shape, resize_from):
    generator = torch.Generator("cpu").manual_seed(seed)
    noise_shape = shape if resize_from is None else (shape[0], resize_from[0], resize_from[1])
    subnoise = seeded_randn(subseed, noise_shape) if strength != 0 else None
    if noise_shape != shape:
        noise = seeded_randn(seed, noise_shape)
    else:
        noise = torch.randn(shape, generator=generator)
    if subnoise is not None:
        noise = slerp(strength, noise, subnoise)
    if noise_shape != shape:
        x = torch.randn(shape, generator=generator)
        dx = (shape[2] - noise_shape[2]) // 2
        dy = (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        sx, sy = max(-dx, 0), max(-dy, 0)
        x[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
        noise = x
    following = torch.randn(shape, generator=generator)
    return noise, following


def main():
    setup_torch()
    cases = []
    for name, seed, subseed, strength, shape, resize_from in CASES:
        # A float32 strength, so Rust's f32 field holds exactly the number used here.
        strength = f32(strength)
        first, following = image_noise(seed, subseed, strength, shape, resize_from)
        cases.append(
            {
                "name": name,
                "seed": seed,
                "subseed": subseed,
                "subseed_strength": strength,
                "shape": list(shape),
                "resize_from": list(resize_from) if resize_from else None,
                "first": tensor_json(first),
                "next": tensor_json(following),
            }
        )
    # The strength-0 case must be the plain seed's first draw, bit for bit.
    g = torch.Generator("cpu").manual_seed(42)
    assert torch.equal(torch.tensor(cases[0]["first"]["values"]).reshape(4, 8, 8), torch.randn((4, 8, 8), generator=g))
    write_json(
        "variation.json",
        {
            "description": "A1111 webui 1.10 modules/rng.py ImageRNG.first()/next() for one image, CPU source: "
            "variation seed (subseed), variation strength (slerp over the height axis) and resize-seed-from "
            "(latent cells, centred). 'first' is the initial noise before sigma scaling, 'next' the image "
            "generator's next draw of the same shape.",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "versions": versions(),
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
