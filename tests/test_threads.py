"""lmmjax.set_cpu_threads / LMMJAX_CPU_THREADS: lmmjax's calls confined to n CPUs, every
thread's CPU set restored afterwards, the numbers unchanged (issue: scale, item 4)."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import lmmjax
from lmmjax import _compute

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                reason="needs Linux CPU affinity and at least two CPUs")


@pytest.fixture
def one_cpu():
    prev = lmmjax.set_cpu_threads(1)
    yield
    lmmjax.set_cpu_threads(prev)


def test_bound_inside_and_restored_after(one_cpu):
    before = os.sched_getaffinity(0)
    stop = threading.Event()
    seen = {}
    worker = threading.Thread(target=stop.wait)      # another thread of the process (like XLA's pool)
    worker.start()
    try:
        with _compute.precision():
            seen["main"] = os.sched_getaffinity(0)
            seen["worker"] = os.sched_getaffinity(worker.native_id)
            with _compute.precision():              # nested calls keep the bound
                seen["nested"] = os.sched_getaffinity(0)
        after_worker = os.sched_getaffinity(worker.native_id)
    finally:
        stop.set()
        worker.join()
    assert seen["main"] == seen["worker"] == seen["nested"] == {min(before)}
    assert os.sched_getaffinity(0) == before and after_worker == before


def test_same_fit_under_a_bound(one_cpu):
    df = lmmjax.datasets.sleepstudy()
    m1 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", df)
    lmmjax.set_cpu_threads(None)
    m0 = lmmjax.lmer("Reaction ~ Days + (Days | Subject)", df)
    np.testing.assert_array_equal(m1.theta, m0.theta)
    assert m1.reml_criterion == m0.reml_criterion


def test_bad_setting():
    with pytest.raises(ValueError, match="positive integer"):
        lmmjax.set_cpu_threads(0)
