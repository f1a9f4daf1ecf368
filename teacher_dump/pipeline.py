"""The shard writer beside the engine: teacher-dump's own per-token work off the engine's loop.

The engine's loop (teacher_dump.run.write_results) hands each prompt's rows, as the mode made
them, to a writer through a bounded queue and goes back to the engine at once. The writer does
the rest in arrival order, exactly as the loop would: stage 1 of teacher_dump.encoding (the
rows' entries), the shard-level coding, Parquet, the manifest and the filter's outcomes, with
the same ShardWriter, so the shards are the same bytes. --writer says where it runs:

- thread (default): beside the loop in this process, sharing its GIL (pyarrow's Parquet
  writing and zstd release it; numpy on these small arrays mostly does not);
- process: a process of its own, forked from a server started once per dump process, so its
  numpy and Python hold no lock the engine's loop needs (and encoding_processes more);
- inline: on the loop itself.

What the pipeline keeps of the writer's guarantees (docs/reliability.md):
- a crash anywhere loses at most the rows not yet in a complete shard: shards are still
  written atomically and the manifest lists only complete ones, so a rerun resumes;
- the queue holds at most `queue_prompts` prompts: when the writer is behind, the loop (and so
  the engine) waits, and memory stays bounded;
- an error in the writer fails the dump with that error, re-raised on the loop at its next
  hand-over; the loop never waits for the writer except in short polls that check it is alive,
  so a dead writer cannot hang it;
- the writer never outlives the dump: a writer process is killed by the kernel as soon as the
  dump's process dies, even by kill -9, so it cannot write beside a rerun.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import traceback
from dataclasses import dataclass

from kd_shards.schemas.shard import Storage
from kd_shards.shared.errors import one_line
from kd_shards.shared.storage import Folder
from kd_shards.teacher_dump.rows import ShardRow, encoded_row
from kd_shards.teacher_dump.shards import ShardWriter, refresh_manifest, update_manifest

QUEUE_PROMPTS = 64
"""Prompts the queue to the writer holds at most (the engine's loop waits beyond)."""

POLL_SECONDS = 0.2
"""How often a waiting side checks that the other is still there."""

STOP_SECONDS = 30.0
"""How long an aborted dump waits for its writer process to stop before killing it (a shard
being written finishes or is left as a temporary, which the next run removes)."""


@dataclass(frozen=True)
class WriterSpec:
    """What the writer needs to write this rank's shards (picklable: it crosses to a process)."""

    out: str
    """The dump's directory (local path or object-storage URL)."""
    rank: int
    world_size: int
    rows_per_shard: int
    storage: Storage | None
    """How the rows' distributions are coded (None: classify rows, schema v1)."""
    vocabulary: int
    filtering: bool
    """Whether the dump has a completion filter whose outcomes go into the manifest."""


Outcomes = dict[str, list[int]]
"""The filter's prompts by outcome (none_kept, best_kept), as teacher_dump.run.filtered_rows
collects them."""


class PromptWriter:
    """Each prompt's rows into this rank's shards, the filter's outcomes recorded in step with
    them (the writer side, wherever it runs)."""

    def __init__(self, spec: WriterSpec):
        self.folder = Folder(spec.out)
        self.shards = ShardWriter(
            self.folder,
            spec.rank,
            spec.world_size,
            spec.rows_per_shard,
            spec.storage,
            spec.vocabulary,
        )
        self.filtering = spec.filtering
        self.outcomes: Outcomes = {"none_kept": [], "best_kept": []}

    def add(self, rows: list[ShardRow], judged: Outcomes | None) -> None:
        """One prompt's rows and, in a filtered dump, its outcome (`judged`)."""
        for key, indices in (judged or {}).items():
            self.outcomes[key].extend(indices)
        sequence = self.shards.sequence
        self.shards.add_prompt_rows(rows)
        if self.filtering and self.shards.sequence != sequence:
            # A shard was written: record the outcomes of the prompts judged before it.
            self.outcomes = record_outcomes(self.folder, self.outcomes)

    def finish(self) -> None:
        """Write the last shard and the outcomes not yet recorded."""
        self.shards.flush()
        if self.filtering:
            record_outcomes(self.folder, self.outcomes)


def record_outcomes(directory: Folder, outcomes: Outcomes) -> Outcomes:
    """Add the prompts of `outcomes` to the manifest's filter lists and refresh its counts
    (every prompt before them is in a written shard); returns empty outcomes."""

    def add(manifest: dict) -> None:
        for key, indices in outcomes.items():
            manifest["filter"][key] = sorted(set(manifest["filter"][key]) | set(indices))

    update_manifest(directory, add)
    refresh_manifest(directory, [])
    return {key: [] for key in outcomes}


class InlineWriter:
    """--writer inline: the writer's work on the engine's loop."""

    def __init__(self, spec: WriterSpec):
        self.writer = PromptWriter(spec)

    def put(self, rows: list[ShardRow], judged: Outcomes | None) -> None:
        self.writer.add(rows, judged)

    def finish(self) -> None:
        self.writer.finish()

    def close(self) -> None:
        """Nothing runs beside the loop."""


class QueuedWriter:
    """--writer process or thread: a PromptWriter served beside the engine's loop through a
    bounded queue. put() returns once the prompt is queued; finish() once every shard is
    written; close() stops a writer that has not finished (the dump failed) without writing
    what is still queued, as the loop would not have written it either."""

    def __init__(
        self,
        spec: WriterSpec,
        place: str,
        queue_prompts: int = QUEUE_PROMPTS,
        encoders: int = 0,
    ):
        """`encoders` (process only): processes that encode the rows (stage 1 of
        teacher_dump.encoding, the bulk of the adaptive store's work) in front of the writer,
        prompt i by encoder i mod N, the writer taking them back in turn (so in order); 0: the
        writer encodes them itself."""
        self.place = place
        self.finished = self.ending = self.done = False
        self.handed = 0
        if place == "process":
            context = writer_context()
            self.replies = context.Queue()
            self.stop = context.Event()
            parent = os.getpid()
            self.inboxes = [context.Queue(queue_prompts) for _ in range(max(encoders, 1))]
            # Kept on self: a queue's semaphores go when its last reference here does, and a
            # child may not have opened them yet.
            self.outboxes = encoded = [context.Queue(queue_prompts) for _ in range(encoders)]
            self.workers = [
                context.Process(
                    target=serve_encoder,
                    args=(spec, inbox, outbox, self.replies, self.stop, parent),
                    name=f"shard-encoder-{index}",
                    daemon=True,
                )
                for index, (inbox, outbox) in enumerate(zip(self.inboxes, encoded, strict=False))
            ]
            self.workers.append(
                context.Process(
                    target=serve,
                    args=(spec, encoded or self.inboxes, self.replies, self.stop, parent),
                    name="shard-writer",
                    daemon=True,
                )
            )
        else:
            self.inboxes = [queue.Queue(queue_prompts)]
            self.replies = queue.Queue()
            self.stop = threading.Event()
            self.workers = [
                threading.Thread(
                    target=serve,
                    args=(spec, self.inboxes, self.replies, self.stop, None),
                    name="shard-writer",
                    daemon=True,
                )
            ]
        for worker in self.workers:
            worker.start()

    @property
    def items(self):
        """The queue of the first (or only) worker."""
        return self.inboxes[0]

    @property
    def worker(self):
        """The process (or thread) that writes the shards."""
        return self.workers[-1]

    def put(self, rows: list[ShardRow], judged: Outcomes | None) -> None:
        self.hand_over((rows, judged))

    def finish(self) -> None:
        self.ending = True
        for _ in self.inboxes:  # every encoder (or the writer) learns that the dump ends
            self.hand_over(None)
        while not self.done:
            try:
                kind, error = self.replies.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self.check_alive()
                continue
            self.settle(kind, error)
        for worker in self.workers:
            worker.join()

    def settle(self, kind: str, error: BaseException | None) -> None:
        """The writer's one reply: done, or its error raised here."""
        self.finished = True
        if kind == "failed":
            self.close_workers()
            raise error
        self.done = True

    def close(self) -> None:
        if not self.finished:
            self.close_workers()

    def close_workers(self) -> None:
        """Stop every worker (a process still busy after STOP_SECONDS is killed)."""
        self.stop.set()
        for worker in self.workers:
            worker.join(STOP_SECONDS)
            if self.place == "process" and worker.is_alive():
                worker.kill()
                worker.join()

    def hand_over(self, item) -> None:
        """Queue `item` to the next worker in turn; while its queue is full, wait in polls that
        check the workers live."""
        self.check_alive()
        inbox = self.inboxes[self.handed % len(self.inboxes)]
        self.handed += 1
        while True:
            try:
                inbox.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                self.check_alive()

    def check_alive(self) -> None:
        """Raise the workers' error if one has stopped (an encoder ends once it has passed the
        dump's end on: that is no error)."""
        stopped = [worker for worker in self.workers if not worker.is_alive()]
        if not stopped:
            return
        if (
            self.ending
            and self.worker not in stopped
            and all(getattr(worker, "exitcode", 0) == 0 for worker in stopped)
        ):
            return
        try:
            kind, error = self.replies.get(timeout=POLL_SECONDS)
        except queue.Empty:
            codes = [getattr(worker, "exitcode", None) for worker in self.workers]
            self.close_workers()
            self.finished = True
            raise RuntimeError(
                f"teacher-dump's shard writer stopped without a word (exit codes {codes}): "
                "rerun the same command (it resumes)"
            ) from None
        self.settle(kind, error)


def writer_context():
    """Writer processes are forked from a server process started once (on first use) that has
    loaded this module: a fork of the dump's own process could inherit the engine's threads
    mid-lock, and a fresh spawn would re-import numpy and pyarrow for every dump."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def serve(spec: WriterSpec, inboxes: list, replies, stop, parent: int | None) -> None:
    """The writer's life: prompts from `inboxes` (taken in turn) into shards until None (then
    one ("done", None) on `replies`), or until `stop` is set or the dump's process `parent` is
    gone (then nothing); an error is one ("failed", error) on `replies`. `parent` None: a
    thread."""
    if parent is not None:
        die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the loop's to handle
    try:
        writer = PromptWriter(spec)
        for index in itertools.count():
            item = next_item(inboxes[index % len(inboxes)], stop, parent)
            if item is STOPPED:
                return
            if item is None:
                writer.finish()
                replies.put(("done", None))
                return
            writer.add(*item)
    except BaseException as error:
        report_failure(error, replies, parent)


def serve_encoder(spec: WriterSpec, inbox, outbox, replies, stop, parent: int) -> None:
    """An encoder's life: each prompt of `inbox` with its rows encoded (stage 1 of
    teacher_dump.encoding) onto `outbox`, then the closing None; stops as serve() does."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            item = next_item(inbox, stop, parent)
            if item is STOPPED:
                return
            if item is not None:
                rows, judged = item
                item = ([encoded_row(row, spec.storage, spec.vocabulary) for row in rows], judged)
            while True:
                try:
                    outbox.put(item, timeout=POLL_SECONDS)
                    break
                except queue.Full:
                    if stop.is_set() or not alive(parent):
                        return
            if item is None:
                return
    except BaseException as error:
        report_failure(error, replies, parent)


STOPPED = object()
"""next_item's answer when the worker is to stop without finishing."""


def next_item(inbox, stop, parent: int | None):
    """The next item of `inbox`, or STOPPED once `stop` is set or `parent` is gone."""
    while True:
        try:
            item = inbox.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if stop.is_set() or (parent is not None and not alive(parent)):
                return STOPPED
            continue
        return STOPPED if stop.is_set() else item


def report_failure(error: BaseException, replies, parent: int | None) -> None:
    """One ("failed", error) on `replies` (a process: not for SystemExit and the like)."""
    if parent is not None and not isinstance(error, Exception):
        return
    replies.put(("failed", transferable(error) if parent is not None else error))


def transferable(error: BaseException) -> BaseException:
    """`error` rebuilt from plain values so it crosses back to the dump's process whatever its
    type holds: a UserError keeps its one line, an OSError its errno and file (a full disk
    reads as one), anything else becomes a RuntimeError with its type and message; bugs print
    their traceback here (the writer's stderr is the dump's)."""
    from kd_shards.shared.errors import UserError

    if isinstance(error, UserError):
        return UserError(str(error))
    traceback.print_exc(file=sys.stderr)
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or one_line(error), error.filename)
    if type(error).__module__ == "builtins":  # ValueError, KeyError, ...: same type, its line
        return type(error)(one_line(error))
    return RuntimeError(f"the shard writer failed: {type(error).__name__}: {one_line(error)}")


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server, which ends with the
    dump's process) ends; elsewhere the poll in serve() notices within POLL_SECONDS."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    set_death_signal = 1  # PR_SET_PDEATHSIG
    ctypes.CDLL(None, use_errno=True).prctl(set_death_signal, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_writer(spec: WriterSpec, place: str, encoders: int = 0) -> InlineWriter | QueuedWriter:
    """The writer of --writer `place` (with `encoders` encoding processes) for `spec`. An
    object-storage dump writes from a thread where a process is asked for: some fsspec stores
    (the in-memory one) live in this process only, and its uploads wait on the network, not
    the GIL."""
    if place == "inline":
        return InlineWriter(spec)
    if place == "process" and not Folder(spec.out).is_local:
        place = "thread"
    return QueuedWriter(spec, place, encoders=encoders if place == "process" else 0)
