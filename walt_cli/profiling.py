"""Measuring helpers shared by the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Callable


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during `fn()` above what it held before:
    replayed from the profiler's allocation events (each carries +bytes or -bytes, in order).
    Exact and unaffected by other processes, unlike the resident set size."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
