"""Pairs aligned per second, both encodes included, at several ``batch_size`` values.

    python benchmarks/throughput.py                                   # CPU, torch's threads, batch 1, 8, 32
    python benchmarks/throughput.py --device cuda --num-pairs 256     # a GPU, named in the table
    python benchmarks/throughput.py --pipeline DIR --threads 1 --batch-sizes 1 4 16
    python benchmarks/throughput.py --processes 2 --threads 1 --batch-sizes 1   # one process per core

One set of seeded ``resolution``² pairs from the photos bundled with the package goes through the
pipeline at each batch size, the same pairs for each: images and references in memory as tensors
(reading and decoding files is not included), encoded, aligned, θ returned (``output_type="latent"``:
no decode, no pixel warp). One small call first takes the one-off costs (kernel selection, caches)
out of the timings.

With ``--processes N``, N processes (each with ``--threads`` torch threads) share the pairs, each
loading the pipeline and warming up before a common start; the rate is all pairs over the time from
that start to the last process's end. Many small operations of the STN run on one core whatever the
thread count, so on a small CPU one single-threaded process per core is the faster configuration
(what ``stn-diffusers align`` does under ``torchrun``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import time
from pathlib import Path

import torch

from stn_diffusers import data, metrics
from stn_diffusers.cli import load_pipeline

DEFAULT_BATCH_SIZES = (1, 8, 32)
# Seconds a --processes run waits for its workers to load, and then for each to finish.
WORKER_TIMEOUT = 900


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the torch threads in use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")  # Linux names the model there; elsewhere platform's answer stands
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = models[0] if models else platform.processor() or "CPU"
    return f"{model}, {torch.get_num_threads()} torch thread(s)"


def pairs_per_second(pipe, movings: list[torch.Tensor], references: list[torch.Tensor], batch_size: int) -> float:
    """Pairs per second of one call that aligns every pair, ``batch_size`` pairs at a time (encodes included)."""
    start = time.perf_counter()
    output = pipe(movings, reference=references, output_type="latent", batch_size=batch_size)
    seconds = metrics.seconds_since(start, output.latents)
    return len(movings) / seconds


def _worker(args, share: slice, batch_size: int, start_barrier, results) -> None:
    """One process of ``--processes``: align pairs ``share`` once every process is ready; put its end time."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe, movings, references = prepare(args)
    pairs_per_second(pipe, movings[:1], references[:1], 1)  # warm-up, before the common start
    start_barrier.wait()
    pairs_per_second(pipe, movings[share], references[share], batch_size)
    results.put(time.perf_counter())


def processes_rate(args, batch_size: int) -> float:
    """Pairs per second of ``args.processes`` processes sharing the pairs (see the module docs)."""
    context = multiprocessing.get_context("spawn")
    # A worker that dies before the start breaks the barrier after the timeout instead of hanging the run.
    start_barrier, results = context.Barrier(args.processes + 1, timeout=WORKER_TIMEOUT), context.Queue()
    shares = [slice(i, args.num_pairs, args.processes) for i in range(args.processes)]
    workers = [
        context.Process(target=_worker, args=(args, share, batch_size, start_barrier, results)) for share in shares
    ]
    for worker in workers:
        worker.start()
    start_barrier.wait()
    start = time.perf_counter()
    ends = [results.get(timeout=WORKER_TIMEOUT) for _ in workers]
    for worker in workers:
        worker.join()
    return args.num_pairs / (max(ends) - start)


def prepare(args) -> tuple:
    """The pipeline (progress bars off) and the seeded pairs' moving images and references."""
    pipe = load_pipeline(args.pipeline, torch.device(args.device))
    pipe.set_progress_bar_config(disable=True)
    sources, names = data.bundled_photos()
    pairs = data.seeded_pairs(sources, args.num_pairs, resolution=args.resolution, seed=args.seed, names=names)
    return pipe, [pair.moving for pair in pairs], [pair.reference for pair in pairs]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--num-pairs", type=int, default=32, help="pairs aligned at each batch size")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the square pairs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES), help="pairs per batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    parser.add_argument("--processes", type=int, default=1, help="processes sharing the pairs (see the module docs)")
    args = parser.parse_args()
    if not 1 <= args.processes <= args.num_pairs:
        parser.error(f"expected --processes between 1 and --num-pairs ({args.num_pairs}), got {args.processes}")
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if args.processes > 1:
        for batch_size in args.batch_sizes:
            rate = processes_rate(args, batch_size)
            rows.append([batch_size, f"{rate:.2f}", metrics.format_milliseconds(1 / rate)])
    else:
        pipe, movings, references = prepare(args)
        pairs_per_second(pipe, movings[:1], references[:1], 1)  # warm-up: one-off costs stay out of the table
        for batch_size in args.batch_sizes:
            rate = pairs_per_second(pipe, movings, references, batch_size)
            rows.append([batch_size, f"{rate:.2f}", metrics.format_milliseconds(1 / rate)])
    where = device_name(device) + (f", {args.processes} processes" if args.processes > 1 else "")
    print(
        f"{args.num_pairs} pairs at {args.resolution}×{args.resolution}, encodes included, "
        f"pipeline {args.pipeline or 'embedded default'}, on {where}"
    )
    print(metrics.markdown_table(("batch_size", "pairs / s", metrics.TIME_PER_PAIR_WITH_ENCODE), rows))


if __name__ == "__main__":
    main()
