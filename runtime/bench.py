"""``dmpo-edge bench``: trtexec-style latency of the early-exit pipeline against the static model, same run.

For each batch size the early-exit pipeline and the static full model (every stage, no exits, same
backend, same inputs) are timed *interleaved*: round r runs batch r through the pipeline, then the same
batch through the static model, so clock, thermal and neighbour drift hits both. Only the inference call
is timed; bookkeeping (exit histograms, counters, accuracy) runs between the timed calls.

trtexec's defaults and vocabulary: warm-up 200 ms, then at least 10 iterations and at least 3 s;
throughput in samples/s; latency min / mean / median / p90 / p95 / p99 / max with trtexec's percentile
(see :mod:`.bench_stats`). On top: per-stage time and samples, the exit histogram against the manifest's
expected distribution, the realised speed-up (static / early exit), the ideal speed-up (full FLOPs /
expected FLOPs under the realised exits) and their ratio, the efficiency.

Numpy only here; data sets and threshold solvers are the command's business (this module takes arrays).

The work is split by job: :mod:`.bench_args` (argument lists), :mod:`.bench_loop` (the interleaved loop),
:mod:`.bench_measure` (driving the pipeline, per-batch-size figures), :mod:`.bench_stats` (statistics and
the cost model), :mod:`.bench_report` (text report), :mod:`.bench_plot` (sweep plot). This module is the
one place callers import from.
"""

from __future__ import annotations

from .bench_args import parse_batch_list, parse_float_list, parse_thresholds
from .bench_loop import Runner, batches_of, interleave
from .bench_measure import (
    DEFAULT_DURATION_S, DEFAULT_ITERATIONS, DEFAULT_SWEEP_BUDGETS, DEFAULT_WARMUP_MS, BenchSettings, bench_batch,
    host_overhead, machine_info, run_benchmark,
)
from .bench_plot import plot_sweep
from .bench_report import format_report, threads_text

__all__ = [
    "DEFAULT_WARMUP_MS", "DEFAULT_DURATION_S", "DEFAULT_ITERATIONS", "DEFAULT_SWEEP_BUDGETS",
    "parse_batch_list", "parse_float_list", "parse_thresholds", "Runner", "interleave", "BenchSettings", "threads_text",
    "batches_of", "bench_batch", "run_benchmark", "host_overhead", "format_report", "plot_sweep", "machine_info",
]
