"""The engine's step at batch B: one token for each of B sequences, each at its own position (and
the step's prompt segments), through a model prepared for inference (herd.inference.fast), with the
per-step work hoisted and the MoE glue fused — what herd.inference.single does for batch 1.

    decoder = BatchDecoder.for_model(prepared)       # None where it does not apply
    logits = decoder(ids, cache)                     # ids [B, 1], the cache's selected rows → [B, vocab]
    logits = decoder.step(cache, decode, segments)   # decode rows 0…n-1 and prompt segments, one forward

herd.Engine holds one: each engine step is one `step` — the running rows' next tokens and the step's
prompt segments (chunked prefill) together, so every weight is read once per step, not once for the
decode rows and again for each prompt (a 128-token prompt alone reads nearly every expert too).

Why. At B = 32 on the 552M / 123M-active benchmark model the step streams ≈ 960 MB of weights (the
routed experts: 32 tokens over 16 experts touch nearly all of them), and the general forward
(nn.Module calls, herd.model.moe's dispatch) spent about 30% of the step on small ops around the
products (benchmarks/serve.py --profile-engine, BENCHMARKS.md "Serving"): per layer the RoPE angles
and the NoPE temperature were recomputed, and per expert the rows were sliced, padded to a bucket,
run through gate|up, chunked, passed through silu and mul, then down, unpadded, and concatenated —
106 expert calls per step, ~8 ops each. This step computes the same maths with:
  * per step, once: positions [B], the RoPE rotation [B, D/2] (complex) and the NoPE query scale
    [B]; the cache's write indices and masks (KVCache.begin, as before);
  * per layer: RMSNorm through `torch.rms_norm`, q and k rotated together (one complex product)
    and QK-normed together, kernels called directly (no module calls);
  * per MoE layer: one routing over all B rows (top-1 by argmax), one stable sort by expert, one
    gather of the gate-scaled rows; then per expert with rows only its two products (on views of
    the sorted rows: no padding or copies up to 4 rows), the shared expert's gate|up and every expert's gate|up
    concatenated so that silu(gate)·up runs once for the whole layer, and one index_add of the
    routed outputs onto the shared expert's.
Attention stays the cache's (plan / attend / end), per group: the decode rows together (each over
its own cached positions; a mask hides the longer rows' extra keys), each prompt segment over its
row (cached prefix + causal, chunk rings), int8 keys unchanged. Expert products over more than 4
rows (prompt tokens) are padded to herd.inference.fast.bucket's row counts, as KernelExperts does.

Measured on the shared 2-core Xeon (1 thread, loaded, provisional; BENCHMARKS.md, "Serving"):
decode at batch 32 1.05–1.34× the general forward (three runs, by CPU time); the 32-stream load
round (32 × 128-token prompts, 128 new tokens each) 1.18× by wall clock, 1.14× by CPU time.

Exactness. The roundings are the general path's (same casts in the same places), so greedy tokens
agree and logits agree to float32 rounding: an expert product over a different number of rows
may sum in another order. tests/inference/test_batched.py checks it against the general forward
and the full model at rows on different positions, across chunk boundaries, decode rows and prompt
segments in one forward, and through herd.Engine with rows joining and leaving mid-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.inference.fast import FastMoE, InferenceLlama4, KernelExperts, bucket
from herd.inference.single import rms_norm
from herd.model.attention import temperature_scale
from herd.model.rope import rope_angles, text_inv_freq


def _kernel(m):
    """(the product x [M, in] → [M, out], bias or None) of a FastLinear / QuantLinear."""
    return getattr(m, "kernel", m), getattr(m, "bias", None)


def _silu_mul(gate_up: torch.Tensor, inner: int) -> torch.Tensor:
    """gate_up [N, 2I] → silu(gate) · up [N, I], as herd.model.moe.SwiGLU computes it."""
    return F.silu(gate_up[:, :inner]) * gate_up[:, inner:]


class BatchDecoder:
    """decoder(ids [B, 1], cache) → logits [B, vocab] for a model prepared for inference."""

    @classmethod
    def applies(cls, model) -> bool:
        """The step runs prepared CPU models (any top-k routing, dense and MoE layers)."""
        return isinstance(model, InferenceLlama4) and model.device.type == "cpu" and all(
            isinstance(ff.experts, KernelExperts) for ff in model.moe_layers())

    @classmethod
    def for_model(cls, model) -> "BatchDecoder | None":
        """The step for `model`, or None where it does not apply (the general forward runs)."""
        return cls(model) if cls.applies(model) else None

    def __init__(self, model):
        if not self.applies(model):
            raise ValueError("the batched decode step runs a CPU model prepared for inference "
                             "(herd.inference.optimize_for_inference(model))")
        lm = model.language_model
        tc = model.config.text
        self.embed = lm.model.embed_tokens.weight
        self.norm_w, self.eps = lm.model.norm.weight, tc.rms_norm_eps
        self.lm_head = _kernel(lm.lm_head)
        self.inv_freq = text_inv_freq(tc.head_dim, tc.rope_theta, tc.rope_scaling)  # [D/2] float32
        self.n_heads, self.n_kv, self.head_dim = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
        self.temp = (tc.floor_scale, tc.attn_scale)
        self.layers = []
        for layer in model.layers:
            a, ff = layer.self_attn, layer.feed_forward
            moe = ff if isinstance(ff, FastMoE) else None
            mlp = moe.shared_expert if moe is not None else ff
            L = dict(ln=(layer.input_layernorm.weight, layer.input_layernorm.eps), qkv=_kernel(a.qkv_proj),
                     rope=a.use_rope, qk_norm=a.qk_norm, temp=a.temperature_tuning, chunk=a.chunk,
                     o=_kernel(a.o_proj), post_ln=(layer.post_attention_layernorm.weight,
                                                   layer.post_attention_layernorm.eps),
                     gate_up=_kernel(mlp.gate_up), down=_kernel(mlp.down_proj),
                     inner=mlp.down_proj.in_features, moe=None)
            if moe is not None:
                ex = moe.experts
                if ex.inner != L["inner"]:  # one silu·mul for shared + routed needs one inner size
                    raise ValueError(f"shared expert inner size {L['inner']} ≠ routed experts' {ex.inner}")
                L["moe"] = dict(router=_kernel(moe.router), top_k=moe.top_k, n_experts=ex.num_experts,
                                bias=moe.expert_bias if bool(moe.expert_bias.any()) else None,
                                gate_up=list(ex.gate_up), down=list(ex.down))
            self.layers.append(L)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        B = ids.shape[0]
        if ids.shape != (B, 1) or cache.selected_rows != B:
            raise ValueError(f"the batched step takes one token per selected cache row: ids {tuple(ids.shape)}, "
                             f"{cache.selected_rows} rows selected")
        start = cache.next_position
        positions = (start.view(B, 1) if isinstance(start, torch.Tensor)
                     else torch.full((B, 1), start, dtype=torch.long))  # [B, 1]
        cache.begin(positions)
        h = self._layers(self.embed[ids[:, 0]], positions.view(B), [(0, B, None)], cache)  # [B, H]
        cache.end()
        head, head_b = self.lm_head
        return head(rms_norm(h, self.norm_w, self.eps), head_b)  # [B, vocab]

    @torch.no_grad()
    def step(self, cache, decode: list[int], segments: list[tuple[int, list[int], torch.Tensor | None]],
             image_token: int | None = None) -> torch.Tensor:
        """One forward for the next token of decode rows 0 … n-1 (decode: their tokens) and for prompt
        segments in other rows (row, token ids, image features of the segment's image tokens or None)
        → logits [n + len(segments), vocab]: each decode row's, then each segment's last position's.

        Every product reads its weight once for all of it (continuous batching with chunked prefill,
        as vLLM and llama-server batch prompt tokens with decode tokens); attention runs per group —
        the decode rows together, each segment over its own row's cache.
        """
        n = len(decode)
        lens = cache.lengths
        tokens, positions, groups, plans = list(decode), [lens[r] for r in range(n)], [], []
        if n:
            plans.append(cache.plan(torch.tensor(positions).view(n, 1), 0, n))
            groups.append((0, n, plans[-1]))
        feats = []
        for row, ids, f in segments:
            a, s0 = len(tokens), lens[row]
            tokens += ids
            positions += range(s0, s0 + len(ids))
            plans.append(cache.plan(torch.arange(s0, s0 + len(ids)), row, 1))
            groups.append((a, len(tokens), plans[-1]))
            if f is not None:
                feats.append(f)
        ids_t = torch.tensor(tokens, device=self.embed.device)
        h = self.embed[ids_t]  # [N, H]
        if feats:  # image features replace the <|patch|> embeddings, in order (herd.model.llama4.Llama4.embed)
            h[ids_t == image_token] = torch.cat(feats).to(h.dtype)
        h = self._layers(h, torch.tensor(positions), groups, cache)
        for p in plans:
            cache.end(p)
        last = list(range(n)) + [b - 1 for _, b, _ in groups[1 if n else 0:]]
        head, head_b = self.lm_head
        return head(rms_norm(h[last], self.norm_w, self.eps), head_b)  # [n + len(segments), vocab]

    def _layers(self, h, positions, groups, cache):
        """The decoder layers on h [N, H] at positions [N]; groups: (first, end, cache plan or None for
        begin's) — a group of one-token rows (decode) when its plan has T == 1, else one row's prompt
        segment → h [N, H] before the final norm."""
        N = h.shape[0]
        cos, sin = rope_angles(positions, self.inv_freq)  # [N, D/2] float32, once per step
        rot = torch.complex(cos, sin)[:, None]  # [N, 1, D/2]: each pair (x0, x1) times cos + i·sin
        scale = temperature_scale(positions, *self.temp).view(N, 1, 1)  # NoPE query scale, float32
        nh, D = self.n_heads, self.head_dim
        for i, L in enumerate(self.layers):
            q, k, v = self._attention_in(h, L, rot, scale)  # [N, h, D], [N, kv, D], [N, kv, D]
            outs = []
            for a, b, plan in groups:
                if plan is None or plan["T"] == 1:  # rows a … b-1, one token each → [rows, h, 1, D]
                    o = cache.attend(i, q[a:b, :, None], k[a:b, :, None], v[a:b, :, None], None, L["chunk"], plan)
                    outs.append(o.view(b - a, nh * D))
                else:  # one row's b - a tokens → [1, heads, T, D]
                    qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
                    o = cache.attend(i, qs, ks, vs, None, L["chunk"], plan)
                    outs.append(o[0].transpose(0, 1).reshape(b - a, nh * D))
            o, o_b = L["o"]
            h = h + o(outs[0] if len(outs) == 1 else torch.cat(outs), o_b)
            x = rms_norm(h, *L["post_ln"])  # [N, H]
            h = h + (self._dense(x, L) if L["moe"] is None else self._moe(x, L))
        return h

    def _attention_in(self, h, L, rot, scale):
        """h [B, H] → q [B, h, D], k [B, kv, D], v [B, kv, D] as herd.model.attention.Attention.project
        computes them (RoPE in float32 as apply_rope, QK-norm, temperature), q and k together."""
        B = h.shape[0]
        nh, nkv, D = self.n_heads, self.n_kv, self.head_dim
        kern, bias = L["qkv"]
        qkv = kern(rms_norm(h, *L["ln"]), bias).view(B, nh + 2 * nkv, D)  # one product
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]
        if L["rope"]:
            pairs = torch.view_as_complex(qk.float().unflatten(-1, (-1, 2)))  # [B, h + kv, D/2]
            qk = torch.view_as_real(pairs * rot).flatten(-2).type_as(v)
        if L["qk_norm"]:
            qk = torch.rms_norm(qk.float(), (D,), eps=L["ln"][1]).type_as(v)
        q, k = qk[:, :nh], qk[:, nh:]
        if L["temp"]:
            q = (q * scale).to(v.dtype)
        return q, k, v

    @staticmethod
    def _dense(x, L):
        """A dense SwiGLU layer on x [B, H] → [B, H]."""
        (gu, gu_b), (dn, dn_b) = L["gate_up"], L["down"]
        return dn(_silu_mul(gu(x, gu_b), L["inner"]), dn_b)

    @staticmethod
    def _moe(x, L):
        """Shared expert + routed experts on x [B, H] → [B, H] (herd.model.moe.MoE's maths): route all
        rows at once, sort them by expert, one silu·mul for every gate|up output of the layer."""
        M = L["moe"]
        B, k = x.shape[0], M["top_k"]
        kern, bias = M["router"]
        logits = kern(x, bias)  # [B, E]
        select = logits if M["bias"] is None else logits + M["bias"].to(logits.dtype)
        top = select.argmax(-1, keepdim=True) if k == 1 else select.topk(k, dim=-1).indices  # [B, k]
        gates = torch.sigmoid(logits.gather(-1, top).float()).to(x.dtype)  # [B, k]: scales the expert input
        flat = top.view(-1)  # [B·k]
        order = torch.argsort(flat, stable=True)
        token_of = order if k == 1 else order // k  # source row of each sorted pair
        counts = torch.bincount(flat, minlength=M["n_experts"]).tolist()
        xs = x[token_of] * gates.view(-1, 1)[order]  # [B·k, H], grouped by expert
        used = [e for e, n in enumerate(counts) if n]
        (gu, gu_b), (dn, dn_b) = L["gate_up"], L["down"]
        parts = [gu(x, gu_b)]  # the shared expert's gate|up [B, 2I], then each used expert's [n_e, 2I]
        rows = xs.split([counts[e] for e in used])
        parts += [_product(M["gate_up"][e], r) for e, r in zip(used, rows)]
        act = _silu_mul(torch.cat(parts), L["inner"])  # [B + B·k, I], once for the layer
        acts = act.split([B] + [counts[e] for e in used])
        out = dn(acts[0], dn_b)  # the shared expert [B, H]
        ys = torch.cat([_product(M["down"][e], a) for e, a in zip(used, acts[1:])])  # [B·k, H]
        return out.index_add_(0, token_of, ys.to(out.dtype))


def _product(kernel, x: torch.Tensor) -> torch.Tensor:
    """An expert's product on its rows x [m, in] → [m, out]. Up to 4 rows (decode: 32 rows over 16
    experts give 1–4 each) as they are; more (prompt tokens) padded to herd.inference.fast.bucket's
    few row counts, as KernelExperts does, so oneDNN builds a bounded set of kernels."""
    m = x.shape[0]
    if m <= 4:
        return kernel(x)
    return kernel(F.pad(x, (0, 0, 0, bucket(m) - m)))[:m]
