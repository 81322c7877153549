"""MKL's packed-B GEMM (`cblas_sgemm_pack` + `cblas_sgemm_compute`) against plain
`cblas_sgemm` on SmolLM2's product shapes, single-threaded, cycling through 30 weight
copies (one per layer) so caches stay as cold as in the model. It also checks that a
matrix packed for one row count gives correct products at other row counts, and prints
how large a buffer MKL asks for and how much of it becomes resident. Numbers are in BENCHMARKS.md (Intel Xeon, 2026-12-06).

    python tools/probe_mkl_packed.py [path/to/libmkl_rt.so.3]

Needs numpy. The default library is the one `scripts/setup` unpacks.
"""
import ctypes
import os
import sys
import time

import numpy as np

path = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    os.path.join(os.environ.get("FARCER_HOME", "~/.cache/farcer"), "mkl/lib/libmkl_rt.so.3"))
lib = ctypes.CDLL(path)
lib.MKL_Set_Threading_Layer(1)  # sequential, as farcer runs it
lib.MKL_Set_Num_Threads(1)
ROW_MAJOR, NO_TRANS, PACKED, B_MATRIX = 101, 111, 151, 162
F = ctypes.c_float
lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def pack(w, m, n, k):
    size = lib.cblas_sgemm_pack_get_size(B_MATRIX, m, n, k)
    p = np.empty(size // 4 + 16, np.float32)
    lib.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, NO_TRANS, m, n, k, F(1.0), ptr(w), n, ptr(p))
    return p, size


def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def check(n=960, k=576):
    rng = np.random.default_rng(0)
    w = rng.random((k, n), dtype=np.float32)
    p, size = pack(w, 128, n, k)
    print(f"packed B for ({k} x {n}): {size / 1e6:.1f} MB asked for, the matrix {w.nbytes / 1e6:.1f} MB")
    # What becomes resident: MKL writes only part of the buffer it asks for (np.empty
    # leaves the rest untouched, as farcer's allocation does).
    ws = [rng.random((k, n), dtype=np.float32) for _ in range(10)]
    before = resident_mb()
    kept = [pack(x, 128, n, k)[0] for x in ws]
    grown = (resident_mb() - before) / len(kept)
    print(f"  resident per packed matrix: {grown:.1f} MB ({grown * 1e6 / w.nbytes:.2f}x the matrix)")
    for m in (1, 7, 88, 128, 512, 2048):
        x = rng.random((m, k), dtype=np.float32)
        y = np.zeros((m, n), np.float32)
        lib.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, ptr(x), k, ptr(p), n,
                                F(0.0), ptr(y), n)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        print(f"  packed for m=128, used at m={m}: max relative error {err:.1e}")


def timing(m, n, k, layers=30, reps=5):
    rng = np.random.default_rng(1)
    x = rng.random((m, k), dtype=np.float32)
    ws = [rng.random((k, n), dtype=np.float32) for _ in range(layers)]
    y = np.zeros((m, n), np.float32)
    packed = [pack(w, m, n, k)[0] for w in ws]

    def plain():
        for w in ws:
            lib.cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, k, F(1.0), ptr(x), k, ptr(w), n,
                            F(0.0), ptr(y), n)

    def packed_run():
        for p in packed:
            lib.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, m, n, k, ptr(x), k, ptr(p), n,
                                    F(0.0), ptr(y), n)

    best = {}
    for name, f in [("plain", plain), ("packed", packed_run)] * 2:
        f()
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / reps / layers)
    rate = {k_: 2 * m * n * k / s / 1e9 for k_, s in best.items()}
    print(f"| {m} | {n} | {k} | {rate['plain']:.0f} | {rate['packed']:.0f} | "
          f"{best['packed'] / best['plain']:.2f} |")


check()
print("| m | n | k | plain GFLOP/s | packed GFLOP/s | packed / plain time |")
print("|---:|---:|---:|---:|---:|---:|")
for m in (88, 128, 512):
    for n, k in ((480, 576), (576, 576), (1536, 576), (576, 1536), (768, 576), (288, 3072)):
        timing(m, n, k)
