"""Three-stage bounded pipelines: read → compute → write, each stage in its own thread, items kept in order.

The conversion and the merge stream a checkpoint tensor by tensor. Reading (disk, page cache), computing (a LoRA
merge, an upcast, quantization: torch, numpy and llama.cpp release the GIL) and writing (disk) overlap: while
item i is computed, item i+1 is read and item i-1 written. The queues between the stages are bounded, so only a
few items are in memory at once.

An exception in any stage stops the others (no stage waits forever on a queue the failed stage no longer feeds)
and is re-raised in the calling thread; so are Ctrl-C and SIGTERM (delivered to the calling thread, which runs
the compute stage). Nothing is half-written by the pipeline itself: the caller's atomic output is what removes a
partial file.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
U = TypeVar("U")

_END = object()
_POLL_S = 0.1  # how often a blocked stage checks whether another one failed


class _Stopped(Exception):
    """Another stage failed: this one gives up quietly."""


class _Channel:
    def __init__(self, maxsize: int, abort: threading.Event):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._abort = abort

    def put(self, item) -> None:
        while True:
            if self._abort.is_set():
                raise _Stopped
            try:
                self._q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self):
        while True:
            if self._abort.is_set():
                raise _Stopped
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                continue


def run_pipeline(source: Iterable[T], compute: Callable[[T], U], sink: Callable[[U], None], *,
                 read_ahead: int = 2, write_behind: int = 2, name: str = "pipeline") -> None:
    """Iterate ``source`` in a reader thread, ``compute`` each item in the calling thread, ``sink`` each result in
    a writer thread, in order. At most ``read_ahead`` read items wait for compute and ``write_behind`` results wait
    for the writer. Returns when every result has been sunk; raises the first exception of any stage."""
    abort = threading.Event()
    errors: list[BaseException] = []
    inbox, outbox = _Channel(read_ahead, abort), _Channel(write_behind, abort)

    def fail(err: BaseException) -> None:
        errors.append(err)
        abort.set()

    def reader() -> None:
        try:
            for item in source:
                inbox.put(item)
            inbox.put(_END)
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            fail(err)

    def writer() -> None:
        try:
            while (result := outbox.get()) is not _END:
                sink(result)
                del result
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            fail(err)

    threads = [threading.Thread(target=reader, name=f"{name}-read", daemon=True),
               threading.Thread(target=writer, name=f"{name}-write", daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := inbox.get()) is not _END:
            result = compute(item)
            del item
            outbox.put(result)
            del result
        outbox.put(_END)
        threads[1].join()  # the writer finishes the queued results (or fails)
    except _Stopped:
        pass
    except BaseException as err:
        fail(err)
    finally:
        for t in threads:
            while t.is_alive():
                try:
                    t.join()
                except BaseException as err:  # a second Ctrl-C while waiting: stop everything, keep the first error
                    fail(err)
        close = getattr(source, "close", None)
        if close is not None and errors:
            try:
                close()  # a generator source: run its finally blocks
            except Exception:  # noqa: BLE001
                pass
    if errors:
        raise errors[0]


class BufferPool:
    """Recycled memory for the large tensors of a pipeline. A fresh buffer of hundreds of megabytes costs a page
    fault per 4 KiB on first touch, often more than the arithmetic done in it; a recycled one is already mapped.
    Buffers are raw bytes, viewed as any dtype and shape; only as many exist as tensors are in flight, plus at most
    ``keep`` idle ones. Tensors under ``min_bytes`` come from the ordinary allocator."""

    def __init__(self, keep: int = 4, min_bytes: int = 16 << 20):
        import torch

        self._torch = torch
        self._free: list = []
        self._lent: dict[int, object] = {}  # buffers handed out, by their data address
        self._keep = keep
        self._min_bytes = min_bytes
        self._lock = threading.Lock()

    def take(self, shape, dtype):
        """An uninitialized tensor of ``shape`` and ``dtype``; hand it (or a numpy view of it) back with ``give``."""
        torch = self._torch
        shape = tuple(shape)
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if nbytes < self._min_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        view = buf[:nbytes].view(dtype).view(shape)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return view

    def give(self, tensor) -> None:
        """Return the buffer behind ``tensor`` (a torch tensor or numpy array from ``take``; anything else is
        ignored). The caller must not use it afterwards."""
        ptr = tensor.data_ptr() if hasattr(tensor, "data_ptr") else tensor.ctypes.data
        with self._lock:
            buf = self._lent.pop(ptr, None)
            if buf is None:
                return
            self._free.append(buf)
            if len(self._free) > self._keep:
                smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                del self._free[smallest]  # keep the largest idle ones (tensors compare by value: no list.remove)
