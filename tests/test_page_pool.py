"""The page pool as a unit: page tables grow a page at a time, full pages are cached under their whole
prefix, shared by reference count, and evicted least recently freed first."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserver.engine.page_pool import PagePool

T = 4  # tokens per page


def filled(pool: PagePool, tokens: list[int]):
    """A sequence that wrote all of `tokens` (as a prompt would) and cached its full pages."""
    table = pool.open(tokens)
    assert pool.grow(table, len(tokens))
    pool.cache_full_pages(table, tokens)
    return table


def test_a_table_grows_a_page_at_a_time_and_only_while_pages_are_free():
    pool = PagePool(num_pages=3, page_tokens=T)
    table = pool.open([1, 2, 3])
    assert table.pages == [] and pool.grow(table, 3) and len(table.pages) == 1
    assert pool.grow(table, 4) and len(table.pages) == 1  # the page has room for a fourth token
    assert pool.grow(table, 5) and len(table.pages) == 2
    assert not pool.grow(table, 13) and len(table.pages) == 2  # would need 4 pages of 3: nothing taken
    assert pool.free_pages == 1
    pool.close(table)
    assert pool.free_pages == 3 and table.pages == []


def test_a_prompt_holds_the_cached_pages_of_its_start_without_copies():
    pool = PagePool(num_pages=8, page_tokens=T)
    first = filled(pool, list(range(10)))  # pages [0-3], [4-7] full; [8, 9] not
    assert pool.cached_pages == 2
    second = pool.open([*range(8), 50, 51])
    assert second.indices == first.indices[:2] and second.settled == 2
    assert [page.holders for page in second.pages] == [2, 2]
    # Another start of the same tokens shares only what matches from the first token on.
    assert pool.open([0, 1, 2, 3, 9, 9, 9, 9, 9]).indices == first.indices[:1]


def test_a_key_names_the_whole_prefix_not_only_the_page():
    pool = PagePool(num_pages=8, page_tokens=T)
    filled(pool, [1, 1, 1, 1, 2, 2, 2, 2, 0])
    # The same second page after another first page is another prefix: no hit at all.
    assert pool.open([7, 7, 7, 7, 2, 2, 2, 2, 0]).pages == []


def test_the_last_token_of_a_prompt_is_always_computed():
    pool = PagePool(num_pages=8, page_tokens=T)
    filled(pool, list(range(8)))
    # All 8 tokens are cached, but the prompt's last token must run to sample the first new one.
    assert len(pool.open(list(range(8))).pages) == 1
    assert len(pool.open(list(range(9))).pages) == 2


def test_freed_pages_stay_cached_until_their_room_is_needed_least_recently_freed_first():
    pool = PagePool(num_pages=4, page_tokens=T)
    a = filled(pool, [1] * 8)
    b = filled(pool, [2] * 8)
    pool.close(a)
    pool.close(b)
    assert pool.free_pages == 4 and pool.cached_pages == 4
    # Both are still found; a's pages were freed first, so they go first.
    taker = pool.open([3] * 5)
    assert pool.grow(taker, 5) and pool.evictions == 2
    assert pool.open([1] * 9).pages == []
    assert len(pool.open([2] * 9).pages) == 2


def test_a_closed_table_frees_its_last_pages_first_so_its_prefix_is_evicted_last():
    pool = PagePool(num_pages=3, page_tokens=T)
    pool.close(filled(pool, [1] * 12))
    taker = pool.open([5])
    assert pool.grow(taker, 1)
    assert len(pool.open([1] * 13).pages) == 2  # the third page went, the first two remain


def test_a_shared_page_is_freed_only_when_its_last_holder_closes():
    pool = PagePool(num_pages=4, page_tokens=T)
    first = filled(pool, [1] * 5)
    second = pool.open([1] * 6)
    assert second.indices == first.indices[:1] and pool.free_pages == 2
    pool.close(first)
    assert pool.free_pages == 3  # first's own second page is free; the shared one is still held
    pool.close(second)
    assert pool.free_pages == 4


def test_a_prefix_computed_twice_at_once_is_cached_once_and_later_pages_still_chain():
    pool = PagePool(num_pages=8, page_tokens=T)
    prompt = [4] * 8
    a, b = pool.open(prompt), pool.open(prompt)  # arrived together: neither finds the other
    for table in (a, b):
        assert pool.grow(table, 8)
    pool.cache_full_pages(a, prompt)
    pool.cache_full_pages(b, prompt)
    assert pool.cached_pages == 2
    # b goes on generating; its third page chains to a's cached pages, which hold the same entries.
    longer = [*prompt, 5, 5, 5, 5]
    assert pool.grow(b, 12)
    pool.cache_full_pages(b, longer)
    assert pool.open([*longer, 0]).indices == [*a.indices, b.indices[2]]


def test_preempted_tables_resume_from_their_cached_pages():
    pool = PagePool(num_pages=4, page_tokens=T)
    tokens = list(range(10))
    table = filled(pool, tokens)
    pages = table.indices
    pool.close(table)  # preempted: its pages are free but still cached
    resumed = pool.open(tokens)
    assert resumed.indices == pages[:2]


def test_without_prefix_caching_nothing_is_shared():
    pool = PagePool(num_pages=4, page_tokens=T, prefix_caching=False)
    filled(pool, [1] * 8)
    assert pool.cached_pages == 0 and pool.open([1] * 9).pages == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 2), min_size=1, max_size=14)), max_size=30))
def test_holders_free_queue_and_cache_stay_consistent(operations):
    """Whatever opens and closes in whatever order: a page is free exactly when nobody holds it, every
    table's pages are distinct, and what a prompt finds in the cache holds exactly its tokens."""
    pool = PagePool(num_pages=6, page_tokens=T)
    open_tables, written = [], {}  # page index -> the tokens whose entries it holds
    for close, tokens in operations:
        if close and open_tables:
            pool.close(open_tables.pop(0))
            continue
        table = pool.open(tokens)
        hits = len(table.pages)
        for position, page in enumerate(table.pages):
            assert written[page.index] == tuple(tokens[position * T : (position + 1) * T])
        if not pool.grow(table, len(tokens)):
            pool.close(table)
            continue
        for position, page in enumerate(table.pages[hits:], start=hits):
            written[page.index] = tuple(tokens[position * T : (position + 1) * T])
        pool.cache_full_pages(table, tokens)
        open_tables.append(table)
        assert len(set(table.indices)) == len(table.indices)
    held = {}
    for table in open_tables:
        for page in table.pages:
            held[page.index] = held.get(page.index, 0) + 1
    for page in pool.pages:
        assert page.holders == held.get(page.index, 0)
    assert pool.free_pages == sum(1 for page in pool.pages if page.holders == 0)


@pytest.mark.parametrize(("pages", "tokens"), [(0, 4), (1, 0)])
def test_an_empty_pool_is_refused(pages, tokens):
    with pytest.raises(ValueError):
        PagePool(num_pages=pages, page_tokens=tokens)
