"""PNG encoding at 1024x1024: the worker's setting against Pillow's default, in the same run.

    python bench/png_encode.py [--repeats 10]

The worker encodes outside the engine lock, overlapped with the next job's denoising,
but a single request still waits for its PNG. Random-weight models make noise, which
no setting compresses, so this measures on a photograph-like image instead: smooth
low-frequency colour fields with mild sensor noise, like a render of real weights.
Prints the median time and the size per zlib level, and the ratios against level 6.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "inference-worker"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_like(side: int = 1024, seed: int = 0):  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8, 3)) * 255
    field = np.asarray(
        Image.fromarray(coarse.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    )
    noisy = field.astype(np.float64) + rng.normal(0, 4, (side, side, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from remotegpu_worker.engine.pipelines import PNG_COMPRESS_LEVEL

    image = photo_like()
    rows = {}
    for level in (6, 1, PNG_COMPRESS_LEVEL, 0):
        if level in rows:
            continue
        times, size = [], 0
        for _ in range(args.repeats):
            buf = io.BytesIO()
            t = time.perf_counter()
            image.save(buf, format="PNG", compress_level=level)
            times.append(time.perf_counter() - t)
            size = len(buf.getvalue())
        rows[level] = (statistics.median(times), size)
    base_t, base_s = rows[6]
    print("1024x1024 photograph-like image, median of", args.repeats)
    for level, (t, size) in rows.items():
        tag = (
            " (Pillow's default)" if level == 6 else " (the worker's)" if level == PNG_COMPRESS_LEVEL else ""
        )
        print(
            f"  zlib level {level}{tag:<20} {t * 1000:7.1f} ms  x{base_t / t:4.2f} faster   {size / 1024:7.0f} KiB  x{size / base_s:4.2f} size"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
