"""The watchdog of a running job: a cancel, a time limit or a shutdown ends it within a bound,
whatever its code is blocked on.

The engine stops cooperatively: it asks whether to stop after every optimizer step, before every
validation batch and between the files of a download. A job blocked where it never asks (its
DataLoader workers stopped or deadlocked, a read on a dead network mount, a hang inside
``torch.load`` or a download) would hold the worker, its lease kept alive by the heartbeat thread,
until it unblocks by itself (celery/celery#5929: under the solo pool a task cannot be
terminated). This thread escalates instead:

1. **Cooperative stop.** A stop becomes *due* when the monitor sees a cancel request or the
   worker's shutdown, or when the job's ``max_runtime_s`` is reached. The engine has
   ``stop_timeout_s`` to take notice (ask :meth:`Watchdog.polled`); once it has, it has
   ``stop_timeout_s`` plus the minute a stopping run waits for its checkpoint upload
   (``STOP_UPLOAD_WAIT_S``) to end.
2. **Stop the attempt's processes.** Past that bound the watchdog kills (SIGKILL) every process
   the attempt started: DataLoader workers, the ranks of a multi-GPU job and their workers. A
   main loop waiting on them raises at once (torch's DataLoader notices a killed worker).
3. **Interrupt the main thread.** If the attempt has still not ended ``escalate_after_s`` later,
   a signal raises :class:`JobHung` in the main thread (a socket read or a sleep is interrupted).
4. **Leave.** If even that does not return (a thread stuck in uninterruptible C code), the
   watchdog records the outcome itself, fenced by the attempt, and exits the worker process: a
   supervisor (the local stack, systemd, Kubernetes) starts a fresh one, and the job's message,
   redelivered, finds the job final and is skipped.

The outcome says the job hung: a cancel ends ``cancelled``, a time limit ``failed``, a shutdown
goes back to the queue, each with a reason naming the phase it hung in and for how long.

Liveness is progress, not a heartbeat: the engine's polls (one per step, validation batch, file
or page) and its progress reports with a new step, phase, file or byte count. A job that shows
no progress for ``stall_timeout_s`` (with no stop due) is stopped the same way and requeued
(``MAX_ATTEMPTS`` bound the retries): its worker's heartbeat alone keeps no stuck job alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil

from shared.records import Progress
from worker.training.contract import StopReason
from worker.training.loop import STOP_UPLOAD_WAIT_S

logger = logging.getLogger(__name__)

#: The signal that raises :class:`JobHung` in the main thread (Celery uses SIGUSR1 for tracebacks).
INTERRUPT_SIGNAL = signal.SIGUSR2
#: A poll within this many seconds after the watchdog's own time-limit deadline may not yet see
#: the limit (the engine's clock reads a hair later); it does not count as taking notice.
_CLOCK_MARGIN_S = 1.0
#: What makes a job stop when no one asked: no progress for ``stall_timeout_s``.
STALLED = "stalled"


class JobHung(BaseException):
    """The attempt did not stop when it should and the watchdog ended it; ``hang`` says how.

    Raised in the main thread by the watchdog's signal, and by :meth:`Watchdog.guard` in place of
    whatever the attempt raised once its processes were killed. A BaseException (as
    KeyboardInterrupt), so that no ``except Exception`` on the way up (an unreadable checkpoint
    skipped, a best-effort upload) swallows it.
    """

    def __init__(self, hang: Hang | None = None) -> None:
        super().__init__(hang.describe() if hang else "interrupted by the watchdog")
        self.hang = hang


@dataclass(frozen=True)
class Hang:
    """Why the watchdog stopped an attempt: ``cause`` (a StopReason or :data:`STALLED`),
    ``phase`` it was in, and ``stuck_s`` seconds without progress when it acted."""

    cause: StopReason | str
    phase: str
    stuck_s: float

    def describe(self) -> str:
        """``"the job hung in training (no progress for 31 s); its processes were stopped"``."""
        return f"the job hung in {self.phase} (no progress for {self.stuck_s:.0f} s); its processes were stopped"


class Watchdog(threading.Thread):
    """Ends an attempt that does not stop when it should; see the module's docstring.

    Args:
        job_id: for logs.
        stop_requested: the monitor's answer (cancel, shutdown, lost lease), cheap, no I/O.
        max_runtime_s: the job's time limit (all attempts); the engine's progress reports carry
            the run time so far, earlier attempts included.
        stop_timeout_s: seconds a due stop may go unnoticed, and the bound on a stop beyond the
            checkpoint upload's wait.
        stall_timeout_s: seconds without progress after which a job counts as hung (0: never).
        on_abandon: called from this thread, as the last resort, with the hang before the worker
            process exits: records the job's outcome (it must fence by attempt).
        escalate_after_s: seconds between escalation steps 2, 3 and 4.
    """

    def __init__(
        self,
        job_id: str,
        stop_requested: Callable[[], StopReason | None],
        *,
        max_runtime_s: float,
        stop_timeout_s: float,
        stall_timeout_s: float,
        on_abandon: Callable[[Hang], None],
        escalate_after_s: float = 10.0,
        check_interval_s: float = 0.5,
    ) -> None:
        super().__init__(name=f"trainq-watchdog-{job_id[:8]}", daemon=True)
        self.job_id, self.stop_requested = job_id, stop_requested
        self.stop_timeout_s, self.stall_timeout_s = stop_timeout_s, stall_timeout_s
        self.on_abandon, self.escalate_after_s, self.check_interval_s = on_abandon, escalate_after_s, check_interval_s
        self.hang: Hang | None = None
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._main_thread = threading.main_thread().ident
        now = time.monotonic()
        self._deadline = now + max_runtime_s  # refined by each progress report's runtime_s
        self._max_runtime_s = max_runtime_s
        self._last_progress = now
        self._last_poll = now
        self._marker: tuple | None = None
        self._phase = "preparation"
        self._due_since: float | None = None
        self._due_cause: StopReason | None = None
        self._baseline = _descendants()

    # -- what the engine's callbacks tell it -------------------------------------------------

    def polled(self) -> None:
        """The engine asked whether to stop: it finished a unit of work (a step, a batch, a file)."""
        with self._lock:
            self._last_poll = self._last_progress = time.monotonic()

    def progressed(self, progress: Progress) -> None:
        """A progress report: new steps, phase, files or bytes count as progress."""
        now = time.monotonic()
        marker = (progress.epoch, progress.step, progress.phase, progress.files_done, progress.bytes_done)
        with self._lock:
            if progress.phase is not None:
                self._phase = str(getattr(progress.phase, "value", progress.phase))
            if progress.runtime_s is not None:
                self._deadline = now + self._max_runtime_s - progress.runtime_s
            if marker != self._marker:
                self._marker, self._last_progress = marker, now

    # -- the thread ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Watch the attempt run inside (from the main thread): start the thread, let it interrupt
        the main thread, and turn whatever the attempt raises once it was found hung (a DataLoader's
        "worker exited unexpectedly", the interrupt itself) into :class:`JobHung`."""
        self.start()
        with interruptible():
            try:
                yield
            except (Exception, JobHung) as exc:
                if self.hang is not None:
                    raise JobHung(self.hang) from exc
                raise
            finally:
                self.end()  # before the handler goes: no interrupt may arrive after it
            if self.hang is not None:  # it returned once its processes were killed: not a result to trust
                raise JobHung(self.hang)

    def end(self) -> None:
        """The attempt ended (in the main thread): stand down."""
        self._ended.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        while not self._ended.wait(self.check_interval_s):
            hang = self._overdue(time.monotonic())
            if hang is not None:
                self._escalate(hang)
                return

    def _overdue(self, now: float) -> Hang | None:
        """The hang to act on now, if the attempt is past its bound."""
        with self._lock:
            if self._due_since is None:
                reason = self.stop_requested()
                if reason is None and now >= self._deadline:
                    reason = StopReason.TIME_LIMIT
                if reason is StopReason.LEASE_LOST:
                    reason = None  # another worker owns the job: nothing of ours to record
                if reason is not None:
                    self._due_since, self._due_cause = now, reason
            stuck_s = now - self._last_progress
            if self._due_since is not None:
                margin = _CLOCK_MARGIN_S if self._due_cause is StopReason.TIME_LIMIT else 0.0
                noticed = self._last_poll > self._due_since + margin
                bound = self.stop_timeout_s + (STOP_UPLOAD_WAIT_S if noticed else 0.0)
                if now - self._due_since >= bound:
                    return Hang(self._due_cause, self._phase, stuck_s)
                return None
            if self.stall_timeout_s and stuck_s >= self.stall_timeout_s:
                return Hang(STALLED, self._phase, stuck_s)
            return None

    def _escalate(self, hang: Hang) -> None:
        self.hang = hang
        cause = getattr(hang.cause, "value", hang.cause)
        logger.error("job %s: %s due, but no progress in %s for %.0f s: killing the attempt's processes", self.job_id, cause,
                     hang.phase, hang.stuck_s)
        killed = self.kill_processes()
        if self._ended.wait(self.escalate_after_s):
            return
        logger.error("job %s: still running %.0f s after its %d process(es) were killed; interrupting it", self.job_id,
                     self.escalate_after_s, killed)
        with contextlib.suppress(OSError, ValueError):
            if signal.getsignal(INTERRUPT_SIGNAL) is _raise_job_hung:
                signal.pthread_kill(self._main_thread, INTERRUPT_SIGNAL)
        if self._ended.wait(self.escalate_after_s):
            return
        logger.critical("job %s: cannot be interrupted; recording its outcome and exiting the worker", self.job_id)
        try:
            self.on_abandon(hang)
        finally:
            logging.shutdown()
            os._exit(70)  # EX_SOFTWARE: the supervisor starts a fresh worker

    def kill_processes(self) -> int:
        """SIGKILL every process this attempt started (not those alive when it began); return how many."""
        victims = [p for p in psutil.Process().children(recursive=True) if p.pid not in self._baseline]
        for process in victims:
            with contextlib.suppress(psutil.Error):
                process.kill()  # a SIGSTOPped process dies too
        psutil.wait_procs(victims, timeout=5)
        logger.error("job %s: killed %d process(es): %s", self.job_id, len(victims), [p.pid for p in victims])
        return len(victims)


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _raise_job_hung(signum: int, frame: object) -> None:
    raise JobHung()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Let the watchdog interrupt the main thread for the duration (step 3); a no-op off the main
    thread, where signal handlers cannot be set (the watchdog then goes from step 2 to step 4)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(INTERRUPT_SIGNAL, _raise_job_hung)
    try:
        yield
    finally:
        signal.signal(INTERRUPT_SIGNAL, previous)
