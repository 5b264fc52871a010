"""Writes the two reference traces for bench/autoscale_sim.py (fixed seeds, so they never change).

    .venv/bin/python bench/traces/make_traces.py

- bursty.csv: bursts on the 5 FLUX models with long idle gaps (10-40 min); at peak the
  models want more GPUs (5 x maxReplicas 2) than the 4 the reference run gives them.
- diurnal.csv: 24 h of steady traffic whose rate follows the day (a trough at night,
  a peak in the afternoon), spread over the same models with fixed weights.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = [
    "black-forest-labs/FLUX.1-schnell",
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-Kontext-dev",
    "black-forest-labs/FLUX.2-klein-9B",
    "black-forest-labs/FLUX.2-dev",
]
SHAPES = {  # (steps, width, height) choices per model
    "black-forest-labs/FLUX.1-schnell": [(4, 1024, 1024), (4, 512, 512)],
    "black-forest-labs/FLUX.1-dev": [(28, 1024, 1024), (30, 512, 512), (50, 1024, 1024)],
    "black-forest-labs/FLUX.1-Kontext-dev": [(28, 1024, 1024), (30, 512, 512)],
    "black-forest-labs/FLUX.2-klein-9B": [(4, 1024, 1024), (8, 1024, 1024)],
    "black-forest-labs/FLUX.2-dev": [(28, 1024, 1024), (30, 512, 512)],
}


def job(rng: random.Random, t: float, model: str) -> list:
    steps, w, h = rng.choice(SHAPES[model])
    return [round(t, 2), model, steps, w, h]


def bursty(seed: int = 13) -> list[list]:
    rng = random.Random(seed)
    rows = []
    for model in MODELS:
        t = rng.uniform(0, 600)
        while t < 4 * 3600:
            size = rng.randint(8, 40)  # a user (or a script) submits a batch
            span = rng.uniform(10, 90)
            rows += [job(rng, t + rng.uniform(0, span), model) for _ in range(size)]
            t += span + rng.uniform(600, 2400)  # then nothing for 10-40 min
    return sorted(rows, key=lambda r: r[0])


def diurnal(seed: int = 7) -> list[list]:
    rng = random.Random(seed)
    weights = [0.35, 0.25, 0.1, 0.2, 0.1]
    peak, trough = 0.12, 0.004  # jobs per second over all models
    rows, t = [], 0.0
    while True:
        # Thinning: candidate arrivals at the peak rate, kept with rate(t) / peak.
        t += rng.expovariate(peak)
        if t >= 24 * 3600:
            break
        day = (1 - math.cos(2 * math.pi * (t - 3 * 3600) / 86400)) / 2  # 0 at 03:00, 1 at 15:00
        if rng.random() < (trough + (peak - trough) * day) / peak:
            rows.append(job(rng, t, rng.choices(MODELS, weights)[0]))
    return rows


def write(name: str, rows: list[list]) -> None:
    with open(HERE / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_seconds", "model", "steps", "width", "height"])
        w.writerows(rows)
    print(f"{name}: {len(rows)} jobs")


if __name__ == "__main__":
    write("bursty.csv", bursty())
    write("diurnal.csv", diurnal())
