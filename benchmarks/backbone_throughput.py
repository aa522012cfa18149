"""Forward throughput of the image backbones on this machine's CPU (images/s, after warm-up).

Two ways of running the same model, since callers differ: an eager ``model(x)`` call and
``predict_on_batch`` (a traced tf.function). (An XLA-compiled tf.function was tried too and is
an order of magnitude slower on CPU, since XLA's CPU depthwise convolutions are slow.)

    .venv/bin/python benchmarks/backbone_throughput.py [--sizes 224 160 128] [--batch 64] [--seconds 8]

Prints a table and writes benchmarks/results/backbone_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "backbone_throughput.json"
DEFAULT_SIZES = (224, 160, 128)
WARMUP_BATCHES = 2
MIN_TIMED_BATCHES = 3


def runners(model):
    return {"eager_call": lambda x: model(x, training=False), "predict_on_batch": model.predict_on_batch}


def images_per_second(run, batch: np.ndarray, seconds: float) -> tuple[float, int]:
    """Warm up (tracing/compilation), then time whole batches for at least ``seconds``."""
    for _ in range(WARMUP_BATCHES):
        np.asarray(run(batch))
    done, start = 0, time.perf_counter()
    while done < MIN_TIMED_BATCHES or time.perf_counter() - start < seconds:
        np.asarray(run(batch))
        done += 1
    return done * len(batch) / (time.perf_counter() - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="minimum timed seconds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import tensorflow as tf

    from fashion_tagging.backbones import build_backbone

    load_before = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        model = build_backbone(args.backbone, size)
        batch = np.random.default_rng(0).uniform(0, 255, size=(args.batch, size, size, 3)).astype(np.float32)
        for mode, run in runners(model).items():
            rate, batches = images_per_second(run, batch, args.seconds)
            rows.append({"backbone": args.backbone, "image_size": size, "batch": args.batch, "mode": mode,
                         "images_per_s": round(rate, 1), "timed_batches": batches})
            print(f"{args.backbone:<20} {size:>5} {args.batch:>6} {mode:<18} {rate:>9.1f} img/s", flush=True)

    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
               "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU")),
               # Other work on a shared machine skews these numbers; the 1-minute load average shows it.
               "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")

    print(f"\n{'backbone':<20} {'size':>5} {'batch':>6} {'mode':<18} {'images/s':>9}")
    for row in rows:
        print(f"{row['backbone']:<20} {row['image_size']:>5} {row['batch']:>6} {row['mode']:<18} {row['images_per_s']:>9.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
