"""The sa-jobs job kind the benchmarks enqueue and drain: a no-op that records its ``n``."""

from __future__ import annotations

from sa_jobs import Job, JobContext

try:  # run as benchmarks.kinds from the repo, or imported by the driver script
    from benchmarks.drivers import _proto
except ImportError:  # pragma: no cover
    import _proto  # type: ignore[no-redef]


class BenchNoop(Job, kind="bench_noop", queue="bench"):
    """A job that does nothing but note that it ran."""


@BenchNoop.handler
async def bench_noop(ctx: JobContext, n: int) -> None:
    _proto.record(n)
