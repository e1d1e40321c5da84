"""The read → compute → write pipeline under the conversion and the merge: order, bounded memory, failures."""

import threading
import time

import numpy as np
import pytest
import torch

from komt_edge.tensor_pipeline import BufferPool, run_pipeline


def test_items_arrive_in_order_and_stages_overlap():
    seen, threads = [], set()

    def source():
        for i in range(50):
            threads.add(threading.current_thread().name)
            yield i

    def compute(i):
        threads.add(threading.current_thread().name)
        return i * i

    def sink(r):
        threads.add(threading.current_thread().name)
        seen.append(r)

    run_pipeline(source(), compute, sink, name="t")
    assert seen == [i * i for i in range(50)]
    assert {"t-read", "t-write", threading.current_thread().name} <= threads


def test_queues_are_bounded():
    produced, consumed = [], []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    def sink(r):
        time.sleep(0.01)
        consumed.append(r)
        assert len(produced) - len(consumed) <= 1 + 1 + 1 + 2 + 1  # read, queued, computing, queued, writing

    run_pipeline(source(), lambda i: i, sink, read_ahead=1, write_behind=2)
    assert consumed == list(range(20))


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_a_failure_in_any_stage_is_raised_without_hanging(stage):
    closed = []

    def source():
        try:
            for i in range(1000):
                if stage == "read" and i == 5:
                    raise ValueError("read failed")
                yield i
        finally:
            closed.append(True)

    def compute(i):
        if stage == "compute" and i == 5:
            raise ValueError("compute failed")
        return i

    def sink(r):
        if stage == "write" and r == 5:
            raise ValueError("write failed")

    start = time.monotonic()
    with pytest.raises(ValueError, match=f"{stage} failed"):
        run_pipeline(source(), compute, sink)
    assert time.monotonic() - start < 60  # a hang guard only: the events below are what "stops at once" means
    assert closed  # the source generator was closed (its finally ran)
    assert not [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


def test_buffer_pool_recycles_and_keeps_few():
    pool = BufferPool(keep=1, min_bytes=1024)
    a = pool.take((64, 64), torch.float32)
    ptr = a.data_ptr()
    pool.give(a.numpy())  # a numpy view of it is accepted too
    b = pool.take((32, 32), torch.bfloat16)  # smaller, another dtype: the same memory
    assert b.data_ptr() == ptr and b.dtype == torch.bfloat16 and b.shape == (32, 32)
    c = pool.take((64, 64), torch.float32)  # b is lent: a new buffer
    assert c.data_ptr() != ptr
    pool.give(b)
    pool.give(c)
    pool.give(torch.zeros(4))  # not from the pool: ignored
    assert len(pool._free) == 1
    small = pool.take((2, 2), torch.float32)  # under min_bytes: plain allocation
    pool.give(small)
    assert len(pool._free) == 1
    np.testing.assert_array_equal(pool.take((4,), torch.float32).numpy().shape, (4,))
