"""What bounds two-stage inference on this machine: FLOPs per scan of each network against the
matmul GFLOP/s the CPU reaches, and what each network actually reaches.

    python benchmarks/flop_ceiling.py --rounds 7

Builds the networks params.yaml describes (timing does not depend on the weights), counts their
FLOPs with ``torch.utils.flop_counter`` (a multiply-add counts 2), times batched forwards and a
large fp32 matmul, and writes medians to ``reports/benchmarks/flop_ceiling.json``. The ceiling
is matmul GFLOP/s / FLOPs per scan: no network on this CPU scores faster than that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from covidct.atomic import write_text_atomic
from covidct.classification.model import build_classifier
from covidct.config import ClassifierConfig, PreprocessConfig, SegmenterConfig, load_params
from covidct.runtime import configure_threads
from covidct.segmentation.model import build_segmenter


def median_seconds(fn, rounds: int) -> float:
    fn()  # warm-up: allocations, oneDNN kernel choice
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_gflops(n: int, rounds: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, rounds) / 1e9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def network(
    model: torch.nn.Module, shape: tuple[int, ...], batch: int, rounds: int, passes: int = 1
) -> dict[str, float]:
    """``passes``: forwards per scan (2 with test-time augmentation)."""
    model.eval()
    flops = passes * forward_flops(model, torch.zeros(1, *shape))
    x = torch.randn(batch * passes, *shape)
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(x), rounds)
    return {
        "gflops_per_scan": flops / 1e9,
        "ms_per_scan": 1000 * seconds / batch,
        "achieved_gflops_per_s": flops * batch / seconds / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/flop_ceiling.json"))
    args = parser.parse_args()
    threads = configure_threads()
    params = load_params("params.yaml")
    pre, seg, clf = PreprocessConfig.of(params), SegmenterConfig.of(params), ClassifierConfig.of(params)
    peak = matmul_gflops(2048, args.rounds)
    nets = {
        "segmenter": network(build_segmenter(seg.channels), (1, pre.size, pre.size), args.batch, args.rounds),
        "classifier": network(
            build_classifier(clf.model).to(memory_format=torch.channels_last),
            (3, clf.image_size, clf.image_size),
            args.batch,
            args.rounds,
            2 if clf.tta else 1,
        ),
    }
    # how the crop stage ran the segmenter before it went channels-last: for the before/after
    before = network(
        build_segmenter(seg.channels).to(memory_format=torch.contiguous_format),
        (1, pre.size, pre.size),
        args.batch,
        args.rounds,
    )
    total_gflops = sum(n["gflops_per_scan"] for n in nets.values())
    networks_ms = sum(n["ms_per_scan"] for n in nets.values())
    result = {
        "threads": threads,
        "classifier_tta": clf.tta,
        "matmul_gflops_per_s": peak,
        **{f"{name}_{k}": v for name, stats in nets.items() for k, v in stats.items()},
        "gflops_per_scan": total_gflops,
        "ceiling_scans_per_s": peak / total_gflops,
        "networks_only_scans_per_s": 1000 / networks_ms,
        "segmenter_nchw_ms_per_scan": before["ms_per_scan"],
    }
    write_text_atomic(args.out, json.dumps(result, indent=2))
    print(f"{threads} threads; fp32 matmul: {peak:.1f} GFLOP/s (median of {args.rounds})")
    for name, stats in nets.items():
        share = stats["achieved_gflops_per_s"] / peak
        print(
            f"{name}: {stats['gflops_per_scan']:.3f} GFLOP/scan, {stats['ms_per_scan']:.1f} ms/scan batched, {stats['achieved_gflops_per_s']:.1f} GFLOP/s ({share:.0%} of matmul)"
        )
    print(f"segmenter in NCHW (before): {before['ms_per_scan']:.1f} ms/scan")
    print(
        f"ceiling {result['ceiling_scans_per_s']:.1f} scans/s at matmul speed; the two networks alone: {result['networks_only_scans_per_s']:.1f} scans/s"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
