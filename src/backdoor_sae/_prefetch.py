"""Build the next batches in a background thread while torch computes."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

_DONE = object()


class Prefetch:
    """Builds the next batches in a background thread while torch computes (one producer: order and
    determinism are those of the plain iterator)."""

    def __init__(self, it: Iterator[Any], depth: int = 4) -> None:
        self._q: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._it = it
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._it:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _DONE:
            self._q.put(_DONE)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
