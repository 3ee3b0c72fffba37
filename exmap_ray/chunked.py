"""ChunkedRows of an (N, ...) array, a memmap or a list of shards, read in float32 chunks and never copied whole.

Heatmap shards are read this way by clustering (the exact path and the anchor route) and by pseudo-group
formation. Imports nothing of the project.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

CHUNK_ROWS = 1 << 16  # rows per chunk: 65,536 x 147 float32 is 38 MB


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Divide each heatmap by its max |value| (the paper); all-zero rows stay zero."""
    X = np.ascontiguousarray(X, dtype=np.float32).reshape(len(X), -1)
    scale = np.abs(X).max(axis=1, keepdims=True)
    return X / np.where(scale > 0, scale, 1.0)


class ChunkedRows:
    """An (N, ...) array, an np.memmap, or a list of such shards, read as float32 (N, d) rows in chunks.

    `normalize` applies `normalize_rows` to each chunk. Nothing is copied whole unless asked
    (`materialize`); `subset` selects rows (e.g. one class) without reading them.
    """

    def __init__(self, H: np.ndarray | Sequence[np.ndarray], normalize: bool, index: np.ndarray | None = None):
        self.shards = [H] if isinstance(H, np.ndarray) else list(H)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.normalize = normalize
        self.index = None if index is None else np.asarray(index, np.int64)
        self.d = int(np.prod(self.shards[0].shape[1:])) if self.shards else 0

    def __len__(self) -> int:
        return int(self.starts[-1]) if self.index is None else len(self.index)

    def subset(self, idx: np.ndarray) -> "ChunkedRows":
        idx = np.asarray(idx, np.int64)
        return ChunkedRows(self.shards, self.normalize, idx if self.index is None else self.index[idx])

    def _prep(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float32).reshape(len(X), self.d)
        return normalize_rows(X) if self.normalize else np.ascontiguousarray(X)

    def _raw(self, idx: np.ndarray) -> np.ndarray:
        """ChunkedRows at sorted global positions `idx`, shard by shard (memmaps read only those rows)."""
        out = []
        bounds = np.searchsorted(idx, self.starts)
        for s, shard in enumerate(self.shards):
            part = idx[bounds[s] : bounds[s + 1]] - self.starts[s]
            if len(part):
                out.append(np.asarray(shard[part], np.float32).reshape(len(part), self.d))
        return np.concatenate(out) if len(out) != 1 else out[0]

    def take(self, idx: np.ndarray) -> np.ndarray:
        """ChunkedRows at positions `idx` (ascending) of this view, float32 (len(idx), d), normalised if asked."""
        idx = np.asarray(idx, np.int64)
        return self._prep(self._raw(idx if self.index is None else self.index[idx]))

    def spans(self, size: int = CHUNK_ROWS) -> list[tuple[int, int]]:
        """(start, stop) of consecutive chunks of this view, at most `size` rows, none across two shards."""
        if self.index is not None:
            return [(lo, min(lo + size, len(self))) for lo in range(0, len(self), size)]
        return [
            (int(a) + lo, int(min(a + lo + size, b)))
            for a, b in zip(self.starts[:-1], self.starts[1:])
            for lo in range(0, int(b - a), size)
        ]

    def read(self, start: int, stop: int) -> np.ndarray:
        """ChunkedRows start..stop of this view (one span of `spans`), float32, normalised if asked."""
        if self.index is not None:
            return self.take(np.arange(start, stop))
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        return self._prep(self.shards[s][start - self.starts[s] : stop - self.starts[s]])

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(start, float32 rows) for consecutive chunks of this view."""
        for lo, hi in self.spans(size):
            yield lo, self.read(lo, hi)

    def materialize(self) -> np.ndarray:
        """All rows as one float32 (N, d) array: the exact path's input (one copy)."""
        if len(self.shards) == 1 and self.index is None:
            H = self.shards[0]
            return normalize_rows(H) if self.normalize else np.ascontiguousarray(H, np.float32).reshape(len(H), -1)
        out = np.empty((len(self), self.d), np.float32)
        for lo, X in self.chunks():
            out[lo : lo + len(X)] = X
        return out

    def mean(self, idx: np.ndarray) -> np.ndarray:
        """Mean of the rows at positions `idx` (ascending), accumulated in float64 over chunks."""
        total = np.zeros(self.d)
        for lo in range(0, len(idx), CHUNK_ROWS):
            total += self.take(idx[lo : lo + CHUNK_ROWS]).sum(0, dtype=np.float64)
        return (total / max(len(idx), 1)).astype(np.float32)
