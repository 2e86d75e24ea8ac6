"""Independent re-implementation of torch's CPU randn (float32), checked against rng.json.

This documents the algorithm the Rust side has to reproduce (torch 2.x, aten/src/ATen/native/cpu/
DistributionTemplates.h + core/DistributionsHelper.h + core/MT19937RNGEngine.h):

* Engine: mt19937 seeded with init_genrand(seed & 0xFFFFFFFF) -- only the LOW 32 BITS of the u64 seed are used.
* random()   = next u32 of mt19937.   random64() = (u64(first u32) << 32) | second u32.
* numel >= 16 (float32, contiguous)  -> "normal_fill":
    1. u[i] = (random() & 0xFFFFFF) * 2^-24   as f32, for i in 0..n   (n u32 draws)
    2. for each full block of 16 starting at j = 0,16,32,...:  for k in 0..8:
           u1 = 1 - u[j+k]; u2 = u[j+8+k]; r = sqrt(-2 ln u1); th = 2 pi u2
           out[j+k] = r cos th;  out[j+8+k] = r sin th
    3. if n % 16 != 0: take the LAST 16 elements (start n-16, overlapping the previous block), REFILL them with
       16 fresh uniforms (16 more u32 draws), and apply step 2 to that block once more.
    Total u32 consumed: n (+16 if n % 16 != 0).
    The float32 math of step 2 depends on the CPU kernel torch dispatches to:
    - SIMD (AVX2/AVX512 machines; rng.json): normal_fill_16_AVX2 with avx_mathfun.h's log256_ps and sincos256_ps
      (Cephes single-precision polynomials), th = f32(2pi) * u2 in f32, and the FMA contractions GCC made
      (see simd_log / simd_sincos below). Reproduced BIT-EXACTLY here.
    - scalar (ATEN_CPU_CAPABILITY=default; rng_scalar.json): glibc logf/sqrtf/cosf/sinf in f32 with
      th = f32(2pi_as_double * u2). Reproduced BIT-EXACTLY here via ctypes (Rust's f32::ln/cos/sin call the same
      glibc functions on Linux).
* numel < 16 -> scalar path, normal_distribution<double> per element, with a ONE-VALUE CACHE IN THE GENERATOR:
    if a cached normal exists: use it (and clear it)
    else: u1 = (random64() & (2^53-1)) * 2^-53; u2 = same (next random64);
          r = sqrt(-2 * log1p(-u2)); th = 2 pi u1; cache r*sin(th); value = r*cos(th)
    out = f32(value).  Each fresh pair costs 4 u32.  The cache survives across randn calls on the same generator
    and is NOT used/cleared by the >=16 path.  (manual_seed resets it.)
"""

import json
import math
import os
import sys

import numpy as np

from common import FIXTURES


F = np.float32
D = np.float64


def _fma(a, b, c):
    """f32 fused multiply-add a*b+c (exact product in f64; a single rounding to f32 is exact except in
    double-rounding corner cases, never hit in the fixtures)."""
    return (np.asarray(a, F).astype(D) * np.asarray(b, F).astype(D) + np.asarray(c, F).astype(D)).astype(F)


def simd_log(x):
    """avx_mathfun.h log256_ps (Cephes logf), f32, with GCC's FMA contractions."""
    x = np.maximum(x, np.array([0x00800000], dtype=np.int32).view(F)[0]).astype(F)
    bits = x.view(np.int32)
    e = ((bits.view(np.uint32) >> 23).astype(np.int32) - 0x7F).astype(F) + F(1)
    x = ((bits & ~0x7F800000) | np.array([0.5], dtype=F).view(np.int32)[0]).view(F)
    mask = x < F(0.707106781186547524)
    tmp = np.where(mask, x, F(0))
    x = (x - F(1)).astype(F)
    e = (e - np.where(mask, F(1), F(0))).astype(F)
    x = (x + tmp).astype(F)
    z = (x * x).astype(F)
    y = np.full_like(x, F(7.0376836292e-2))
    for p in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
              2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma(y, x, F(p))                          # y = y*x + p
    y = (y * x).astype(F)
    y = _fma(y, z, (e * F(-2.12194440e-4)).astype(F))  # y = y*z + e*q1
    y = (y - (z * F(0.5)).astype(F)).astype(F)       # (fused or not: identical on 1M samples)
    x = (x + y).astype(F)
    return _fma(e, F(0.693359375), x)                 # x + e*q2


def simd_sincos(x):
    """avx_mathfun.h sincos256_ps (Cephes sinf/cosf), f32, with GCC's FMA contractions. Returns (sin, cos)."""
    sign_sin = np.signbit(x)
    x = np.abs(x).astype(F)
    j = ((x * F(1.27323954473516)).astype(F).astype(np.int32) + 1) & ~1   # cvttps (truncate)
    y = j.astype(F)
    swap_sin = (j & 4) != 0
    poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, F(dp), x)                         # x = x + y*DPn
    sign_cos = (~(j - 2) & 4) != 0
    sign_sin = sign_sin ^ swap_sin
    z = (x * x).astype(F)
    yc = _fma(np.full_like(x, F(2.443315711809948e-005)), z, F(-1.388731625493765e-003))
    yc = _fma(yc, z, F(4.166664568298827e-002))
    yc = (yc * z).astype(F)
    yc = _fma(yc, z, -(z * F(0.5)).astype(F))         # yc*z - z*0.5 (fused multiply-subtract)
    yc = (yc + F(1)).astype(F)
    ys = _fma(np.full_like(x, F(-1.9515295891e-4)), z, F(8.3321608736e-3))
    ys = _fma(ys, z, F(-1.6666654611e-1))
    ys = (ys * z).astype(F)
    ys = _fma(ys, x, x)                               # ys*x + x
    s = np.where(poly, ys, yc)
    c = np.where(poly, yc, ys)
    return np.where(sign_sin, -s, s).astype(F), np.where(sign_cos, -c, c).astype(F)


def _libm():
    import ctypes

    lib = ctypes.CDLL("libm.so.6")
    for fn in ("logf", "cosf", "sinf", "sqrtf"):
        getattr(lib, fn).restype = ctypes.c_float
        getattr(lib, fn).argtypes = [ctypes.c_float]
    return lib


class TorchCpuRng:
    def __init__(self, seed, kernel="simd"):
        self.kernel = kernel
        self.bg = np.random.MT19937(0)
        self.bg._legacy_seeding(seed & 0xFFFFFFFF)  # init_genrand
        self.cached = None

    def u32(self, n):
        return self.bg.random_raw(n).astype(np.uint64)

    def randn(self, shape):
        n = int(np.prod(shape))
        if n >= 16:
            return self._normal_fill(n).reshape(shape)
        out = np.empty(n, dtype=np.float32)
        for i in range(n):
            if self.cached is not None:
                v, self.cached = self.cached, None
            else:
                w = self.u32(4)
                a = ((int(w[0]) << 32) | int(w[1])) & ((1 << 53) - 1)
                b = ((int(w[2]) << 32) | int(w[3])) & ((1 << 53) - 1)
                u1 = a * 2.0**-53
                u2 = b * 2.0**-53
                r = math.sqrt(-2.0 * math.log1p(-u2))
                th = 2.0 * math.pi * u1
                self.cached = r * math.sin(th)
                v = r * math.cos(th)
            out[i] = np.float32(v)
        return out.reshape(shape)

    def _uniform_f32(self, n):
        return ((self.u32(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)

    def _fill16(self, d, j):
        u1 = (F(1) - d[j : j + 8]).astype(F)
        u2 = d[j + 8 : j + 16].copy()
        if self.kernel == "simd":
            r = np.sqrt((F(-2) * simd_log(u1)).astype(F)).astype(F)
            s, c = simd_sincos((F(2.0 * math.pi) * u2).astype(F))
            d[j : j + 8] = (r * c).astype(F)
            d[j + 8 : j + 16] = (r * s).astype(F)
        else:
            lib = _LIBM
            for k in range(8):
                r = F(lib.sqrtf(F(-2) * F(lib.logf(u1[k]))))
                th = F(2.0 * math.pi * float(u2[k]))      # 2.0f * pi<double> * u2 -> double, then to float
                d[j + k] = F(r * F(lib.cosf(th)))
                d[j + 8 + k] = F(r * F(lib.sinf(th)))

    def _normal_fill(self, n):
        d = self._uniform_f32(n)
        for j in range(0, n - 15, 16):
            self._fill16(d, j)
        if n % 16 != 0:
            j = n - 16
            d[j:] = self._uniform_f32(16)
            self._fill16(d, j)
        return d


_LIBM = _libm()


def check(fname, kernel):
    with open(os.path.join(FIXTURES, fname)) as f:
        data = json.load(f)
    worst = 0.0
    exact = total = 0
    for case in data["cases"]:
        rng = TorchCpuRng(case["seed"], kernel)
        for draw in case["draws"]:
            ours = rng.randn(draw["shape"]).reshape(-1).astype(np.float64)
            if draw["values"] is None:
                continue
            ref = np.asarray(draw["values"], dtype=np.float64)
            diff = np.abs(ours - ref)
            worst = max(worst, float(diff.max()))
            exact += int((diff == 0).sum())
            total += diff.size
            if diff.max() > 1e-5:
                print(f"MISMATCH seed={case['seed']} shape={draw['shape']} max diff {diff.max()}")
                sys.exit(1)
    print(f"{fname}: rng model ({kernel} kernel) {exact}/{total} values bit-exact, max abs diff {worst:.3g}")
    assert exact == total, "not bit-exact"


def main():
    check("rng.json", "simd")
    check("rng_scalar.json", "scalar")


if __name__ == "__main__":
    main()
