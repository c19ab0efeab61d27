"""KV cache for Llama 4: the whole history for global (NoPE) layers, one chunk for chunked layers.

Per layer, rows are sequence slots (a batch):
  global layer   k, v [rows, kv_heads, capacity, head_dim]; position p lives at index p.
  chunked layer  k, v [rows, kv_heads, min(chunk, capacity), head_dim], a ring holding only the
                 current chunk: position p lives at slot p % chunk, and a query at p sees slots
                 0 … p % chunk (the positions chunk_start(p) … p). Memory O(chunk), not O(context).
Optionally the global layers store int8 values with one float32 scale per (row, head, position)
(`kv_dtype=torch.int8`), halving the only part of the cache that grows with the context.

Protocol with herd/model (one attention implementation, in herd/model/attention.py):
  Llama4.forward reads `next_position`; Llama4.hidden_states calls `begin(positions)` once per
  forward (all per-step bookkeeping — write indices, masks — is done there, once, not per layer),
  each Attention layer calls `attend(layer, q, k, v, positions, chunk)`, and `end()` advances the
  lengths. `select(start, count)` picks the rows the next forward covers (default: all). A forward
  over several groups of rows (herd.inference.batched: decode rows and prompt segments in one step)
  makes one `plan(positions, row0, rows)` per group, passes it to `attend(..., plan=)`, then `end(plan)`.

Rows may sit at different positions (batched decode, one token per row: masks come from the
per-row lengths). Several tokens per row (prefill) need rows at the same position; the new
tokens attend to the cached prefix and to themselves separately and the two results are merged
by log-sum-exp, so no [T, context] mask is ever built and prefill memory stays bounded.
"""

from __future__ import annotations

import collections
import itertools

import torch

from herd.config import ModelConfig, TextConfig
from herd.model.attention import attention_lse, causal_attention, chunked_causal_attention, merge_attention


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] → int8 values and float32 scales [...] (symmetric, per vector)."""
    xf = x.float()
    scale = xf.abs().amax(-1).clamp_min(1e-8) / 127.0
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _native_decode_attention(dtype: torch.dtype, device: torch.device, head_dim: int):
    """herd's native single-query attention (herd.inference.native) where it applies, else None:
    decode of one row attends through it instead of the flash-attention kernel (1.36× faster at a
    512-token context here, 2–4× faster decode at 32k–1M: no blocking or buffers for one query)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) or head_dim % 16:
        return None
    from herd.inference import native

    return native.op("decode_attention") if native.available_for(dtype) else None


class KVCache:
    """Preallocated keys/values for `batch_size` sequences (see the module docstring)."""

    def __init__(self, config: TextConfig | ModelConfig, batch_size: int = 1, capacity: int = 1024,
                 dtype: torch.dtype = torch.float32, kv_dtype: torch.dtype | str | None = None,
                 device: str | torch.device = "cpu", block_size: int = 32768):
        cfg = config.text if isinstance(config, ModelConfig) else config
        if kv_dtype in ("int8", torch.int8):
            self.quantized = True
        elif kv_dtype in (None, "auto", dtype):
            self.quantized = False
        else:
            raise ValueError(f"kv_dtype must be None (the model's dtype) or 'int8', got {kv_dtype!r}")
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size and capacity must be positive, got {batch_size}, {capacity}")
        self.num_layers = cfg.num_hidden_layers
        self.chunks: list[int | None] = [cfg.attention_chunk_size if cfg.is_chunked(i) else None
                                         for i in range(self.num_layers)]
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.batch_size, self.capacity = batch_size, 0
        self.block_size = block_size  # int8 keys are dequantized this many positions at a time
        L = self.num_layers
        self.k: list[torch.Tensor | None] = [None] * L
        self.v: list[torch.Tensor | None] = [None] * L
        self.k_scale: list[torch.Tensor | None] = [None] * L
        self.v_scale: list[torch.Tensor | None] = [None] * L
        self.lengths = [0] * batch_size  # tokens stored per row (= the next position)
        self._row0, self._rows = 0, batch_size
        self._plan: dict | None = None
        self._native_decode = _native_decode_attention(self.dtype, self.device, self.head_dim)
        self.reserve(capacity)

    @classmethod
    def for_model(cls, model, batch_size: int = 1, capacity: int = 1024, kv_dtype=None, **kw) -> "KVCache":
        return cls(model.config, batch_size, capacity, dtype=model.dtype, kv_dtype=kv_dtype, device=model.device, **kw)

    # ----- storage ------------------------------------------------------------------------------
    def _slots(self, layer: int, capacity: int) -> int:
        c = self.chunks[layer]
        return capacity if c is None else min(c, capacity)

    def _is_int8(self, layer: int) -> bool:
        return self.quantized and self.chunks[layer] is None

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions per row (grows the global layers' buffers; the chunked
        layers' rings stop growing at their chunk)."""
        if capacity <= self.capacity:
            return
        B, kv, D = self.batch_size, self.kv_heads, self.head_dim
        for i in range(self.num_layers):
            n = self._slots(i, capacity)
            old = self.k[i]
            if old is not None and old.shape[2] == n:
                continue
            vdtype = torch.int8 if self._is_int8(i) else self.dtype
            k = torch.zeros(B, kv, n, D, dtype=vdtype, device=self.device)  # zeros: masked slots stay finite
            v = torch.zeros(B, kv, n, D, dtype=vdtype, device=self.device)
            if old is not None:
                m = old.shape[2]
                k[:, :, :m] = old
                v[:, :, :m] = self.v[i]
            self.k[i], self.v[i] = k, v
            if self._is_int8(i):
                ks = torch.zeros(B, kv, n, dtype=torch.float32, device=self.device)
                vs = torch.zeros(B, kv, n, dtype=torch.float32, device=self.device)
                if old is not None:
                    ks[:, :, :m] = self.k_scale[i]
                    vs[:, :, :m] = self.v_scale[i]
                self.k_scale[i], self.v_scale[i] = ks, vs
        self.capacity = capacity

    def nbytes(self, layers: str = "all") -> int:
        """Bytes held by the buffers: layers = "all" | "global" | "chunked"."""
        total = 0
        for i in range(self.num_layers):
            if layers == "global" and self.chunks[i] is not None or layers == "chunked" and self.chunks[i] is None:
                continue
            for t in (self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def slots(self, layer: int) -> int:
        """Positions layer `layer` can hold per row (its buffer length)."""
        return self.k[layer].shape[2]

    def positions_held(self, layer: int, row: int = 0) -> int:
        """Positions of row `row` that layer `layer` currently keeps (and attends to next)."""
        n, c = self.lengths[row], self.chunks[layer]
        return n if c is None else (0 if n == 0 else (n - 1) % c + 1)

    # ----- rows ---------------------------------------------------------------------------------
    def select(self, start: int = 0, count: int | None = None) -> "KVCache":
        """The next forward covers rows start … start+count-1 (its batch dimension)."""
        count = self.batch_size - start if count is None else count
        if start < 0 or count < 1 or start + count > self.batch_size:
            raise ValueError(f"rows {start}…{start + count - 1} outside the cache's {self.batch_size} rows")
        self._row0, self._rows = start, count
        return self

    @property
    def selected_rows(self) -> int:
        """How many rows the next forward covers (see select)."""
        return self._rows

    @property
    def next_position(self) -> int | torch.Tensor:
        """Next position of the selected rows: an int when they agree, else a LongTensor [rows]."""
        lens = self.lengths[self._row0:self._row0 + self._rows]
        if all(n == lens[0] for n in lens):
            return lens[0]
        return torch.tensor(lens, dtype=torch.long, device=self.device)

    def reset(self, rows: int | list[int] | None = None) -> None:
        """Forget the contents of some rows (default all). Buffers are reused, not freed."""
        rows = range(self.batch_size) if rows is None else ([rows] if isinstance(rows, int) else rows)
        for r in rows:
            self.lengths[r] = 0

    def copy_row(self, src: int, dst: int) -> None:
        """Move a sequence from row src to row dst (continuous batching keeps live rows contiguous)."""
        if src == dst:
            return
        n = self.lengths[src]
        for i in range(self.num_layers):
            m = n if self.chunks[i] is None else self.k[i].shape[2]
            for t in (self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]):
                if t is not None:
                    t[dst, :, :m] = t[src, :, :m]
        self.lengths[dst] = n

    def truncate(self, row: int, length: int) -> bool:
        """Drop positions ≥ length of a row (to reuse a shared prompt prefix). Returns False, changing
        nothing, when a chunked layer has already overwritten part of the chunk holding `length`."""
        n = self.lengths[row]
        if not 0 <= length <= n:
            raise ValueError(f"cannot truncate row {row} of length {n} to {length}")
        for c in set(self.chunks) - {None}:
            if n > (length // c + 1) * c:
                return False
        self.lengths[row] = length
        return True

    # ----- the model-side protocol -------------------------------------------------------------
    def begin(self, positions: torch.Tensor) -> None:
        """Plan one forward over the selected rows at `positions` ([T] shared, or [rows, T])."""
        self._plan = self.plan(positions, self._row0, self._rows)

    def plan(self, positions: torch.Tensor, row0: int, rows: int) -> dict:
        """The plan of `begin` for rows row0 … row0+rows-1, returned instead of kept: a step that runs
        several groups of rows through one forward (herd.inference.batched: decode rows and prompt
        segments) plans each group, passes its plan to `attend`, and hands it to `end` afterwards.
        Plans of disjoint rows made before the forward stay valid through it."""
        r0, B = row0, rows
        lens = self.lengths[r0:r0 + B]
        T = positions.shape[-1]
        if positions.dim() == 2 and positions.shape[0] != B:
            raise ValueError(f"positions has {positions.shape[0]} rows but the cache has {B} rows selected")
        starts = [int(positions[0])] * B if positions.dim() == 1 else positions[:, 0].tolist()
        if starts != lens:
            raise ValueError(f"positions {starts} do not continue the cache (row lengths {lens}); "
                             "positions must follow the tokens already cached")
        same = all(n == lens[0] for n in lens)
        if T > 1 and not same:
            raise ValueError("rows at different positions can only advance one token at a time")
        need = max(lens) + T
        if need > self.capacity:
            self.reserve(max(need, min(2 * self.capacity, need + 65536)))
        plan: dict = {"T": T, "same": same, "start": lens[0], "rows": slice(r0, r0 + B)}
        if T == 1:  # decode: write each row's token at its own index, then attend over [0, len]
            if not same:
                plan["row_idx"] = torch.arange(r0, r0 + B, device=self.device)
            plan["keys"], plan["ragged"] = {}, {}
            for c in set(self.chunks):
                idx = lens if c is None else [n % c for n in lens]
                plan[c] = self._decode_plan(idx, same)
                # keys each row attends to; padding every row to the longest would more than double them
                plan["keys"][c] = [i + 1 for i in idx]
                plan["ragged"][c] = 2 * (sum(idx) + B) < B * (max(idx) + 1)
        return plan

    def _decode_plan(self, idx: list[int], same: bool) -> tuple:
        """(write index per row, keys to attend, mask or None, the shared index) for one layer kind."""
        hi = max(idx) + 1
        if same:
            return None, hi, None, idx[0]
        t = torch.tensor(idx, dtype=torch.long, device=self.device)
        mask = None
        if min(idx) + 1 != hi:  # ragged rows: key j is visible to row b iff j <= idx[b]
            keep = torch.arange(hi, device=self.device)[None, :] <= t[:, None]
            mask = torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, float("-inf"))
            mask = mask[:, None, None, :]  # [B, 1, 1, hi]
        return t, hi, mask, idx[0]

    def end(self, plan: dict | None = None) -> None:
        """Advance the rows of `plan` (default: begin's) past the tokens the forward stored."""
        p = self._plan if plan is None else plan
        rows = p["rows"]
        for r in range(rows.start, rows.stop):
            self.lengths[r] += p["T"]
        if plan is None:
            self._plan = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               chunk: int | None = None, plan: dict | None = None) -> torch.Tensor:
        """q [B, h, T, D], k/v [B, kv, T, D] (rotated, normed, scaled) → attention output [B, h, T, D]
        over the cached positions and the new ones; stores k/v. plan: one from `plan` (default: begin's)."""
        p = self._plan if plan is None else plan
        if p["T"] == 1:
            return self._decode(layer, q, k, v, p, chunk)
        if chunk is None:
            return self._prefill_global(layer, q, k, v, p)
        return self._prefill_chunked(layer, q, k, v, p, chunk)

    # ----- writing and reading ------------------------------------------------------------------
    def _write(self, layer: int, rows, index, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, kv, T, D] at `index` (a slice of positions, or per-row tensor for T = 1)."""
        if isinstance(index, torch.Tensor):  # one position per row (advanced indexing → [B, kv, D])
            k, v = k[:, :, 0], v[:, :, 0]
        dst = (rows, slice(None), index)
        if self._is_int8(layer):
            kq, ks = _quantize(k)
            vq, vs = _quantize(v)
            self.k[layer][dst], self.k_scale[layer][dst] = kq, ks
            self.v[layer][dst], self.v_scale[layer][dst] = vq, vs
        else:
            self.k[layer][dst] = k
            self.v[layer][dst] = v

    def _read_parts(self, layer: int, q: torch.Tensor, rows: slice, end: int, mask=None) -> list:
        """attention_lse of q over cached positions [0, end) of `rows` (in blocks when int8)."""
        K, V = self.k[layer], self.v[layer]
        if not self._is_int8(layer):
            return [attention_lse(q, K[rows, :, :end], V[rows, :, :end], mask=mask)]
        ks, vs = self.k_scale[layer], self.v_scale[layer]
        parts = []
        for a in range(0, end, self.block_size):
            b = min(end, a + self.block_size)
            # one mixed-dtype multiply per tensor: int8 values × scales in the compute dtype
            kb = torch.mul(K[rows, :, a:b], ks[rows, :, a:b, None].to(self.dtype))
            vb = torch.mul(V[rows, :, a:b], vs[rows, :, a:b, None].to(self.dtype))
            parts.append(attention_lse(q, kb, vb, mask=None if mask is None else mask[..., a:b]))
        return parts

    def _decode(self, layer, q, k, v, p, chunk):
        idx, hi, mask, first = p[chunk]
        rows = p["rows"]
        if p["same"]:
            self._write(layer, rows, slice(first, first + 1), k, v)
        else:
            self._write(layer, p["row_idx"], idx, k, v)
        if self._native_decode is not None and not self._is_int8(layer):
            D = self.head_dim
            if mask is None and q.shape[0] == 1:  # one row: its query heads [h, D] over keys [kv, hi, D]
                r = rows.start
                out = self._native_decode(q.view(-1, D), self.k[layer][r, :, :hi], self.v[layer][r, :, :hi], D ** -0.5)
                return out.view(q.shape)
            if mask is not None and p["ragged"][chunk]:  # rows of very different lengths: each over its own
                K, V, out = self.k[layer], self.v[layer], torch.empty_like(q)  # keys, no padding to the longest
                for b, (r, n) in enumerate(zip(range(rows.start, rows.stop), p["keys"][chunk])):
                    out[b, :, 0] = self._native_decode(q[b, :, 0], K[r, :, :n], V[r, :, :n], D ** -0.5)
                return out
        return merge_attention(self._read_parts(layer, q, rows, hi, mask))

    def _prefill_global(self, layer, q, k, v, p):
        s, T, rows = p["start"], p["T"], p["rows"]
        if s == 0:
            out = causal_attention(q, k, v)
        else:
            parts = self._read_parts(layer, q, rows, s)
            parts.append(attention_lse(q, k, v, causal=True))
            out = merge_attention(parts)
        self._write(layer, rows, slice(s, s + T), k, v)
        return out

    def _prefill_chunked(self, layer, q, k, v, p, chunk):
        s, T, rows = p["start"], p["T"], p["rows"]
        off = s % chunk
        first = min(T, chunk - off)  # new tokens inside the chunk the cache is in
        qa, ka, va = q[:, :, :first], k[:, :, :first], v[:, :, :first]
        if off:
            parts = self._read_parts(layer, qa, rows, off)
            parts.append(attention_lse(qa, ka, va, causal=True))
            outs = [merge_attention(parts)]
        else:
            outs = [causal_attention(qa, ka, va)]
        if first < T:  # the rest starts on a chunk boundary: no cached keys involved
            outs.append(chunked_causal_attention(q[:, :, first:], k[:, :, first:], v[:, :, first:], chunk, s + first))
        # keep only the positions of the last chunk touched (read above before overwriting)
        last = max(s, (s + T - 1) // chunk * chunk)
        j = last - s
        self._write(layer, rows, slice(last % chunk, last % chunk + T - j), k[:, :, j:], v[:, :, j:])
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class PrefixStore:
    """KV rows of finished sequences, kept so a later prompt that starts with the same tokens (a chat's
    next turn resends the whole conversation) prefills only what is new.

        store = PrefixStore(max_bytes=256 << 20)
        store.save(cache, row, tokens, image_features)      # a sequence finished: keep its row
        m = store.restore(cache, row, prompt, image_features, image_token)   # → prompt tokens now cached

    An entry is one row copied out of a KVCache: every layer's keys/values for the row's first n
    positions (global layers), or the used part of the row's ring (chunked layers: the positions of
    the chunk holding position n-1, which sit in slots 0 … (n-1) % chunk),
    keyed by the n token ids it holds. Entries are evicted least-recently-used first once their
    bytes pass `max_bytes`; a row larger than the budget is not kept.

    What can be reused (iRoPE). A prompt sharing m0 tokens with an entry may reuse m ≤ m0 of them
    (and at most len(prompt) − 1: the last prompt token runs through the model to give the first
    logits). Global (NoPE) layers keep every position, so any m works. A chunked layer keeps only
    the chunk of position n−1; continuing from m needs positions chunk_start(m) … m−1, which are
    still in the ring when m is in the same chunk as n−1 (n ≤ (m // c + 1)·c), and which are
    nothing at all when m is a chunk boundary. Otherwise m drops to the boundary m // c · c.
    Image tokens: their keys depend on the image, not the token id, so the prompt's image features
    must equal the entry's over the reused span (else m stops before the first image token).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.entries: "collections.OrderedDict[int, dict]" = collections.OrderedDict()  # LRU first
        self.nbytes = 0
        self._ids = itertools.count()
        self.hits = 0  # restores that reused ≥ 1 token
        self.reused_tokens = 0
        self.queries = 0  # restore calls (prompts looked up)

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, cache: KVCache, row: int, tokens: list[int], image_features: torch.Tensor | None = None) -> bool:
        """Keep row `row` of `cache`, which holds `tokens` (its lengths[row] first). → kept or not."""
        n = cache.lengths[row]
        if n == 0 or self.max_bytes == 0:
            return False
        if len(tokens) < n:
            raise ValueError(f"row {row} holds {n} positions but only {len(tokens)} tokens were given")
        layers, size = [], 0
        for i in range(cache.num_layers):
            m = cache.positions_held(i, row)  # global: all n; chunked: slots 0 … (n-1) % c, the last chunk
            t = [None if x is None else x[row, :, :m].clone() for x in
                 (cache.k[i], cache.v[i], cache.k_scale[i], cache.v_scale[i])]
            size += sum(x.numel() * x.element_size() for x in t if x is not None)
            layers.append(t)
        if size > self.max_bytes:
            return False
        key = tuple(tokens[:n])
        for eid, e in list(self.entries.items()):  # the same tokens again: keep the newer copy only
            if e["tokens"] == key:
                self._drop(eid)
        self.entries[next(self._ids)] = {"tokens": key, "layers": layers, "nbytes": size, "features": image_features}
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))
        return True

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        self.entries.clear()
        self.nbytes = 0

    def _drop(self, eid: int) -> None:
        self.nbytes -= self.entries.pop(eid)["nbytes"]

    @staticmethod
    def _common(a: tuple, b: list[int]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def usable(self, entry_len: int, m: int, chunks: list[int | None]) -> int:
        """The largest m' ≤ m that an entry of entry_len positions can continue from (iRoPE, above)."""
        for c in sorted({c for c in chunks if c is not None}):
            if m % c and entry_len > (m // c + 1) * c:
                m = m // c * c
        return m

    def restore(self, cache: KVCache, row: int, prompt: list[int], image_features: torch.Tensor | None = None,
                image_token: int | None = None) -> int:
        """Fill row `row` of `cache` with the longest reusable prefix of `prompt` → its length (0: none;
        the row is then reset)."""
        self.queries += 1
        cache.reset(row)
        best, best_m = None, 0
        for eid, e in self.entries.items():
            if e["tokens"][0] != prompt[0]:
                continue
            m = min(self._common(e["tokens"], prompt), len(prompt) - 1)
            m = self._image_limit(e, prompt, m, image_features, image_token)
            m = self.usable(len(e["tokens"]), m, cache.chunks)
            if m > best_m:
                best, best_m = eid, m
        if best is None:
            return 0
        e = self.entries[best]
        self.entries.move_to_end(best)
        cache.reserve(best_m + 1)
        for i, saved in enumerate(e["layers"]):
            m = best_m if cache.chunks[i] is None else min(saved[0].shape[1], cache.k[i].shape[2])
            for dst, src in zip((cache.k[i], cache.v[i], cache.k_scale[i], cache.v_scale[i]), saved):
                if dst is not None:
                    dst[row, :, :m] = src[:, :m]
        cache.lengths[row] = best_m
        self.hits += 1
        self.reused_tokens += best_m
        return best_m

    @staticmethod
    def _image_limit(e: dict, prompt: list[int], m: int, features, image_token) -> int:
        """m, or the position of the first image token in prompt[:m] when the images differ."""
        if image_token is None:
            return m
        try:
            first = prompt.index(image_token, 0, m)
        except ValueError:
            return m  # no image tokens in the reused span
        k = prompt[:m].count(image_token)
        mine, theirs = features, e["features"]
        if (mine is not None and theirs is not None and mine.shape[0] >= k and theirs.shape[0] >= k
                and (mine is theirs or torch.equal(mine[:k], theirs[:k]))):
            return m
        return first
