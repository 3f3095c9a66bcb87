"""Inference in a child process: ``[pipelines.NAME] inference = "process"``.

In one process every thread shares the GIL: at thousands of inferences per second the
inference thread, back from the runtime, often waits for it behind capture,
post-processing or publishing (and, on a VM or a small board, for the wake-up after
that). A child process has a GIL of its own and runs only the model. Model inputs go in
and raw outputs come back through a ring of slots in shared memory (an anonymous memfd
both processes map), in order; a pipe each way carries one byte per slot, ready and
done. While frames keep coming neither side waits for the other: the worker finds the
next ready bytes already there, and the collector here naps between batches of results
instead of waiting on each one. The worker ends when the agent closes its end of the
ready pipe, or dies with it.

Models whose outputs change shape from one run to the next (some detectors) cannot use
fixed slots: ``InferenceProcess`` refuses them at start, and they stay in a thread.
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.runtime import Model

log = structlog.get_logger(__name__)

SLOTS = 16  # frames in flight to the worker: enough to keep it busy between the collector's naps
NAP = 0.001  # the collector's pause between batches while results keep coming
_HEADER = 256  # per slot: failed (int32), error length (int32), inference ms (float64), error text
_ERROR_AT, _ERROR_MAX = 16, _HEADER - 16
_ALIGN = 64
_SAY_EVERY = 4  # the worker announces done slots in fours while more are ready (one write each time)

Slot = tuple[int, tuple[int, ...], str]  # offset in the slot, shape, dtype string


@dataclass(frozen=True)
class SlotLayout:
    """Where each input and output lives inside one slot (offsets from the slot's start)."""

    inputs: tuple[Slot, ...]
    outputs: tuple[Slot, ...]
    size: int

    @classmethod
    def for_shapes(
        cls, inputs: list[tuple[tuple[int, ...], np.dtype]], outputs: list[tuple[tuple[int, ...], np.dtype]]
    ) -> SlotLayout:
        offset = _HEADER
        placed: tuple[list[Slot], list[Slot]] = ([], [])
        for group, specs in zip(placed, (inputs, outputs), strict=True):
            for shape, dtype in specs:
                group.append((offset, tuple(int(d) for d in shape), np.dtype(dtype).str))
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                offset += -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        return cls(tuple(placed[0]), tuple(placed[1]), offset)

    def to_json(self) -> list[Any]:
        return [[list(s) for s in self.inputs], [list(s) for s in self.outputs], self.size]

    @classmethod
    def from_json(cls, data: list[Any]) -> SlotLayout:
        inputs, outputs = ((tuple((int(o), tuple(shape), str(dt)) for o, shape, dt in group)) for group in data[:2])
        return cls(inputs, outputs, int(data[2]))  # type: ignore[arg-type]

    def views(self, buf: Any, slot: int) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
        """(where the slot starts, its input arrays, its output arrays), the arrays as views of the shared buffer."""
        base = slot * self.size
        ins = [np.ndarray(shape, np.dtype(dt), buf, base + off) for off, shape, dt in self.inputs]
        outs = [np.ndarray(shape, np.dtype(dt), buf, base + off) for off, shape, dt in self.outputs]
        return base, ins, outs


_STATUS = struct.Struct("=iid")  # failed, error length, inference ms


def write_status(buffer: Any, slot_start: int, error: str | None, infer_ms: float) -> None:
    """A slot's outcome: inference time and, for a failed run, the error (truncated to fit)."""
    if error is None:
        _STATUS.pack_into(buffer, slot_start, 0, 0, infer_ms)
        return
    text = error.encode("utf-8", "replace")[:_ERROR_MAX]
    _STATUS.pack_into(buffer, slot_start, 1, len(text), infer_ms)
    buffer[slot_start + _ERROR_AT : slot_start + _ERROR_AT + len(text)] = text


def read_status(buffer: Any, slot_start: int) -> tuple[str | None, float]:
    """(error or None, inference ms) of a slot."""
    failed, length, infer_ms = _STATUS.unpack_from(buffer, slot_start)
    if not failed:
        return None, infer_ms
    start = slot_start + _ERROR_AT
    return bytes(buffer[start : start + length]).decode("utf-8", "replace"), infer_ms


def _worker_env() -> dict[str, str]:
    """The agent's environment, with this copy of the ``agent`` package importable by the worker."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _shared_buffer(size: int) -> tuple[int, mmap.mmap]:
    """A file descriptor for ``size`` bytes of memory the worker maps too, and the mapping here."""
    try:
        fd = os.memfd_create("edge-agent-inference", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, or an old kernel: an unlinked temporary file does the same
        handle, name = tempfile.mkstemp(prefix="edge-agent-inference-")
        os.unlink(name)
        fd = handle
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        raise


class InferenceProcess:
    """One model run by a child process. ``submit`` queues model inputs (from one thread, in order); the
    collector thread calls ``on_result(ticket, raw outputs or error text, inference ms)`` for each, in order."""

    def __init__(
        self,
        model_path: str,
        load_args: dict[str, Any],
        inputs: list[tuple[tuple[int, ...], np.dtype]],
        outputs: list[tuple[tuple[int, ...], np.dtype]],
        on_result: Callable[[Any, list[np.ndarray] | str, float], None],
        name: str = "inference",
        slots: int = SLOTS,
        start_timeout: float = 120.0,
    ) -> None:
        self.layout = SlotLayout.for_shapes(inputs, outputs)
        self.slots, self.name, self._on_result = slots, name, on_result
        self.failed: str | None = None
        self._pending: collections.deque[tuple[Any, float]] = collections.deque()
        self._free = slots  # slots not in the worker nor waiting to be collected
        self._room = threading.Condition(threading.Lock())  # submit waits on it for free slots
        self._room_wanted = False
        self._next = 0
        self._closing = False
        try:
            memory_fd, self._buffer = _shared_buffer(self.layout.size * slots)
        except OSError as exc:
            raise AgentError(
                f"cannot allocate shared memory for the inference process: {exc.strerror}",
                "free memory or use inference = 'thread'",
            ) from None
        self._views = [self.layout.views(self._buffer, k) for k in range(slots)]
        ready_r, self._ready_w = os.pipe()
        self._done_r, done_w = os.pipe()
        spec = {
            "path": model_path,
            "load_args": load_args,
            "layout": self.layout.to_json(),
            "slots": slots,
            "memory_fd": memory_fd,
        }
        try:
            self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "agent.offload", json.dumps(spec), str(ready_r), str(done_w)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                pass_fds=(ready_r, done_w, memory_fd),
                env=_worker_env(),
            )
            error = self._await_start(start_timeout)
        except OSError as exc:
            self._process = None
            error = f"cannot run {sys.executable}: {exc.strerror}"
        finally:
            for fd in (ready_r, done_w, memory_fd):
                os.close(fd)
        if error is not None:
            os.close(self._ready_w)
            self._stop_process()
            self._release()
            raise AgentError(f"inference process did not start: {error}", "run the model with inference = 'thread'")
        os.set_blocking(self._done_r, False)
        self._collector = threading.Thread(target=self._collect, name=f"{name}-collect", daemon=True)
        self._collector.start()

    def _await_start(self, timeout: float) -> str | None:
        """None once the worker said it loaded the model, else why it did not."""
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else b""
        stdout.close()
        if not readable:
            return f"no answer in {timeout:.0f} s"
        try:
            answer = json.loads(line)
        except ValueError:
            code = self._process.wait(5.0) if self._process.poll() is None else self._process.returncode
            return f"it exited with code {code}"
        return None if "ok" in answer else str(answer.get("error"))

    @classmethod
    def for_model(
        cls,
        model: Model,
        load_args: dict[str, Any],
        on_result: Callable[[Any, list[np.ndarray] | str, float], None],
        **kwargs: Any,
    ) -> InferenceProcess:
        """A worker for a model loaded here: the same file loaded with ``load_args`` (``Predictor.load_args``), slots
        sized for its inputs and outputs (dynamic dims as ``concrete_shape`` fills them)."""
        return cls(
            str(model.info.path),
            load_args,
            [(t.concrete_shape(), t.dtype) for t in model.inputs],
            [(t.concrete_shape(), t.dtype) for t in model.outputs],
            on_result,
            **kwargs,
        )

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def busy_since(self) -> float | None:
        """When the oldest frame still in the worker was submitted (monotonic), None when none is."""
        try:
            return self._pending[0][1]
        except IndexError:
            return None

    def submit(self, arrays: list[np.ndarray], ticket: Any, timeout: float = 0.5) -> bool:
        """Queue one inference; False when no slot came free within ``timeout`` or the worker is gone (see
        ``failed``). Raises ``AgentError`` for arrays that do not fit the model's inputs."""
        if self.failed is not None or self._closing:
            return False
        slot = self._next
        _, views, _ = self._views[slot]
        if len(arrays) != len(views) or any(
            a.shape != v.shape or a.dtype != v.dtype for a, v in zip(arrays, views, strict=False)
        ):
            raise AgentError(
                f"model input {[list(a.shape) for a in arrays]} does not fit {[list(v.shape) for v in views]}",
                "run this model with inference = 'thread'",
            )
        if not self._free and not self._wait_for_room(timeout):
            return False
        for view, array in zip(views, arrays, strict=True):
            view[...] = array
        with self._room:
            if self._closing:  # closed meanwhile (from another thread): the pipe is gone
                return False
            self._free -= 1
            self._pending.append((ticket, time.monotonic()))
            self._next = (slot + 1) % self.slots
            with contextlib.suppress(OSError):  # the worker is gone: the collector reports it, this frame too
                os.write(self._ready_w, b"\x00")
        return True

    def _wait_for_room(self, timeout: float) -> bool:
        """Wait for a free slot (the collector frees them in batches: one wake-up per batch), or a failed worker."""
        with self._room:
            self._room_wanted = True
            try:
                self._room.wait_for(lambda: self._free or self.failed is not None, timeout)
            finally:
                self._room_wanted = False
            return bool(self._free) and self.failed is None

    def _freed(self, count: int) -> None:
        with self._room:
            self._free += count
            if self._room_wanted:
                self._room.notify()

    def _collect(self) -> None:
        slot, flowing, done = 0, False, self._done_r
        while True:
            try:
                signals = os.read(done, 4096)
            except BlockingIOError:
                if flowing:  # results keep coming: nap rather than have the worker wake us for each one
                    flowing = False
                    time.sleep(NAP)
                elif not select.select([done], [], [], 0.25)[0] and self._closing and not self._pending:
                    return
                continue
            if not signals:  # every write end closed: the worker exited
                if not (self._closing and not self._pending):
                    self._worker_died()
                return
            flowing = True
            for _ in signals:
                start, _, outs = self._views[slot]
                error, infer_ms = read_status(self._buffer, start)
                raw: list[np.ndarray] | str = error if error is not None else [o.copy() for o in outs]
                ticket, _ = self._pending.popleft()
                slot = (slot + 1) % self.slots
                self._freed(1)
                self._on_result(ticket, raw, infer_ms)

    def _worker_died(self) -> None:
        process = self._process
        code = process.wait(5.0) if process is not None else None
        self.failed = f"inference process exited with code {code}"
        log.error("inference process died", pipeline=self.name, exit_code=code, lost=len(self._pending))
        while self._pending:
            ticket, _ = self._pending.popleft()
            self._on_result(ticket, self.failed, 0.0)
        self._freed(0)  # a submit waiting for a slot returns and sees ``failed``

    def close(self, timeout: float = 10.0) -> None:
        """Finish what was submitted (its results still reach ``on_result``), then stop the worker."""
        with self._room:
            if self._closing:
                return
            self._closing = True
        deadline = time.monotonic() + timeout
        while self._pending and self.failed is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.close(self._ready_w)  # the worker's signal to end, once it has run what it was sent
        self._stop_process(max(0.5, deadline - time.monotonic()))
        self._collector.join(5.0)
        self._release()

    @property
    def closed(self) -> bool:
        return self._closing

    def _stop_process(self, grace: float = 5.0) -> None:
        """Wait ``grace`` seconds for the worker to end (it ignores SIGTERM, which systemd or a terminal may send
        the whole process group: the agent stops it in order), then kill it."""
        process = self._process
        if process is None:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _release(self) -> None:
        if not self._collector_running():
            self._views = []
            with contextlib.suppress(OSError):
                os.close(self._done_r)
            with contextlib.suppress(BufferError):  # a view is still referenced somewhere: freed with it
                self._buffer.close()

    def _collector_running(self) -> bool:
        collector = getattr(self, "_collector", None)
        return collector is not None and collector.is_alive()


def _serve(spec: dict[str, Any], ready: int, done: int, answer: Any) -> int:
    """The worker: load the model, say so on ``answer``, then run slot after slot as the parent signals them (one byte
    each on ``ready``), answering one byte each on ``done``; ends when the parent closes ``ready``."""
    from agent.runtime import load_model

    layout, slots = SlotLayout.from_json(spec["layout"]), int(spec["slots"])
    try:
        model = load_model(spec["path"], **spec["load_args"])
        buffer = mmap.mmap(int(spec["memory_fd"]), layout.size * slots)
        views = [layout.views(buffer, k) for k in range(slots)]
        produced = model.run_raw([np.zeros(a.shape, a.dtype) for a in views[0][1]])
        if [(o.shape, o.dtype) for o in produced] != [(o.shape, o.dtype) for o in views[0][2]]:
            raise AgentError("the model's outputs do not keep one shape and dtype", "run it with inference = 'thread'")
    except Exception as exc:  # reported to the parent, which keeps inference in a thread
        print(json.dumps({"error": str(exc) or type(exc).__name__}), file=answer, flush=True)
        return 1
    print(json.dumps({"ok": os.getpid()}), file=answer, flush=True)
    answer.close()
    perf, run_raw, k, credits, unsaid = time.perf_counter, model.run_raw, 0, 0, 0
    while True:
        if not credits:
            credits = len(os.read(ready, 4096))
            if not credits:  # the parent closed the pipe, or died: nothing more will come
                return 0
        credits -= 1
        slot_start, ins, outs = views[k]
        start = perf()
        error = None
        try:
            for view, out in zip(outs, run_raw(ins), strict=True):
                if out.shape != view.shape:
                    raise AgentError(f"output of shape {list(out.shape)} where {list(view.shape)} was expected")
                view[...] = out
        except Exception as exc:  # one frame fails; the worker goes on
            said = str(exc).strip()
            error = said.splitlines()[0] if said else type(exc).__name__
        write_status(buffer, slot_start, error, (perf() - start) * 1000.0)
        unsaid += 1
        k = (k + 1) % slots
        # done slots are announced together, a system call saved per frame, but before waiting for more
        if not credits or unsaid >= _SAY_EVERY:
            try:
                os.write(done, b"\x00" * unsaid)
            except BrokenPipeError:  # the parent is gone
                return 0
            unsaid = 0


def _main() -> int:
    """``python -m agent.offload SPEC_JSON READY_FD DONE_FD``: the worker side, started by ``InferenceProcess``."""
    import signal

    # Ctrl-C in a terminal, or SIGTERM to the whole group, reaches us too: the agent stops us in order (the end of
    # the ready pipe) after the frames it sent, or kills us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # stdout carries the start-up answer alone: whatever a library prints goes to stderr (the agent's log)
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return _serve(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), answer)


if __name__ == "__main__":
    sys.exit(_main())
