"""Cost and reference values of the generative metrics (fedtier.generative), one thread.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/generative_metrics.py

Trains the MNIST-5k judge (no cache), the multisource-mnist class and source judges, and
times FID against MNIST-5k's 4,000 training images for 1,000 and 10,000 generated images.
The "generated" images are test images with Gaussian noise (σ = 0.3, clamped to [-1, 1]),
tiled to 10,000; the real test set against the training set gives FID's floor. Wall and
process CPU seconds are both printed: on a shared machine the CPU time is the better guide
to an idle core.
"""

from __future__ import annotations

import os
import time

import torch

from fedtier.data import load_dataset
from fedtier.generative import FidScorer, class_coverage, dataset_judge, to_pm1


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    torch.set_num_threads(1)
    os.environ["FEDTIER_CACHE"] = os.environ.get("FEDTIER_CACHE_BENCH", "/tmp/fedtier-bench-cache")
    print(f"load average before: {os.getloadavg()}")
    train, test = load_dataset("mnist5k")
    x_test = to_pm1(test.x, train)
    for seed in (0, 1):
        judge, wall, cpu = timed(lambda s=seed: _fresh(train, s))
        print(
            f"mnist5k judge seed {seed}: test accuracy {judge.accuracy(x_test, test.y):.4f}, "
            f"train {wall:.1f} s wall / {cpu:.1f} s CPU (4,000 images, 8 epochs)"
        )
    ms_train, ms_test = load_dataset("multisource-mnist")
    xm = to_pm1(ms_test.x, ms_train)
    for by, labels in (("class", ms_test.y), ("source", ms_test.source)):
        j, wall, cpu = timed(lambda by=by: dataset_judge(ms_train, by=by))
        per = [j.accuracy(xm[ms_test.source == s], labels[ms_test.source == s]) for s in range(3)]
        print(
            f"multisource-mnist {by} judge: accuracy {j.accuracy(xm, labels):.4f} "
            f"(per source {', '.join(f'{a:.4f}' for a in per)}), {wall:.1f} s wall / {cpu:.1f} s CPU"
            + (" (cached)" if j.cached else "")
        )

    judge = dataset_judge(train)
    real = to_pm1(train.x, train)
    scorer, wall, cpu = timed(lambda: FidScorer(real, judge))
    print(f"FID reference (4,000 real images' features): {wall:.2f} s wall / {cpu:.2f} s CPU")
    noise = torch.Generator().manual_seed(0)
    fake = x_test.repeat(10, 1, 1, 1) + 0.3 * torch.randn(10_000, 1, 28, 28, generator=noise)
    fake = fake.clamp(-1, 1)
    for n in (1_000, 10_000):
        value, wall, cpu = timed(lambda n=n: scorer.score(fake[:n]))
        print(f"FID of {n:,} noisy test images: {value:.3f} ({wall:.2f} s wall / {cpu:.2f} s CPU)")
    print(f"FID of the 1,000 real test images (floor): {scorer.score(x_test):.3f}")
    cov = class_coverage(x_test, judge, train.y)
    print(
        f"real test images: KL {cov['kl_data_generated']:.4f} nats, mean confidence "
        f"{cov['mean_confidence']:.4f}, confident share {cov['confident_share']:.4f}"
    )
    print(f"load average after: {os.getloadavg()}")


def _fresh(train, seed):
    from fedtier.generative import train_judge

    return train_judge(to_pm1(train.x, train), train.y, seed=seed, num_classes=10, use_cache=False)


if __name__ == "__main__":
    main()
