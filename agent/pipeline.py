"""Pipelines: capture -> pre-process -> inference -> post-process/publish, in threads joined by bounded queues.

OpenCV and the runtimes release the GIL, so the stages overlap. Queues between
stages hold at most ``queue_size`` items and the newest wins when one is full:
under overload frames are dropped (and counted) instead of piling up, so latency
stays bounded. Sources that are not live (files replayed as fast as processed)
are never dropped from: their reader waits for room. Sensor rows are windowed in
the capture thread, before any drop.

Pre-processing has a thread of its own where there are CPUs for it (``own_preprocess_thread``); on one or two
CPUs the capture thread pre-processes each frame itself. A fast model that its source keeps busy runs in a process
of its own, given two CPUs or more (``inference_in_process``).
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.benchmark import percentiles
from agent.bundle import TimeSeriesInput
from agent.config import PipelineConfig
from agent.errors import AgentError
from agent.handoff import Handoff
from agent.offload import SLOTS, InferenceProcess
from agent.predictor import Prediction, Predictor, Prepared
from agent.processing.timeseries import Windower
from agent.sources import FrameHint, Sample, Source

log = structlog.get_logger(__name__)

# Stage queues for a source that is not live (a file read as fast as it is processed): nothing is dropped there, the
# reader waits for room, so a deeper queue costs no freshness; it lets stages hand frames over in runs, with fewer
# thread wake-ups (each one a GIL hand-off) per frame.
REPLAY_QUEUE = 8


class LatestQueue:
    """Bounded FIFO where ``put`` on a full queue evicts the oldest item (newest wins)."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        # a producer blocked on a full queue is woken once the queue has run down to this, not per item taken:
        # it then refills it while the consumer works (for maxsize 1 and 2: when empty)
        self._refill_at = (maxsize - 1) // 2
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition(threading.Lock())  # not re-entered: a plain lock is cheaper
        self._closed = False
        self.dropped = 0

    def put(self, item: Any, block: bool = False, stop: threading.Event | None = None) -> bool:
        """Add ``item``; returns True when an older item had to be dropped for it.

        With ``block`` (sources that are not live: files read as fast as processed) a full
        queue makes the caller wait instead, until there is room or ``stop`` is set.
        """
        with self._cond:
            dropped = False
            while block and len(self._items) >= self.maxsize and not self._closed and not (stop and stop.is_set()):
                self._cond.wait(0.1)
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
                dropped = True
            self._items.append(item)
            self._cond.notify()
            return dropped

    def get(self, timeout: float | None = None) -> Any | None:
        """Oldest item, or None on timeout or when closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            item = self._items.popleft() if self._items else None
            if item is not None and len(self._items) <= self._refill_at:
                self._cond.notify_all()  # wake a producer blocked on a full queue
            return item

    def close(self) -> None:
        """No more puts expected: getters drain what is left, then get None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed_and_empty(self) -> bool:
        with self._cond:
            return self._closed and not self._items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def own_preprocess_thread(setting: str, cpus: int) -> bool:
    """Pure: whether pre-processing gets a thread of its own. With fewer than 3 CPUs, inference holds one and capture
    and pre-processing would share the other anyway: one thread there saves a hand-off (a wake-up and a GIL switch)
    per frame."""
    if setting == "auto":
        return cpus >= 3
    return setting == "own"


# inference = "auto": a model whose inference takes less than this may run in a process of its own (with 2 CPUs or
# more). Per frame the agent's own Python work (capture, pre- and post-processing, publishing) costs tens of
# microseconds of GIL, which a thread-run inference waits behind: 13% of the sample classifier's 0.13 ms on an x86
# host, under 1% of a 5 ms model, where a second process (30-60 MB) no longer pays.
AUTO_PROCESS_BELOW_MS = 5.0
# ... and only when its source may keep inference busy this share of the time or more: a camera at 30 fps takes
# 0.4% of a CPU with that classifier, where GIL waits cost next to nothing; a file read as fast as it is processed
# keeps it busy all the time.
AUTO_PROCESS_BUSY = 0.2


def inference_in_process(setting: str, cpus: int, inference_ms: float | None, rate: float | None) -> bool:
    """Pure: whether a pipeline's model runs in a process of its own. ``inference_ms``: one inference of the model
    on this machine (None: not measured, e.g. the model failed to run); ``rate``: inferences a second the source
    can ask for at most (``inference_rate``)."""
    if setting != "auto":
        return setting == "process"
    if cpus < 2 or inference_ms is None or inference_ms >= AUTO_PROCESS_BELOW_MS or rate is None:
        return False
    return rate * inference_ms / 1000.0 >= AUTO_PROCESS_BUSY


def inference_rate(source_rate: float | None, max_fps: float | None, stride: int | None) -> float | None:
    """Pure: inferences a second a pipeline may run at most: its source's samples a second (``Source.nominal_rate``:
    ``math.inf`` for a file read as fast as processed, None when unknown), under the pipeline's ``max_fps`` cap, per
    window of sensor rows (``stride`` rows apart)."""
    if max_fps is not None:
        source_rate = max_fps if source_rate is None else min(source_rate, max_fps)
    if source_rate is None or stride is None:
        return source_rate
    return source_rate / stride


def pipeline_rate(config: PipelineConfig, predictor: Predictor, source_rate: float | None) -> float | None:
    """``inference_rate`` for a pipeline of ``config`` running ``predictor`` (windows of its stride)."""
    spec = predictor.input_spec
    stride = (config.window_stride or spec.stride) if isinstance(spec, TimeSeriesInput) else None
    return inference_rate(source_rate, config.max_fps, stride)


def choose_inference(setting: str, predictor: Predictor, rate: float | None) -> tuple[bool, int, float | None]:
    """Where ``predictor``'s model runs under ``setting`` here, at most ``rate`` inferences a second: (in a process,
    usable CPUs, one inference in ms: timed when auto may choose a process, else None)."""
    cpus = usable_cpus()
    # a process takes rate * ms >= AUTO_PROCESS_BUSY with ms < AUTO_PROCESS_BELOW_MS: a source slower than their
    # ratio (40 a second) never gets one, and its model is not timed (a slow model's one run is not spent at start)
    reachable = rate is not None and rate * AUTO_PROCESS_BELOW_MS / 1000.0 > AUTO_PROCESS_BUSY
    took_ms = predictor.inference_ms() if setting == "auto" and cpus >= 2 and reachable else None
    return inference_in_process(setting, cpus, took_ms, rate), cpus, took_ms


def rate_gate(last_ts: float | None, now: float, fps_cap: float | None) -> bool:
    """Pure frame-rate cap: True when a sample at ``now`` may pass given the last accepted one."""
    if fps_cap is None or last_ts is None:
        return True
    return (now - last_ts) >= 0.999 / fps_cap


def effective_cap(max_fps: float | None, factor: float, observed_fps: float) -> float | None:
    """The rate cap in force: the configured one, lowered by ``factor`` (< 1 when the board runs hot).

    Without a configured cap, throttling lowers the rate observed before it began.
    """
    if factor >= 1.0:
        return max_fps
    base = max_fps or observed_fps
    return max(base * factor, 0.1) if base else None


@dataclass
class PipelineStats:
    captured: int = 0  # samples from the source (windows for time series)
    processed: int = 0  # inferences completed
    dropped: int = 0  # evicted from a full queue (newest wins)
    skipped: int = 0  # held back by the frame-rate cap
    errors: int = 0
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=2048)
    )  # capture -> result
    infer_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2048))
    _rate_marks: collections.deque[tuple[float, int, int]] = field(default_factory=lambda: collections.deque(maxlen=64))
    _marks_lock: threading.Lock = field(default_factory=threading.Lock)  # status, telemetry and capture threads

    def __post_init__(self) -> None:
        # a mark at the start: the first call (telemetry sent on connecting) gives the rate since then, not 0
        self._rate_marks.append((time.monotonic(), self.captured, self.processed))

    def rates(self) -> tuple[float, float]:
        """(fps in, fps processed) over up to the last minute (since the start at first), from marks taken at each
        call."""
        now = time.monotonic()
        with self._marks_lock:
            self._rate_marks.append((now, self.captured, self.processed))
            old = next((m for m in self._rate_marks if now - m[0] <= 60.0 and now - m[0] > 0), None)
        if old is None:
            return 0.0, 0.0
        dt = now - old[0]
        return (self.captured - old[1]) / dt, (self.processed - old[2]) / dt

    def snapshot(self) -> dict[str, Any]:
        fps_in, fps_out = self.rates()
        return {
            "captured": self.captured,
            "processed": self.processed,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "errors": self.errors,
            "fps_in": round(fps_in, 2),
            "fps_processed": round(fps_out, 2),
            "latency_ms": percentiles(list(self.latencies_ms)),
            "inference_ms": percentiles(list(self.infer_ms)),
        }


class Pipeline:
    """One source feeding one model; results go to ``emit``."""

    def __init__(
        self,
        name: str,
        config: PipelineConfig,
        source: Source,
        predictor: Predictor,
        emit: Callable[[dict[str, Any]], None],
        rate_factor: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.name, self.config, self.source = name, config, source
        self._predictor = predictor
        self._swap_lock = threading.Lock()
        self.emit = emit
        self.rate_factor = rate_factor
        self.stats = PipelineStats()
        depth = config.queue_size if source.live else max(config.queue_size, REPLAY_QUEUE)
        self._pre_q = LatestQueue(depth)
        self._infer_q = LatestQueue(depth)
        # inference -> post-processing and publishing: lossless; bounded so a slow post stage holds inference back
        self._post_q: Handoff[tuple[Sample, Prepared, Predictor, list[Any] | str, float]] = Handoff(64)
        # results handed to the post stage and published by it: each count written by one thread (the dispatching
        # one, the post stage), so a hot swap to a worker can wait for the post stage without a lock per frame
        self._post_sent = self._post_done = 0
        self.preprocess_thread = own_preprocess_thread(config.preprocess_thread, usable_cpus())
        self._stop = threading.Event()
        self._crashed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self.busy_since: float | None = None  # an inference in flight since (monotonic)
        self.last_result_at: float | None = None
        self.first_result = threading.Event()
        self._windower = self._make_windower(predictor)
        self.failed: str | None = None
        self._free_fps = 0.0  # processed fps when throttling began
        self._throttled = False
        # Called from the post stage after each inference: (sample, prediction or None, inference ms, error).
        # The update manager watches the health of a new model through it and feeds its shadow model.
        self._watcher: Predictor | None = None  # another model fed the same frames (see watch_frames)
        self._offload: InferenceProcess | None = None  # inference = "process": the current predictor's worker
        self._offloads: list[InferenceProcess] = []  # every worker started, closed at the latest by stop()
        self._publish_lock = threading.Lock()
        self._used: InferenceProcess | None = None  # the worker frames went to last (the dispatching thread's)
        self._direct = False  # the capture thread dispatches (see start)
        self.observer: Callable[[Sample, Prediction | None, float | None, str | None], None] | None = None

    @property
    def predictor(self) -> Predictor:
        return self._predictor

    def _make_windower(self, predictor: Predictor) -> Windower | None:
        spec = predictor.input_spec
        if isinstance(spec, TimeSeriesInput):
            return Windower(spec.window, self.config.window_stride or spec.stride, len(spec.channels))
        return None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.source.want_frames(self._frame_hint())
        self._offload = self._start_offload(self._predictor)
        # a replay pre-processed in the capture thread, with inference in a process: that thread hands each frame to
        # the worker itself (nothing is dropped from a replay, so the newest-wins queue has nothing to do)
        self._direct = self._offload is not None and not self.preprocess_thread and not self.source.live
        stages = [
            (self._capture_loop, "capture"),
            (self._pre_loop, "pre"),
            (self._infer_loop, "infer"),
            (self._post_loop, "post"),
        ]
        if self._direct:
            del stages[2]
        if not self.preprocess_thread:  # the capture thread pre-processes each frame it takes
            del stages[1]
        for target, stage in stages:
            t = threading.Thread(target=self._guard(target, stage), name=f"{self.name}-{stage}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop capturing, let queued work finish (so its results are emitted), then join."""
        self._stop.set()
        self.source.close()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for offload in self._offloads:  # the inference stage closed those it used; a swapped-in one it never saw
            offload.close(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def finished(self) -> bool:
        """A finite source is exhausted and everything queued has been processed."""
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    def stalled(self, now: float | None = None) -> bool:
        """True when an inference has been running longer than ``stall_timeout`` or a stage died."""
        now = time.monotonic() if now is None else now
        busy = self.busy_since
        offload = self._offload
        if busy is None and offload is not None:
            busy = offload.busy_since
        if busy is not None and now - busy > self.config.stall_timeout:
            return True
        return self.failed is not None

    def swap_predictor(self, predictor: Predictor) -> Predictor:
        """Hot swap: the next inference uses ``predictor``; returns the old one (caller closes it). With inference
        in a process, the new model's process is started first; frames already sent to the old one finish there."""
        offload = self._start_offload(predictor) if self._threads else None
        with self._swap_lock:
            old, self._predictor = self._predictor, predictor
            self._offload = offload
            self._windower = self._make_windower(predictor)
        self.source.want_frames(self._frame_hint())
        return old

    def watch_frames(self, predictor: Predictor | None) -> None:
        """Another model fed this pipeline's frames (a shadow candidate) or None: frames suit both from now on."""
        self._watcher = predictor
        self.source.want_frames(self._frame_hint())

    def _frame_hint(self) -> FrameHint | None:
        hint = self._predictor.frame_hint
        return hint if self._watcher is None else FrameHint.merge(hint, self._watcher.frame_hint)

    def _guard(self, target: Callable[[], None], stage: str) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:  # a bug in a stage must be visible, and must not kill the daemon
                self.failed = f"{stage} stage crashed: {exc!r}"
                self._crashed.set()
                log.exception("pipeline stage crashed", pipeline=self.name, stage=stage)
            finally:
                if stage == "capture":
                    self._pre_q.close()
                    if not self.preprocess_thread:
                        self._infer_q.close()
                    if self._direct:  # the capture thread was the inference stage too
                        self._close_used()
                        self._post_q.close()
                elif stage == "pre":
                    self._infer_q.close()
                elif stage == "infer":
                    self._post_q.close()

        return run

    # ---- stages -------------------------------------------------------------------------------

    def _capture_loop(self) -> None:
        last_accepted: float | None = None
        while not self._stop.is_set():
            sample = self.source.read(timeout=0.5)
            if sample is None:
                if self.source.finished:
                    return
                continue
            if self._windower is not None:
                if sample.data.ndim != 1:
                    self.stats.errors += 1
                    continue
                if sample.gap:
                    self._windower.reset()
                try:
                    window = self._windower.push(sample.data)
                except AgentError as exc:
                    self.stats.errors += 1
                    log.warning("bad sensor row", pipeline=self.name, error=str(exc))
                    continue
                if window is None:
                    continue
                sample = Sample(window, sample.timestamp, sample.seq, sample.monotonic)
            self.stats.captured += 1
            now = time.monotonic()
            factor = self.rate_factor()
            if factor < 1.0 and not self._throttled:  # throttling begins: remember the rate it lowers
                self._free_fps = self.stats.rates()[1]
            self._throttled = factor < 1.0
            if not rate_gate(last_accepted, now, effective_cap(self.config.max_fps, factor, self._free_fps)):
                self.stats.skipped += 1
                continue
            last_accepted = now
            if not self.preprocess_thread:
                if not self._prepare(sample):  # the inference process died: the pipeline has failed (see failed)
                    self._stop.wait()
                    return
            elif self._pre_q.put(sample, block=not self.source.live, stop=self._stop):
                self.stats.dropped += 1

    def _pre_loop(self) -> None:
        while True:
            sample: Sample | None = self._pre_q.get(timeout=0.5)
            if sample is None:
                if self._pre_q.closed_and_empty:
                    return
                continue
            self._prepare(sample)

    def _prepare(self, sample: Sample) -> bool:
        """Pre-process ``sample`` and queue it for inference (in the pre-processing or the capture thread); False
        when inference can take no more (its process died)."""
        predictor = self._predictor  # read once: a hot swap may replace it meanwhile (inference then prepares again)
        try:
            prepared = predictor.prepare(sample.data)
        except AgentError as exc:
            self.stats.errors += 1
            log.warning("pre-processing failed", pipeline=self.name, error=str(exc))
            return True
        if self._direct:
            return self._dispatch(sample, prepared, predictor)
        # waits for room even while stopping (stop lets queued work finish), unless inference crashed
        if self._infer_q.put((sample, prepared, predictor), block=not self.source.live, stop=self._crashed):
            self.stats.dropped += 1
        return True

    def _start_offload(self, predictor: Predictor) -> InferenceProcess | None:
        """A worker process for ``predictor``'s model where ``inference`` asks for one (``inference_in_process``);
        None (inference in the inference thread) otherwise or when the model cannot run that way (said in the log)."""
        setting = self.config.inference
        if setting == "thread":
            return None
        if setting == "auto":
            rate = pipeline_rate(self.config, predictor, self.source.nominal_rate)
            chosen, cpus, took_ms = choose_inference(setting, predictor, rate)
            log.info(
                "inference in a process" if chosen else "inference in a thread",
                pipeline=self.name,
                model=predictor.bundle.name,
                inference_ms=None if took_ms is None else round(took_ms, 3),
                max_rate="as fast as processed" if rate == math.inf else rate,
                cpus=cpus,
            )
            if not chosen:
                return None
        try:
            offload = InferenceProcess.for_model(
                predictor.model,
                predictor.load_args,
                self._offloaded,
                name=self.name,
                # a live source keeps latency bounded: one frame running, one waiting (newer ones wait in the queue,
                # where the newest wins); a replay keeps the worker busy between the collector's naps
                slots=SLOTS if not self.source.live else 2,
            )
        except AgentError as exc:
            # asked for, it is a warning; chosen by auto, the thread is as good a place
            (log.warning if setting == "process" else log.info)(
                "inference stays in a thread", pipeline=self.name, reason=str(exc)
            )
            return None
        self._offloads = [o for o in self._offloads if not o.closed] + [offload]
        return offload

    def _infer_loop(self) -> None:
        try:
            while True:
                item = self._infer_q.get(timeout=0.5)
                if item is None:
                    if self._infer_q.closed_and_empty:
                        return
                    continue
                if not self._dispatch(*item):
                    return
        finally:
            self._close_used()

    def _dispatch(self, sample: Sample, prepared: Prepared, prepared_by: Predictor) -> bool:
        """Run one prepared frame, or send it to the inference process (in the inference thread, or for a replay in
        the capture thread); False when that process died."""
        with self._swap_lock:
            predictor, offload = self._predictor, self._offload
        if predictor is not prepared_by:  # swapped in between: prepare again for the new model
            try:
                prepared = predictor.prepare(sample.data)
            except AgentError:
                self.stats.errors += 1
                return True
        if offload is not self._used:  # a new model: what the old worker has finishes before it stops
            self._close_used()
            if offload is not None:
                self._await_post_stage()
            self._used = offload
        if offload is None:
            self._infer_one(sample, prepared, predictor)
            return True
        return self._submit(offload, sample, prepared, predictor)

    def _await_post_stage(self) -> None:
        """Before frames go to a worker (a hot swap from a model run in a thread): the results of the frames run here
        reach the sinks first, as the worker's collector publishes directly and would overtake the post stage."""
        while self._post_done < self._post_sent and not self._crashed.is_set() and not self._post_q.closed:
            time.sleep(0.001)

    def _close_used(self) -> None:
        """Let the worker frames went to last finish them (their results reach the sinks), then stop it."""
        if self._used is not None:
            self._used.close()

    def _submit(self, offload: InferenceProcess, sample: Sample, prepared: Prepared, predictor: Predictor) -> bool:
        """Send one frame to the inference process; False when the process died (the pipeline fails) or was closed
        under this thread (a stop that gave up waiting for it)."""
        ticket = (sample, prepared, predictor)
        try:
            arrays = predictor.model_inputs(prepared)
            sent = offload.submit(arrays, ticket)
            while not sent:
                if offload.failed is not None:
                    self.failed = offload.failed
                    self._crashed.set()
                    return False
                if self._crashed.is_set() or offload.closed:  # closed: stop() gave up waiting for this thread
                    return False
                sent = offload.submit(arrays, ticket)
        except AgentError as exc:
            self._offloaded(ticket, str(exc), 0.0)
        return True

    def _offloaded(self, ticket: tuple[Sample, Prepared, Predictor], raw: list[Any] | str, infer_ms: float) -> None:
        """A result of the inference process, published by its collector thread (a hand-off less per frame than
        through the post stage); serialized, as two workers deliver at once while a swapped-out model finishes."""
        sample, prepared, predictor = ticket
        with self._publish_lock:
            self._publish(sample, prepared, predictor, raw, infer_ms)

    def _infer_one(self, sample: Sample, prepared: Prepared, predictor: Predictor) -> None:
        """Inference only; post-processing and publishing happen in the post stage, beside the next inference."""
        self.busy_since = time.monotonic()
        t0 = time.perf_counter()
        try:
            raw: list[Any] | str = predictor.infer(prepared)
        except AgentError as exc:
            raw = str(exc)
        finally:
            self.busy_since = None
        item = (sample, prepared, predictor, raw, (time.perf_counter() - t0) * 1000.0)
        while not self._post_q.put(item, timeout=0.5):  # results are never dropped: wait for the post stage
            if self._post_q.closed or self._crashed.is_set():
                return
        self._post_sent += 1

    def _post_loop(self) -> None:
        lock = self._publish_lock  # an inference process's collector may publish too (a hot swap's old worker)
        while (batch := self._post_q.take_all()) is not None:
            for sample, prepared, predictor, raw, infer_ms in batch:
                with lock:
                    self._publish(sample, prepared, predictor, raw, infer_ms)
            self._post_done += len(batch)

    def _publish(
        self, sample: Sample, prepared: Prepared, predictor: Predictor, raw: list[Any] | str, infer_ms: float
    ) -> None:
        error = raw if isinstance(raw, str) else None
        if error is None:
            try:
                prediction = predictor.finish(raw, prepared)  # type: ignore[arg-type]
            except AgentError as exc:
                error = str(exc)
        if error is not None:
            self.stats.errors += 1
            log.warning("inference failed", pipeline=self.name, error=error)
            if self.observer is not None:
                self.observer(sample, None, None, error)
            return
        done = time.monotonic()
        self._seq += 1
        self.stats.processed += 1
        self.stats.infer_ms.append(infer_ms)
        self.stats.latencies_ms.append((done - sample.monotonic) * 1000.0)
        self.last_result_at = done
        record = {
            "pipeline": self.name,
            "seq": self._seq,
            "ts": round(time.time(), 3),
            "capture_ts": round(sample.timestamp, 3),
            "source_seq": sample.seq,
        } | prediction.to_dict()
        self.emit(record)
        if not self.first_result.is_set():
            self.first_result.set()
        if self.observer is not None:
            self.observer(sample, prediction, infer_ms, None)

    def snapshot(self) -> dict[str, Any]:
        bundle = self._predictor.bundle
        return {
            "model": bundle.name,
            "version": bundle.version,
            "sha256": bundle.sha256,
            "runtime": self._predictor.model.info.runtime,
            "source": self.source.name,
            "source_health": self.source.health.to_dict(),
            "queue_depth": len(self._pre_q) + len(self._infer_q) + len(self._post_q),
            "preprocess_thread": "own" if self.preprocess_thread else "capture",
            "inference": "process" if self._offload is not None else "thread",
            "stalled": self.stalled(),
            "failed": self.failed,
        } | self.stats.snapshot()
