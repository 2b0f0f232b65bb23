"""A set that forgets its oldest members past a size, for what a daemon remembers in memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class BoundedSet(Generic[T]):
    """Insertion-ordered; adding past `limit` drops the oldest members. What it holds must
    be a cache of something S3 knows too, so forgetting costs a request, never work."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: OrderedDict[T, None] = OrderedDict()

    def add(self, item: T) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)

    def discard(self, item: T) -> None:
        self._items.pop(item, None)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keep_only(self, wanted: set[T]) -> None:
        for item in [i for i in self._items if i not in wanted]:
            del self._items[item]
