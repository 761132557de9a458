"""Predict throughput (texts/s) of a trained model at batch 1 and 32, compile excluded.

    .venv/bin/python benchmarks/predict_throughput.py workdirs/demo

Texts: the first 320 of the demo set's test split; every length bucket is
compiled before the timed runs; median of 3 runs.
"""

import json
import sys
import time

import numpy as np

import mtop_jax
from mtop_jax.data.demo import DEBIAN_PACKAGES_DIR

TEST = DEBIAN_PACKAGES_DIR / "test.jsonl"


def main(workdir: str) -> None:
    predictor = mtop_jax.load(workdir)
    with open(TEST) as f:
        texts = [json.loads(line)["text"] for line in f][:320]
    for batch in (1, 32):
        predictor.batch_size, predictor.batch_buckets = batch, (batch,)
        n = 64 if batch == 1 else 320
        predictor.predict(texts[:n])  # compile every length bucket first
        times = []
        for _ in range(3):
            start = time.perf_counter()
            predictor.predict(texts[:n])
            times.append(time.perf_counter() - start)
        print(f"batch {batch}: {n / np.median(times):.1f} texts/s (median of 3 runs over {n} "
              f"texts; {min(times):.2f}-{max(times):.2f} s); max_length {predictor.max_length}")


if __name__ == "__main__":
    main(sys.argv[1])
