"""KV page allocator with automatic prefix caching. Host side: plain Python, no JAX.

The KV cache is `num_pages` pages of `page_size` token slots (see docs/architecture.md). Page 0 is the null
page: it is never handed out (padding writes there, block tables are padded with 0), so pages
`1..num_pages-1` are usable. Every usable page is in exactly one of three states:

* **free**      - refcount 0, holds no cached hash. Kept in a FIFO free list.
* **evictable** - refcount 0, still registered in the prefix cache (its KV is valid and can be re-used by a
  later prompt with the same prefix). Kept in LRU order; reused for new data (evicted: hash entry dropped)
  only when the free list is empty.
* **used**      - refcount > 0: in the block table of at least one live sequence. A cached page can be in
  several tables at once (shared prefix); an uncached page belongs to exactly one sequence.

So `free + evictable + used == num_pages - 1` always.

Prefix caching (like vLLM's "automatic prefix caching"): a *full* page `i` of a sequence is identified by a
hash chain `h_i = H(h_{i-1} || tokens of page i)`, with `h_{-1} = H(domain || cache_salt || extra_key)`.
Folding the salt (everything besides the token ids that changes the KV: model, dtype, quantization, LoRA,
tenant...) into the root of the chain is equivalent to mixing it into every link, because each link
commits to its parent. `H` is blake2b-256 over little-endian int64 token ids: stable across processes
(unlike Python's salted `hash`) and collision resistant, so a crafted prompt cannot alias another tenant's
page. A page is registered (hash -> page) only by `commit_computed`, i.e. after its KV has been written;
registered pages are immutable until evicted.

Typical engine flow for one sequence::

    cached = bm.allocate_prompt(seq_id, token_ids)       # prefix hits; nothing new allocated yet
    bm.ensure_capacity(seq_id, cached + chunk)           # all-or-nothing; False -> retry/preempt
    ... run the step, KV written for tokens [cached, cached + chunk) ...
    bm.commit_computed(seq_id, token_ids, cached + chunk) # full pages enter the prefix cache
    bm.free(seq_id)                                      # finished, aborted or preempted

Every per-call cost is O(pages touched by the call) (plus hashing those pages' tokens); nothing scans the
whole pool except `check_invariants()` (debug/tests) and `reset_prefix_cache()` (O(cached pages)).

**Page groups** (`group_windows`, config.KVLayout): with sliding-window layers a sequence has one block table
per group, all drawing pages from the one pool. A full-attention group (window 0) holds a page for every
position; a sliding group's table holds NULL_PAGE where a page fell out of its window: `trim_window` releases
those after each step (the sliding layers' KV no longer needed), `ensure_capacity` only appends. Each group's
pages are cached under its own key (the chain hash + the group), and a prefix hit is only as long as every
sliding group still has the pages its window needs at the hit's end. `block_table` is group 0's table.

`free()` of a sequence id without a block table is a **no-op returning False**: the scheduler frees
sequences from its waiting queue (abort, never admitted) without tracking whether they hold pages, and a
freed-then-freed-again sequence must not release its (possibly re-allocated, shared) pages twice.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Sequence

from jaxserve.errors import JaxserveError

__all__ = ["BlockManager", "BlockManagerError", "NULL_PAGE"]

NULL_PAGE = 0
_DOMAIN = b"jaxserve.prefix-cache.v1\x00"


class BlockManagerError(JaxserveError, RuntimeError):
    """A block manager call that breaks the sequence life cycle (double allocate, unknown sequence, ...).

    This is an engine bug, not a user mistake: allocate_prompt -> ensure_capacity/commit_computed -> free.
    """


class _SeqState:
    """Per-sequence bookkeeping: its block table and where its prefix-cache hash chain stands."""

    __slots__ = ("tables", "num_hashed", "last_hash", "root", "cacheable")

    def __init__(self, root: bytes, num_groups: int):
        self.tables: List[List[int]] = [[] for _ in range(num_groups)]  # per page group; NULL_PAGE: trimmed
        self.cacheable = True  # False once its KV predates a reset_prefix_cache()
        self.num_hashed = 0  # leading full pages whose chain hash is known (hit or committed)
        self.root = root  # h_{-1}: salt of this sequence
        self.last_hash = root  # h_{num_hashed - 1}

    @property
    def pages(self) -> List[int]:
        return self.tables[0]


class BlockManager:
    """Pages, reference counts and the prefix cache. See the module docstring for the model.

    Args:
        num_pages: total pages in the KV cache, including the null page 0 (so `num_pages - 1` usable).
        page_size: tokens per page.
        enable_prefix_caching: when False, `allocate_prompt` never hits and `commit_computed` is a no-op.
        cache_salt: bytes mixed into every page hash: put everything that changes the KV for the same tokens
            (model id, KV dtype, quantization config, ...) here so caches never alias across configurations.
        group_windows: the page groups' attention windows (0 = full attention), `KVLayout.group_windows`.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True,
                 cache_salt: bytes = b"", group_windows: Sequence[int] = (0,)):
        if int(num_pages) < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), got {num_pages}")
        if int(page_size) < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if not isinstance(cache_salt, (bytes, bytearray)):
            raise TypeError(f"cache_salt must be bytes, got {type(cache_salt).__name__}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.cache_salt = bytes(cache_salt)
        self.group_windows = tuple(int(w) for w in group_windows)
        if not self.group_windows or any(w < 0 for w in self.group_windows) or len(self.group_windows) > 255:
            raise ValueError(f"group_windows must be 1..255 windows >= 0, got {group_windows!r}")
        self.num_groups = len(self.group_windows)
        self._pack = struct.Struct(f"<{self.page_size}q").pack

        self._ref: List[int] = [0] * self.num_pages
        self._page_hash: List[Optional[bytes]] = [None] * self.num_pages
        self._hash_to_page: Dict[bytes, int] = {}
        self._free: deque = deque(range(1, self.num_pages))  # never-cached (or dropped) pages
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # LRU first
        self._num_used = 0
        self._seqs: Dict[int, _SeqState] = {}
        self._roots: Dict[bytes, bytes] = {}

        self._query_tokens = 0
        self._hit_tokens = 0
        self._num_evictions = 0

    # ------------------------------------------------------------------ hashing
    def _root(self, extra_key: bytes) -> bytes:
        root = self._roots.get(extra_key)
        if root is None:
            s, e = self.cache_salt, extra_key
            root = hashlib.blake2b(_DOMAIN + len(s).to_bytes(8, "little") + s + len(e).to_bytes(8, "little") + e,
                                   digest_size=32).digest()
            if len(self._roots) < 4096:  # bounded memo of per-request salts
                self._roots[extra_key] = root
        return root

    def _chain(self, parent: bytes, page_tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(parent + self._pack(*page_tokens), digest_size=32).digest()

    def hash_pages(self, token_ids: Sequence[int], extra_key: bytes = b"") -> List[bytes]:
        """Chain hashes of every full page of `token_ids` (for tests, debugging and cache-aware routing)."""
        h, out, ps = self._root(bytes(extra_key)), [], self.page_size
        for i in range(len(token_ids) // ps):
            h = self._chain(h, token_ids[i * ps:(i + 1) * ps])
            out.append(h)
        return out

    @staticmethod
    def _key(h: bytes, group: int) -> bytes:
        """The prefix-cache key of a page of `group` whose chain hash is h (group 0: h itself)."""
        return h if group == 0 else h + bytes((group,))

    def cached_prefix_pages(self, page_hashes: Sequence[bytes]) -> int:
        """How many of `page_hashes` (a prompt's chain hashes, `hash_pages`), from the first, are in the prefix
        cache now. Read-only (for cache-aware routing): nothing is revived or referenced."""
        n = 0
        if self.enable_prefix_caching:
            for h in page_hashes:
                if h not in self._hash_to_page:
                    break
                n += 1
        return n

    # ------------------------------------------------------------------ capacity queries
    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-int(num_tokens) // self.page_size)

    def num_free_pages(self) -> int:
        """Pages a new allocation can take: free + evictable."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of usable pages held by live sequences (refcount > 0)."""
        return self._num_used / (self.num_pages - 1)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens fit in new pages right now (ignoring any prefix-cache hits)."""
        return self.pages_for(num_tokens) * self.num_groups <= self.num_free_pages()

    def max_pages(self, num_tokens: int, step_tokens: int) -> int:
        """The most pages one sequence of `num_tokens` tokens ever holds, with at most `step_tokens` tokens per
        step: every position in a full-attention group; in a sliding group of window W, the pages spanning
        the window before a step's first token and the step's tokens."""
        n = self.pages_for(num_tokens)
        return sum(n if w == 0 else min(n, self.pages_for(w - 1 + step_tokens) + 1) for w in self.group_windows)

    def pages_held(self, seq_id: int) -> List[int]:
        """Pages the sequence holds in each group (trimmed entries not counted)."""
        return [sum(1 for p in t if p != NULL_PAGE) for t in self._get(seq_id).tables]

    def has_seq(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    __contains__ = has_seq

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def is_cached(self, page: int) -> bool:
        """Whether the page is registered in the prefix cache (its KV is immutable until evicted)."""
        return self._page_hash[page] is not None

    def block_table(self, seq_id: int) -> List[int]:
        """A copy of the sequence's pages (group 0's), in token order (no null-page padding)."""
        return list(self._get(seq_id).pages)

    def group_tables(self, seq_id: int) -> tuple:
        """Copies of the sequence's block tables, one per group (NULL_PAGE where a sliding group trimmed)."""
        return tuple(list(t) for t in self._get(seq_id).tables)

    def _get(self, seq_id: int) -> _SeqState:
        st = self._seqs.get(seq_id)
        if st is None:
            raise BlockManagerError(f"sequence {seq_id} has no block table (not allocated, or already freed)")
        return st

    # ------------------------------------------------------------------ page pools
    def _take_page(self) -> int:
        """A page for new data: a free page, else the least recently used evictable one. Caller checked room."""
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            h = self._page_hash[page]
            self._page_hash[page] = None
            del self._hash_to_page[h]
            self._num_evictions += 1
        self._ref[page] = 1
        self._num_used += 1
        return page

    def _release(self, page: int) -> None:
        if page == NULL_PAGE:  # a sliding group's trimmed entry
            return
        ref = self._ref[page] - 1
        if ref < 0:
            raise BlockManagerError(f"page {page} released more often than it was taken (refcount {ref})")
        self._ref[page] = ref
        if ref == 0:
            self._num_used -= 1
            if self._page_hash[page] is not None:
                self._evictable[page] = None  # most recently used end
            else:
                self._free.append(page)

    # ------------------------------------------------------------------ sequence life cycle
    def allocate_prompt(self, seq_id: int, token_ids: Sequence[int], extra_key: bytes = b"",
                        lookup: bool = True) -> int:
        """Create the block table of a new (or preempted-and-resumed) sequence from prefix-cache hits.

        Takes the longest run of cached full pages matching the start of `token_ids` (each hit gets
        refcount + 1; evictable hits are revived) and returns how many tokens they cover: a multiple of
        `page_size`, at most `((len(token_ids) - 1) // page_size) * page_size`, so at least the last token is
        still computed and the step produces logits. No page is allocated for the rest: call
        `ensure_capacity`. `extra_key` is an optional per-request salt (tenant isolation, LoRA adapter...)
        on top of the manager's `cache_salt`. `lookup=False` takes no hits (the whole prompt is computed: a
        request with prompt logprobs needs every position's hidden state); its pages still enter the cache.
        """
        if seq_id in self._seqs:
            raise BlockManagerError(f"sequence {seq_id} already has a block table; free() it before re-allocating")
        n = len(token_ids)
        if n == 0:
            raise ValueError(f"sequence {seq_id}: cannot allocate an empty prompt")
        st = _SeqState(self._root(bytes(extra_key)), self.num_groups)
        self._seqs[seq_id] = st
        if not (self.enable_prefix_caching and lookup):
            return 0
        ps = self.page_size
        h, hashes = st.root, []
        for i in range((n - 1) // ps):
            h = self._chain(h, token_ids[i * ps:(i + 1) * ps])
            if h not in self._hash_to_page:
                break
            hashes.append(h)
        k = len(hashes)
        # Every group needs its pages at the hit's end: all of them (full attention), or those its window sees
        # from the first computed token on (sliding: earlier entries stay NULL_PAGE). Shorter hits need earlier
        # pages, which may still be cached.
        while k and not all(self._key(hashes[i], g) in self._hash_to_page
                            for g, w in enumerate(self.group_windows) if g
                            for i in range(self._window_start(k * ps, w), k)):
            k -= 1
        for g, w in enumerate(self.group_windows):
            table = st.tables[g]
            lo = self._window_start(k * ps, w)
            table.extend([NULL_PAGE] * lo)
            for i in range(lo, k):
                page = self._hash_to_page[self._key(hashes[i], g)]
                ref = self._ref[page]
                if ref == 0:
                    del self._evictable[page]  # revive
                    self._num_used += 1
                self._ref[page] = ref + 1
                table.append(page)
        if k:
            st.last_hash = hashes[k - 1]
        st.num_hashed = k
        cached = k * ps
        self._query_tokens += n
        self._hit_tokens += cached
        return cached

    def _window_start(self, num_computed: int, window: int) -> int:
        """The first page a sliding group of `window` still needs once `num_computed` tokens are computed: the
        next token (position num_computed) sees keys from num_computed - window + 1 on. 0 for full attention."""
        return max(0, num_computed - window + 1) // self.page_size if window else 0

    def ensure_capacity(self, seq_id: int, num_tokens_total: int) -> bool:
        """Grow the sequence's tables to hold `num_tokens_total` tokens. All or nothing: False (and no change)
        if there are not enough free + evictable pages. Never shrinks."""
        st = self._get(seq_id)
        n = self.pages_for(num_tokens_total)
        need = sum(max(0, n - len(t)) for t in st.tables)
        if need <= 0:
            return True
        if need > len(self._free) + len(self._evictable):
            return False
        for t in st.tables:
            for _ in range(n - len(t)):
                t.append(self._take_page())
        return True

    def trim_window(self, seq_id: int, num_computed_tokens: int) -> int:
        """Release the sliding groups' pages that no later token of the sequence can see (all of a page's
        positions before `num_computed_tokens - window + 1`); their entries become NULL_PAGE. A cached page
        stays in the prefix cache (evictable). Returns the pages released; a no-op without sliding groups."""
        st = self._get(seq_id)
        released = 0
        for g, w in enumerate(self.group_windows):
            if not w:
                continue
            table = st.tables[g]
            for i in range(min(self._window_start(num_computed_tokens, w), len(table))):
                if table[i] != NULL_PAGE:
                    self._release(table[i])
                    table[i] = NULL_PAGE
                    released += 1
        return released

    def commit_computed(self, seq_id: int, token_ids_so_far: Sequence[int], num_computed_tokens: int) -> int:
        """Register the sequence's newly full, computed pages in the prefix cache. Returns pages registered.

        Call after a step wrote KV for tokens `[0, num_computed_tokens)`. The hash chain continues from the
        sequence's last hashed page, so this is O(new full pages). A page whose hash is already held by
        another page stays private (the existing mapping wins), but the chain still advances past it.
        """
        st = self._get(seq_id)
        if not (self.enable_prefix_caching and st.cacheable):
            return 0
        ps = self.page_size
        if num_computed_tokens > len(token_ids_so_far):
            raise ValueError(f"sequence {seq_id}: num_computed_tokens={num_computed_tokens} > "
                             f"{len(token_ids_so_far)} known tokens")
        full = num_computed_tokens // ps
        if full > len(st.pages):
            raise BlockManagerError(f"sequence {seq_id}: {num_computed_tokens} computed tokens need {full} pages "
                                    f"but its table has {len(st.pages)}; call ensure_capacity first")
        registered = 0
        h = st.last_hash
        for i in range(st.num_hashed, full):
            h = self._chain(h, token_ids_so_far[i * ps:(i + 1) * ps])
            for g, table in enumerate(st.tables):
                key, page = self._key(h, g), table[i]
                if page == NULL_PAGE or key in self._hash_to_page:
                    continue
                if self._page_hash[page] is not None:  # pages past the hits come from _take_page: uncached
                    raise BlockManagerError(f"sequence {seq_id}: page {page} is already cached")
                self._hash_to_page[key] = page
                self._page_hash[page] = key
                registered += 1
        if full > st.num_hashed:
            st.num_hashed = full
            st.last_hash = h
        return registered

    def free(self, seq_id: int) -> bool:
        """Release the sequence's pages (tail first, so the tail is the first evicted). True if it had a
        table; freeing an unknown (never allocated or already freed) sequence is a no-op returning False."""
        st = self._seqs.pop(seq_id, None)
        if st is None:
            return False
        for table in st.tables:
            for page in reversed(table):
                self._release(page)
        return True

    # ------------------------------------------------------------------ cache management, stats, checks
    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after a weight reload). Returns the number of entries dropped.

        Evictable pages become free. Pages held by live sequences stay allocated (and keep being used by
        those sequences) but are no longer shared with new prompts, and live sequences never register pages
        again: all their later KV attends to pre-reset KV, so it must not leak into the new cache. For a
        weight reload, the engine should also preempt or finish running sequences (their KV is stale).
        O(cached pages + live sequences)."""
        for st in self._seqs.values():
            st.cacheable = False
        dropped = len(self._hash_to_page)
        for page in self._hash_to_page.values():
            self._page_hash[page] = None
        self._hash_to_page.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()
        return dropped

    def stats(self) -> dict:
        q, h = self._query_tokens, self._hit_tokens
        return {
            "num_pages": self.num_pages,
            "usable": self.num_pages - 1,
            "free": len(self._free),
            "evictable": len(self._evictable),
            "used": self._num_used,
            "cached_pages": len(self._hash_to_page),
            "num_seqs": len(self._seqs),
            "prefix_query_tokens": q,
            "prefix_hit_tokens": h,
            "prefix_hit_rate": (h / q) if q else 0.0,
            "hit_rate": (h / q) if q else 0.0,  # alias (engine metrics read this name)
            "evictions": self._num_evictions,
        }

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. O(num_pages + table entries): debug only."""

        def fail(msg):
            raise AssertionError(f"BlockManager invariant violated: {msg}")

        n = self.num_pages
        counts = [0] * n
        for sid, st in self._seqs.items():
            held = [p for t in st.tables for p in t if p != NULL_PAGE]
            if len(set(held)) != len(held):
                fail(f"sequence {sid} holds a page twice: {st.tables}")
            if len({len(t) for t in st.tables}) != 1:
                fail(f"sequence {sid}: its groups' tables differ in length: {[len(t) for t in st.tables]}")
            if not 0 <= st.num_hashed <= len(st.pages):
                fail(f"sequence {sid}: num_hashed={st.num_hashed} outside [0, {len(st.pages)}]")
            for g, t in enumerate(st.tables):
                for p in t:
                    if p == NULL_PAGE and self.group_windows[g]:
                        continue  # trimmed
                    if not 1 <= p < n:
                        fail(f"sequence {sid} holds page {p} in group {g} (null page or out of range)")
                    counts[p] += 1
        if counts != self._ref:
            bad = [p for p in range(n) if counts[p] != self._ref[p]][:10]
            fail(f"refcounts differ from block tables at pages {bad}: "
                 f"ref={[self._ref[p] for p in bad]} tables={[counts[p] for p in bad]}")
        if self._ref[NULL_PAGE] != 0 or self._page_hash[NULL_PAGE] is not None:
            fail("null page is referenced or cached")

        free = list(self._free)
        free_set = set(free)
        if len(free_set) != len(free):
            fail("a page is in the free list twice")
        ev_set = set(self._evictable)
        if free_set & ev_set:
            fail(f"pages both free and evictable: {sorted(free_set & ev_set)[:10]}")
        if NULL_PAGE in free_set or NULL_PAGE in ev_set:
            fail("null page in a pool")
        for p in free:
            if self._ref[p] != 0 or self._page_hash[p] is not None:
                fail(f"free page {p} has ref={self._ref[p]} hash={self._page_hash[p] is not None}")
        for p in ev_set:
            if self._ref[p] != 0 or self._page_hash[p] is None:
                fail(f"evictable page {p} has ref={self._ref[p]} hash={self._page_hash[p] is not None}")
        used = sum(1 for p in range(1, n) if self._ref[p] > 0)
        if any(r < 0 for r in self._ref):
            fail("negative refcount")
        if used != self._num_used:
            fail(f"used counter {self._num_used} != pages with refcount > 0 ({used})")
        if len(free) + len(ev_set) + used != n - 1:
            fail(f"free({len(free)}) + evictable({len(ev_set)}) + used({used}) != usable({n - 1}): a page leaked")

        for h, p in self._hash_to_page.items():
            if self._page_hash[p] != h:
                fail(f"hash map entry for page {p} does not match the page's hash")
        if sum(1 for h in self._page_hash if h is not None) != len(self._hash_to_page):
            fail("a page holds a hash that is not in the hash map")
        if not self.enable_prefix_caching and (self._hash_to_page or self._evictable):
            fail("prefix caching disabled but pages are cached")
