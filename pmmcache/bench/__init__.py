"""Benchmarks (`pmmcache bench step|eval|extract`): every figure measured side by side in one process and
reported as one JSON object with the ratios between them. See docs/benchmarks.md."""
from pmmcache.bench.common import machine, write_synthetic_cache
from pmmcache.bench.evaluation import run_eval_bench
from pmmcache.bench.extract import run_extract_bench
from pmmcache.bench.reader import reader_bench, write_chunked_copy
from pmmcache.bench.step import run_step_bench

__all__ = ["machine", "reader_bench", "run_eval_bench", "run_extract_bench", "run_step_bench",
           "write_chunked_copy", "write_synthetic_cache"]
