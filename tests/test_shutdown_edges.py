"""Worker shutdown at awkward moments, in-process against real PostgreSQL: outcomes that
cannot be written before the stop, the app cancelling the worker, connections left behind."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any, Callable

import anyio
import psycopg
from sqlalchemy.orm import Session

from sa_jobs import Discard, Job, JobContext, Worker
from sa_jobs._url import to_conninfo
from sa_jobs.events import NullObserver

from .helpers import jobs_sql, q, until


class SdQuick(Job, kind="sd_quick", queue="sd"):
    pass


SD_GO: list[bool] = []


@SdQuick.handler
async def sd_quick(ctx: JobContext) -> str:
    while not SD_GO:  # returns once the test holds its row locked
        await anyio.sleep(0.01)
    return "done"


class Finished(NullObserver):
    def __init__(self) -> None:
        self.started = 0
        self.finished: list[str] = []

    def job_started(self, queue: str, kind: str, wait_seconds: float) -> None:
        self.started += 1

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        self.finished.append(outcome)


def add(engine, *jobs: Job) -> list[int]:
    with Session(engine) as session, session.begin():
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def test_an_outcome_left_unwritten_at_the_stop_is_reported_as_lease_lost(engine, database_url, schema):
    """The job's row is locked by another transaction through the whole drain: its
    completion waits (kept) until the drain gives up, and the worker stops with the row
    still 'running' (rescued after its lease). The attempt was never reported: started
    and never finished, the in-flight gauge stuck at 1 for an embedded worker's app. It
    counts as lease_lost, as an outcome whose write changed no row does, never as
    completed (the row is not)."""
    SD_GO.clear()
    [job_id] = add(engine, SdQuick())
    observer = Finished()
    sql = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    with psycopg.connect(to_conninfo(database_url)) as locker:

        async def main() -> float:
            worker = Worker(database_url, kinds=[SdQuick], schema=schema, lease=2, poll_interval=0.2,
                            maintenance_interval=0.1, shutdown_grace=30, observer=observer)
            async with worker:
                with anyio.fail_after(10):
                    while observer.started == 0:
                        await anyio.sleep(0.01)
                assert locker.execute(sql, (job_id,)).fetchone() == ("running",)
                SD_GO.append(True)
                with anyio.fail_after(10):
                    while worker.completer is None or not worker.completer.awaiting():
                        await anyio.sleep(0.01)
                stopping = time.monotonic()
            return time.monotonic() - stopping

        took = anyio.run(main)
        locker.rollback()
    assert took < 10  # the drain's bound (max(2, lease / 2)) and the services' stop
    assert q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,)) == [("running",)]
    assert observer.finished == ["lease_lost"]


class SdHang(Job, kind="sd_hang", queue="sd"):
    pass


SD_HANG_RUNS: list[int] = []


@SdHang.handler
async def sd_hang(ctx: JobContext) -> None:
    SD_HANG_RUNS.append(ctx.attempt)
    await anyio.sleep_forever()


class Claims(NullObserver):
    def __init__(self) -> None:
        self.jobs_claimed = 0
        self.finished: list[str] = []

    def claimed(self, queue: str, count: int, seconds: float) -> None:
        self.jobs_claimed += count

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        self.finished.append(outcome)


def test_release_running_alone_stops_the_worker_instead_of_claiming_and_releasing_for_ever(engine, database_url,
                                                                                           schema):
    """release_running() without a stop first (an app's "stop now" hook) released the
    running job and left the worker claiming: every job it claimed from then on was
    released at once, poll after poll (10 claims of the one job in 2 s), never run here
    and kept from the other workers. It stops the worker now: run() returns, the job is
    available with its attempt refunded, claimed once."""
    SD_HANG_RUNS.clear()
    [job_id] = add(engine, SdHang())
    observer = Claims()

    async def main() -> float:
        worker = Worker(database_url, kinds=[SdHang], schema=schema, lease=5, poll_interval=0.1,
                        shutdown_grace=60, observer=observer)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: SD_HANG_RUNS)
            worker.release_running()
            released = time.monotonic()
            with anyio.move_on_after(10):
                await anyio.sleep(1)  # room for the claims that followed
                while worker._running:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return time.monotonic() - released

    took = anyio.run(main)
    assert took < 5  # run() returned, not the test's cancellation after 10 s
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs} WHERE id = %s"), (job_id,)) == [
        ("available", 0)]
    assert (observer.jobs_claimed, observer.finished, SD_HANG_RUNS) == (1, ["released"], [1])


class SdDone(Job, kind="sd_done", queue="sd"):
    pass


@SdDone.handler
async def sd_done(ctx: JobContext) -> str:
    return "done"


def _state(database_url: str, schema: str, job_id: int) -> str:
    return q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))[0][0]


def test_a_stop_requested_while_the_worker_is_not_running_ends_its_next_run_at_once(engine, database_url, schema):
    """request_stop() between two runs of one Worker (a sync app's restart loop, its exit
    hook come between two runs) was dropped with the ended run's state: the next run()
    ran on, and the app's join hung for good. A stop asked for while no run is in
    progress, before the first as between two, applies to the next run: it claims nothing
    and run() returns at once. That run uses the stop up: the one after it runs jobs."""
    worker = Worker(database_url, kinds=[SdDone], schema=schema, lease=5, poll_interval=0.1, maintenance_interval=0.1)

    async def run_until_done(job_id: int) -> None:
        async with worker:
            with anyio.fail_after(10):
                while _state(database_url, schema, job_id) != "completed":
                    await anyio.sleep(0.02)

    async def run_asked_to_stop() -> None:
        with anyio.fail_after(5):
            await worker.run()

    [first] = add(engine, SdDone())
    anyio.run(run_until_done, first)
    for _ in range(2):  # asked twice: still one stop, for one run
        worker.request_stop()
    [waiting] = add(engine, SdDone())
    anyio.run(run_asked_to_stop)
    assert _state(database_url, schema, waiting) == "available"  # claimed nothing
    anyio.run(run_until_done, waiting)  # the stop was used up

    fresh = Worker(database_url, kinds=[SdDone], schema=schema, lease=5, poll_interval=0.1)
    fresh.request_stop()  # before its first run: the same
    anyio.run(lambda: _run_within(fresh, 5))


async def _run_within(worker: Worker, seconds: float) -> None:
    with anyio.fail_after(seconds):
        await worker.run()


def test_shutdown_of_a_worker_that_is_not_running_returns_at_once(engine, database_url, schema):
    """await worker.shutdown() on a Worker whose run had not begun waited out the grace
    period (30 s), then for good, for a run that never came. It returns at once, and the
    stop applies to the next run, as request_stop()'s does."""
    worker = Worker(database_url, kinds=[SdDone], schema=schema, lease=5, poll_interval=0.1)

    async def main() -> None:
        with anyio.fail_after(5):
            await worker.shutdown()
            await worker.run()

    anyio.run(main)


def test_a_shutdown_during_a_start_that_fails_returns(engine, database_url, schema):
    """shutdown() called while the worker starts, and the start then fails (its schema is
    not installed): it waited for runners and a serve task that never began, the grace
    period and then for good. It returns once the start has failed."""
    worker = Worker(database_url, kinds=[SdDone], schema=schema + "_missing", lease=5, shutdown_grace=60)
    failed: list[BaseException] = []

    async def start() -> None:
        try:
            async with worker:
                pass
        except Exception as exc:  # noqa: BLE001 - the schema check's refusal
            failed.append(exc)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            with anyio.fail_after(5):
                while not worker._running:
                    await anyio.sleep(0)
                await worker.shutdown()
        assert failed and "schema" in str(failed[0]).lower()

    anyio.run(main)


def test_an_outcome_that_waited_on_a_cancel_and_was_fenced_off_counts_as_cancelled(engine, database_url, schema):
    """The handler returned while an app's cancel() of its job was not yet committed (it
    holds the row): the completion waited, was kept, and was fenced off once the cancel
    committed. The attempt was counted lease_lost, as if another worker had taken the job;
    it was cancelled under this claim, and counts as cancelled, as a cancel heard while the
    handler ran does."""
    from sa_jobs import cancel

    SD_GO.clear()
    [job_id] = add(engine, SdQuick())
    observer = Finished()

    async def main() -> None:
        worker = Worker(database_url, kinds=[SdQuick], schema=schema, lease=30, poll_interval=0.2,
                        maintenance_interval=0.1, observer=observer)
        async with worker:
            with anyio.fail_after(10):
                while observer.started == 0:
                    await anyio.sleep(0.01)
            with Session(engine) as session:
                session.begin()
                assert cancel(session, job_id) == "running"  # not committed: it holds the row
                SD_GO.append(True)
                with anyio.fail_after(10):
                    while worker.completer is None or not worker.completer.awaiting():
                        await anyio.sleep(0.01)
                session.commit()
            with anyio.fail_after(10):
                while not observer.finished:
                    await anyio.sleep(0.01)

    anyio.run(main)
    assert observer.finished == ["cancelled"]
    assert _state(database_url, schema, job_id) == "cancelled"


# ---- a handler that ended in the same event-loop step as the release --------------------

SD_GATES: list[asyncio.Future[None]] = []  # one per run of an async gated handler
SD_THREAD_GATES: list[threading.Event] = []  # one per run of the sync gated handler


async def _gated() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    SD_GATES.append(gate)
    await gate


class SdGatedReturns(Job, kind="sd_gated_returns", queue="sd"):
    pass


@SdGatedReturns.handler
async def sd_gated_returns(ctx: JobContext) -> str:
    await _gated()
    return "done"


class SdGatedDiscards(Job, kind="sd_gated_discards", queue="sd"):
    pass


@SdGatedDiscards.handler
async def sd_gated_discards(ctx: JobContext) -> None:
    await _gated()
    raise Discard("bad input")


class SdGatedSync(Job, kind="sd_gated_sync", queue="sd"):
    pass


@SdGatedSync.handler
def sd_gated_sync(ctx: JobContext) -> str:
    gate = threading.Event()
    SD_THREAD_GATES.append(gate)
    gate.wait(10)
    return "done"


def _released_as_it_ended(database_url: str, schema: str, kind: type[Job], open_gate: Callable[[Worker], None]) -> None:
    """Run one job of ``kind`` until its handler waits at its gate, then, in one step of
    the event loop (nothing else runs between), let the handler end (``open_gate``) and
    release the running jobs; wait for the run to end."""

    async def main() -> None:
        worker = Worker(database_url, kinds=[kind], schema=schema, lease=5, poll_interval=0.1, shutdown_grace=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: SD_GATES or SD_THREAD_GATES)
            open_gate(worker)
            worker.release_running()
            await until(lambda: not worker._running)

    SD_GATES.clear()
    SD_THREAD_GATES.clear()
    anyio.run(main)



def _row(database_url: str, schema: str, job_id: int) -> tuple:
    return q(database_url, jobs_sql(schema, "SELECT state, attempt, result FROM {jobs} WHERE id = %s"), (job_id,))[0]


def test_an_async_handler_that_returned_as_the_release_came_has_its_result_written(engine, database_url, schema):
    """The handler's await completed and the release came in the same loop step: anyio
    delivers no cancellation to a task whose awaited result is in, so the handler
    returned its result, and the runner, seeing the job marked releasing, gave the job
    back (available, attempt refunded): it ran again elsewhere though it had finished."""
    [job_id] = add(engine, SdGatedReturns())
    _released_as_it_ended(database_url, schema, SdGatedReturns, lambda worker: SD_GATES[0].set_result(None))
    assert _row(database_url, schema, job_id) == ("completed", 1, "done")


def test_an_async_handler_that_raised_as_the_release_came_has_its_failure_written(engine, database_url, schema):
    """As above, with a handler that discards its job: released, the job ran again."""
    [job_id] = add(engine, SdGatedDiscards())
    _released_as_it_ended(database_url, schema, SdGatedDiscards, lambda worker: SD_GATES[0].set_result(None))
    assert _row(database_url, schema, job_id)[:2] == ("dead", 1)


def test_a_sync_handler_whose_thread_returned_before_the_release_has_its_result_written(engine, database_url, schema):
    """The handler's thread returned, and the release came before the loop took its
    result: the release cancelled the wait for it, and the finished job was given back."""
    [job_id] = add(engine, SdGatedSync())

    def let_the_thread_return(worker: Worker) -> None:
        [job] = worker.running_jobs()
        SD_THREAD_GATES[0].set()
        deadline = time.monotonic() + 10
        while not (job.thread is not None and job.thread.done) and time.monotonic() < deadline:
            time.sleep(0.001)  # blocks the loop: its result waits for the loop's next step

    _released_as_it_ended(database_url, schema, SdGatedSync, let_the_thread_return)
    assert _row(database_url, schema, job_id) == ("completed", 1, "done")


def _wrapped_behind_gate(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A plain (sync) decorator around an async handler, whose wrapper waits at a gate: the
    worker runs it in a thread, which returns the handler's coroutine for the loop to run."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        gate = threading.Event()
        SD_THREAD_GATES.append(gate)
        gate.wait(10)
        return fn(*args, **kwargs)

    return wrapper


class SdWrappedLong(Job, kind="sd_wrapped_long", queue="sd"):
    pass


@SdWrappedLong.handler
@_wrapped_behind_gate
async def sd_wrapped_long(ctx: JobContext) -> str:
    await anyio.sleep(30)
    return "done"


def test_a_coroutine_a_sync_wrapper_returned_as_the_release_came_is_released(engine, database_url, schema):
    """The release passes over a sync handler whose thread has returned (its outcome is on
    its way to the loop). A plain decorator's thread returns the async handler's coroutine,
    which the runner then awaits: passed over, it ran on uncancelled, and the stop waited
    for it (30 s here), the job held all along."""
    [job_id] = add(engine, SdWrappedLong())

    def let_the_thread_return(worker: Worker) -> None:
        [job] = worker.running_jobs()
        SD_THREAD_GATES[0].set()
        deadline = time.monotonic() + 10
        while not (job.thread is not None and job.thread.done) and time.monotonic() < deadline:
            time.sleep(0.001)

    _released_as_it_ended(database_url, schema, SdWrappedLong, let_the_thread_return)
    assert _row(database_url, schema, job_id) == ("available", 0, None)


# ---- a handler the release's cancellation reached, which swallowed it ---------------------

SD_SWALLOWED: list[str] = []


class SdSwallowsReturns(Job, kind="sd_swallows_returns", queue="sd"):
    pass


@SdSwallowsReturns.handler
async def sd_swallows_returns(ctx: JobContext) -> str:
    SD_HANG_RUNS.append(1)
    try:
        await anyio.sleep(30)
    except anyio.get_cancelled_exc_class():
        SD_SWALLOWED.append("returned")
        return "partial"  # the cancellation swallowed: no error carries it out
    return "done"


class SdSwallowsRaisesLater(Job, kind="sd_swallows_raises_later", queue="sd"):
    pass


@SdSwallowsRaisesLater.handler
async def sd_swallows_raises_later(ctx: JobContext) -> None:
    SD_HANG_RUNS.append(1)
    stopped = False
    try:
        await anyio.sleep(30)
    except anyio.get_cancelled_exc_class():
        stopped = True
    if stopped:  # raised outside the except block: no CancelledError in its chain
        SD_SWALLOWED.append("raised")
        raise RuntimeError("interrupted")


def _released_while_waiting(database_url: str, schema: str, kind: type[Job]) -> None:
    async def main() -> None:
        worker = Worker(database_url, kinds=[kind], schema=schema, lease=5, poll_interval=0.1, shutdown_grace=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await until(lambda: SD_HANG_RUNS)
            await anyio.sleep(0.05)  # the handler waits in its sleep
            worker.release_running()
            await until(lambda: not worker._running)

    SD_HANG_RUNS.clear()
    SD_SWALLOWED.clear()
    anyio.run(main)


def test_a_handler_that_swallows_the_release_and_returns_is_released(engine, database_url, schema):
    """The release's cancellation reached the handler, which caught it and returned a value:
    that value is no result (the handler was stopped part way), and the job is given back,
    as on Python 3.11+. On 3.10 (no Task.cancelling()) the runner saw no sign of the
    cancellation and wrote the partial value as the job's result: completed, never run
    to its end."""
    [job_id] = add(engine, SdSwallowsReturns())
    _released_while_waiting(database_url, schema, SdSwallowsReturns)
    assert SD_SWALLOWED == ["returned"]
    assert _row(database_url, schema, job_id) == ("available", 0, None)


def test_a_handler_that_swallows_the_release_and_raises_after_is_released(engine, database_url, schema):
    """As above, with a handler that raises its own error once out of the except block (no
    CancelledError in the error's chain): on 3.10 the attempt counted as failed (retryable,
    attempt 1), not released."""
    [job_id] = add(engine, SdSwallowsRaisesLater())
    _released_while_waiting(database_url, schema, SdSwallowsRaisesLater)
    assert SD_SWALLOWED == ["raised"]
    assert _row(database_url, schema, job_id)[:2] == ("available", 0)
