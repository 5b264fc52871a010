"""Result encoding at 1024x1024: the worker's PNG setting against Pillow's default, and each
output format (png, jpeg, webp) as the worker encodes it, in the same run.

    python bench/png_encode.py [--repeats 10]

The worker encodes outside the engine lock, overlapped with the next job's denoising,
but a single request still waits for its PNG. Random-weight models make noise, which
no setting compresses, so this measures on a photograph-like image instead: smooth
low-frequency colour fields with mild sensor noise, like a render of real weights.
Prints the median time and the size per zlib level, and the ratios against level 6;
then per output format (the worker's encode_image, default quality) and WebP's slowest
method for comparison, with the ratios against the worker's PNG.
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
    levels(image, args.repeats, PNG_COMPRESS_LEVEL)
    formats(image, args.repeats)
    return 0


def timed(save, repeats: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    times, size = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        size = len(save())
        times.append(time.perf_counter() - t)
    return statistics.median(times), size


def levels(image, repeats: int, worker_level: int) -> None:  # type: ignore[no-untyped-def]
    def save(level: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    rows = {
        level: timed(lambda lv=level: save(lv), repeats) for level in dict.fromkeys((6, 1, worker_level, 0))
    }
    base_t, base_s = rows[6]
    print("1024x1024 photograph-like image, median of", repeats)
    for level, (t, size) in rows.items():
        tag = " (Pillow's default)" if level == 6 else " (the worker's)" if level == worker_level else ""
        print(
            f"  zlib level {level}{tag:<20} {t * 1000:7.1f} ms  x{base_t / t:4.2f} faster   {size / 1024:7.0f} KiB  x{size / base_s:4.2f} size"
        )


def formats(image, repeats: int) -> None:  # type: ignore[no-untyped-def]
    from remotegpu_base.protocol import DEFAULT_OUTPUT_QUALITY
    from remotegpu_worker.engine.pipelines import encode_image

    def webp_method_4() -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="WEBP", quality=DEFAULT_OUTPUT_QUALITY, method=4)
        return buf.getvalue()

    rows = {fmt: timed(lambda f=fmt: encode_image(image, f), repeats) for fmt in ("png", "jpeg", "webp")}
    rows["webp method 4 (Pillow's default)"] = timed(webp_method_4, repeats)
    base_t, base_s = rows["png"]
    print(
        f"output formats as the worker encodes them (quality {DEFAULT_OUTPUT_QUALITY}), median of {repeats}"
    )
    for name, (t, size) in rows.items():
        print(
            f"  {name:<34} {t * 1000:7.1f} ms  x{base_t / t:5.2f} faster   {size / 1024:7.0f} KiB  x{size / base_s:4.2f} size"
        )


if __name__ == "__main__":
    sys.exit(main())
