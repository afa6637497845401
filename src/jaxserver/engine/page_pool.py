"""The KV cache's pages and who holds them, with no JAX in it: one pool of fixed-size pages, a page table per
sequence, and block-level prefix caching.

A sequence holds a list of pages (its page table), enough for the tokens it has written, and grows a page at
a time. A full page is cached under its key: its tokens and the identity of the cached page before it, so a
key names a whole prefix exactly (dictionary equality, no hash that could collide). Pages are
reference-counted: every sequence whose prompt starts with cached pages holds those very pages, without a
copy. A page nobody holds goes to the free queue; a cached one stays findable there until the pool needs
its room, least recently freed first. Only the engine thread calls it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

NO_PARENT = -1  # the parent identity of a sequence's first page

PageKey = tuple[int, tuple[int, ...]]  # (identity of the cached page before, the page's tokens)


@dataclass(eq=False)
class Page:
    index: int  # where its entries live in the cache arrays
    holders: int = 0  # sequences whose page table holds it
    key: PageKey | None = None  # set while it is cached
    identity: int = NO_PARENT  # unique per caching, so a key can never name a page's earlier contents


@dataclass
class PageTable:
    """The pages of one sequence, in order. The first `settled` are full and keyed: cached, or twins of
    a cached page (the same prefix, computed twice by prompts that arrived together); `parent` is the
    identity the next full page's key chains to."""

    pages: list[Page] = field(default_factory=list)
    settled: int = 0
    parent: int = NO_PARENT

    @property
    def indices(self) -> list[int]:
        return [page.index for page in self.pages]


class PagePool:
    def __init__(self, num_pages: int, page_tokens: int, prefix_caching: bool = True):
        if num_pages < 1 or page_tokens < 1:
            raise ValueError("a page pool needs at least one page of at least one token")
        self.page_tokens = page_tokens
        self.prefix_caching = prefix_caching
        self.pages = [Page(i) for i in range(num_pages)]
        self._free: OrderedDict[int, Page] = OrderedDict((p.index, p) for p in self.pages)  # oldest first
        self._cached: dict[PageKey, Page] = {}
        self._identities = itertools.count()
        self.evictions = 0  # cached pages whose room was taken for new entries

    # --- counts ---------------------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages nobody holds (cached ones among them), all available to `grow`."""
        return len(self._free)

    @property
    def cached_pages(self) -> int:
        return len(self._cached)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_tokens)

    # --- a sequence's life ------------------------------------------------------------------------------

    def open(self, prompt: Sequence[int]) -> PageTable:
        """A page table that holds the longest cached start of `prompt`, in whole pages, leaving at least
        its last token to compute (its logits sample the first new token)."""
        table = PageTable()
        if not self.prefix_caching:
            return table
        for start in range(0, len(prompt) - self.page_tokens, self.page_tokens):
            page = self._cached.get((table.parent, tuple(prompt[start : start + self.page_tokens])))
            if page is None:
                break
            if page.holders == 0:
                del self._free[page.index]
            page.holders += 1
            table.pages.append(page)
            table.parent = page.identity
        table.settled = len(table.pages)
        return table

    def grow(self, table: PageTable, tokens: int) -> bool:
        """Give `table` room for `tokens` entries in all; False (and nothing taken) if the pool has too
        few free pages."""
        wanted = self.pages_for(tokens) - len(table.pages)
        if wanted <= 0:
            return True
        if wanted > len(self._free):
            return False
        for _ in range(wanted):
            _, page = self._free.popitem(last=False)
            if page.key is not None:  # its cached contents are about to be overwritten
                del self._cached[page.key]
                page.key, page.identity = None, NO_PARENT
                self.evictions += 1
            page.holders = 1
            table.pages.append(page)
        return True

    def cache_full_pages(self, table: PageTable, tokens: Sequence[int]) -> None:
        """Cache the pages that `tokens` (every token of the sequence whose entries are written) fill and
        that are not settled yet. A page whose key is cached already (by a twin) stays uncached; the
        pages after it chain to the twin, whose contents are the same."""
        if not self.prefix_caching:
            return
        full = min(len(tokens) // self.page_tokens, len(table.pages))
        for position in range(table.settled, full):
            start = position * self.page_tokens
            key = (table.parent, tuple(tokens[start : start + self.page_tokens]))
            twin = self._cached.get(key)
            if twin is None:
                page = table.pages[position]
                page.key, page.identity = key, next(self._identities)
                self._cached[key] = page
                twin = page
            table.parent = twin.identity
        table.settled = max(table.settled, full)

    def close(self, table: PageTable) -> None:
        """Release every page of `table` (a finished or preempted sequence). The last pages go to the free
        queue first, so that a prefix, which others are likelier to share, is evicted last."""
        for page in reversed(table.pages):
            page.holders -= 1
            if page.holders == 0:
                self._free[page.index] = page
        table.pages, table.settled, table.parent = [], 0, NO_PARENT
