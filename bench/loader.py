"""Weights loader throughput: GB/s from a local safetensors file of realistic size.

Writes one safetensors file of random bf16 weights (default 10 GB, in 256 MiB tensors,
streamed to disk: never whole in memory), then loads it with each loader present and
prints GB/s against the baseline measured in the same run, a plain sequential read of
the file into memory (what the disk or page cache gives at best):

- `safetensors.load_file`: the whole file at once (`device` as given);
- `safe_open` + `get_tensor` per tensor: what diffusers' `from_pretrained` does;
- Run:ai Model Streamer (`runai-model-streamer`) and `fastsafetensors`, when installed
  (`uv pip install runai-model-streamer fastsafetensors`): they are not dependencies of
  the worker until this shows them faster.

Each loader runs cold (the file's pages evicted first with posix_fadvise DONTNEED: a
node whose cache was just fetched, or that read other models since) and warm (right
after, from the page cache). With `--device cuda` the tensors go to the GPU.

    .venv/bin/python bench/loader.py [--size-gb 10] [--dir /path/on/the/cache/disk] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

TENSOR_BYTES = 256 << 20


def write_file(path: Path, size_bytes: int) -> int:
    """A safetensors file of random bf16 tensors; returns its size."""
    count = max(1, size_bytes // TENSOR_BYTES)
    header: dict[str, object] = {}
    for i in range(count):
        header[f"layers.{i}.weight"] = {
            "dtype": "BF16",
            "shape": [TENSOR_BYTES // 2],
            "data_offsets": [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES],
        }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count):
            f.write(rng.integers(0, 256, TENSOR_BYTES, dtype=np.uint8).tobytes())
    return path.stat().st_size


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: Path, device: str) -> int:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def _loaded(t: object, device: str, mapped: bool = True) -> int:
    """Bytes of a tensor that is really in memory: on the CPU safetensors hands out views
    of its memory map, read only when touched, so they are copied out (a load's copy)."""
    if device == "cpu" and mapped:
        t = t.clone()  # type: ignore[attr-defined]
    return int(t.numel() * t.element_size())  # type: ignore[attr-defined]


def st_load_file(path: Path, device: str) -> int:
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=device)
    return sum(_loaded(t, device) for t in tensors.values())


def st_safe_open(path: Path, device: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt", device=device) as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            total += _loaded(f.get_tensor(key), device)
    return total


def runai(path: Path, device: str) -> int:
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(str(path))
        for _name, tensor in streamer.get_tensors():
            total += _loaded(tensor.to(device), device, mapped=False)
    return total


def fastst(path: Path, device: str) -> int:
    import torch
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), torch.device(device), nogds=True)
    loader.add_filenames({0: [str(path)]})
    total = 0
    try:
        bufs = loader.copy_files_to_device()
        for key in bufs.key_to_rank_lidx:
            total += _loaded(bufs.get_tensor(key).clone(), device, mapped=False)  # bufs are freed
        bufs.close()
    finally:
        loader.close()
    return total


LOADERS: list[tuple[str, Callable[[Path, str], int], str | None]] = [
    ("sequential read (baseline)", raw_read, None),
    ("safetensors load_file", st_load_file, "safetensors"),
    ("safe_open + get_tensor (diffusers)", st_safe_open, "safetensors"),
    ("Run:ai Model Streamer", runai, "runai_model_streamer"),
    ("fastsafetensors", fastst, "fastsafetensors"),
]


def timed(fn: Callable[[Path, str], int], path: Path, device: str) -> tuple[float, int]:
    import gc

    started = time.perf_counter()
    n = fn(path, device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    gc.collect()
    return seconds, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=10.0)
    ap.add_argument("--dir", help="where to write the file (default: a temporary folder)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import safetensors.torch  # noqa: F401 - imports (torch's above all) are not load time
    import torch  # noqa: F401

    folder = Path(args.dir or tempfile.mkdtemp(prefix="loader-bench-"))
    path = folder / "model.safetensors"
    try:
        t0 = time.perf_counter()
        size = write_file(path, int(args.size_gb * 1e9))
        print(f"wrote {size / 1e9:.2f} GB of random bf16 in {time.perf_counter() - t0:.1f}s to {path}")
        print(f"device {args.device}; GB/s (x baseline of the same run)")
        print(f"{'loader':<36} {'cold GB/s':>10} {'warm GB/s':>10}")
        base: dict[str, float] = {}
        for name, fn, module in LOADERS:
            if module is not None:
                try:
                    __import__(module)
                except ImportError:
                    print(f"{name:<36} {'not installed':>21}")
                    continue
            row = {}
            for mode in ("cold", "warm"):
                if mode == "cold":
                    evict(path)
                try:
                    seconds, n = timed(fn, path, args.device)
                except Exception as e:  # noqa: BLE001 - a loader that cannot run here says why
                    print(f"{name:<36} failed: {type(e).__name__}: {e}")
                    break
                row[mode] = n / 1e9 / seconds
            else:
                if not base:
                    base = row
                ratio = {m: row[m] / base[m] for m in row}
                print(
                    f"{name:<36} {row['cold']:>6.2f} x{ratio['cold']:.2f} {row['warm']:>6.2f} x{ratio['warm']:.2f}"
                )
    finally:
        path.unlink(missing_ok=True)
        if not args.dir:
            folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
