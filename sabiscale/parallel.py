"""Process parallelism for data preparation, with results always in input order.

Worker processes are spawned, not forked: the parent may already run the tokenizers library's
thread pool (which a fork leaves unusable) or hold large lists that a fork would copy on write.
One pool serves every stage of a `prepare`, so processes start once.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Workers:
    """`with Workers(n) as w: w.map(fn, items)`: fn over items in order, on n processes (n=1: here)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool = None

    def __enter__(self) -> "Workers":
        if self.processes > 1:
            self._pool = multiprocessing.get_context("spawn").Pool(self.processes)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if self._pool is None or len(items) <= 1:
            return [fn(x) for x in items]
        return self._pool.map(fn, items, chunksize=1)


SERIAL = Workers(1)
