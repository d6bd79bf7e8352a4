"""Page allocator with exact accounting and hashed-page prefix reuse.

Pages are the unit of allocation. A full page whose KV is computed may be *published* under a
hash of (parent page hash, its tokens); a later request whose prompt starts with the same tokens
reuses those pages instead of recomputing them. Published pages that no request holds stay cached
(evictable, LRU) until the free list runs dry. Only full, immutable pages are shared, so no
copy-on-write is ever needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def num_pages(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` tokens."""
    return -(-tokens // page_size)


def page_hashes(tokens: Sequence[int], page_size: int, limit: int | None = None) -> list[bytes]:
    """Chained hashes of the full pages of ``tokens`` (at most ``limit`` pages)."""
    n = len(tokens) // page_size
    if limit is not None:
        n = min(n, limit)
    out: list[bytes] = []
    prev = b""
    for i in range(n):
        chunk = tokens[i * page_size : (i + 1) * page_size]
        prev = hashlib.blake2b(prev + b"|" + ",".join(map(str, chunk)).encode(), digest_size=16).digest()
        out.append(prev)
    return out


class OutOfPages(RuntimeError):
    pass


class KVPoolCorrupted(RuntimeError):
    """The page accounting is broken: no request can be served correctly any more."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published, unreferenced, LRU first

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Pages a new allocation can get: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages held by at least one request."""
        return self.num_pages - self.num_available

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    # ---- allocation -------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        if n > self.num_available:
            raise OutOfPages(f"need {n} pages, {self.num_available} available")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(p)]
            self._refs[p] = 1
            pages.append(p)
        return pages

    def retain(self, pages: Sequence[int]) -> None:
        """Take one more reference on held pages (a KV transfer keeps them past their request)."""
        for p in pages:
            if self._refs[p] <= 0:
                raise KVPoolCorrupted(f"retain of free page {p}")
            self._refs[p] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Release one reference on each page. Freed pages go back so that the next ``alloc`` hands
        them out in their order again: a run stays a run, which one-sided KV writes move as one; and a
        cached prefix becomes evictable tail first, so eviction keeps its head matchable."""
        for p in reversed(pages):
            if self._refs[p] <= 0:
                raise KVPoolCorrupted(f"double free of page {p}")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._hash_of:
                    self._evictable[p] = None
                else:
                    self._free.append(p)

    # ---- prefix reuse -----------------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Take a reference on the longest run of cached pages matching ``hashes``."""
        pages: list[int] = []
        if not self.enable_prefix_caching:
            return pages
        for h in hashes:
            p = self._page_of.get(h)
            if p is None:
                break
            if self._refs[p] == 0:
                del self._evictable[p]
            self._refs[p] += 1
            pages.append(p)
        return pages

    def publish(self, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Make computed full pages findable by later requests (first publisher wins)."""
        if not self.enable_prefix_caching:
            return
        for p, h in zip(pages, hashes):
            if p in self._hash_of or h in self._page_of:
                continue
            self._hash_of[p] = h
            self._page_of[h] = p

    def flush(self) -> bool:
        """Forget every cached prefix; refused (False) while any page is held."""
        if self.num_used:
            return False
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._page_of.clear()
        return True
