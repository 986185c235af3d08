"""LongLLaMA: a LLaMA decoder whose memory layers attend to everything read before (Focused Transformer, FoT).

    import longllama
    model = longllama.load("ckpt/", dtype=torch.bfloat16)
    logits, cache = model(prompt_ids, use_cache=True)          # long prompt: memory + local window
    logits, cache = model(next_ids, cache=cache, use_cache=True)
    logits, _ = model(batch, cross_batch_range=3, packing=2)   # FoT training step

Where each FoT mechanism lives in this file:
- The memory layer's attention: one softmax over the local window and the memory. `plain_attention` writes it out;
  `memory_layer_attention` computes the same with one fused kernel per part (`attention_and_lse`), merged by their
  log-sum-exp (`merge_attention`). `mem_attention_grouping` bounds its workspace: `grouped_attention` runs it over
  a few heads and queries at a time.
- Cross-batch training: `cross_batch_attention`. A memory layer's queries also see all keys of the d batch
  elements before their own (`cross_batch_contexts` says how many), rotated as if at position 0.
- The memory: `MemoryCache`, one per memory layer. `MemoryCache.append` is the one way in, for a window read into
  memory (`Attention.forward`) and for an evicted local window (`LongLlama._evict`). Keys are stored rotated as
  if they stood at position 0 (unrotated), so a key means the same thing whenever it was read.
- The local window: `LocalCache`, one per layer. `LongLlama._evict` moves the whole window into memory at once
  when it would overflow; positions inside it are relative to its oldest slot (`LongLlama._window`).
- Long inputs: `LongLlama.forward` cuts them into windows of W tokens; the first L - `last_context_length` go to
  memory, the rest to the local window.
Beside this file: top-k memory (`topk.py`, a MemoryCache that attends to the K best entries only), quantized
weights (`quantize.py`), checkpoints and memory files (`checkpoint.py`), config checks (`checks.py`).
"""

import copy
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checks

# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LongLlamaConfig:
    """The keys of a LongLLaMA `config.json`. Defaults: the LongLLaMA-3B shapes, and, as in a plain LLaMA
    config.json, no memory layers (PRESETS["3b"] has them). checks.validate_config says what each may hold."""

    vocab_size: int = 32000
    hidden_size: int = 3200
    intermediate_size: int = 8640
    num_hidden_layers: int = 26
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # None: same as num_attention_heads (no grouped-query attention)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # Llama-3.1's {"rope_type": "llama3", ...}: see llama3_frequencies
    max_position_embeddings: int = 2048  # W: the local context window
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = 0
    mem_layers: list = field(default_factory=list)  # indices of the layers that have a memory
    mem_positionals: bool = True  # False: memory layers use no rotary embedding at all
    mem_dtype: str = "bfloat16"  # dtype memory keys and values are stored in
    mem_attention_grouping: Optional[tuple] = None  # (heads, queries) per memory-attention call, to bound peak memory
    # None: every memory-layer query attends to all of memory (LongLLaMA). K: only to K memory entries, as the FoT
    # paper's kNN memory did (topk.py): the K best-scoring ones ("exact"), or the best blocks of mem_block_size
    # entries ("blocks": ceil(K / mem_block_size) blocks per key/value head and call, chosen by bounds on their keys)
    mem_topk: Optional[int] = None
    mem_retrieval: str = "blocks"
    mem_block_size: int = 64
    # True: top-k memory's entries stay in host RAM (pinned on CUDA), only the block bounds on the compute device;
    # each call copies over the blocks it chose. Memory then grows with RAM, not with GPU memory.
    mem_on_host: bool = False
    # None: memory layers' logits as LongLLaMA computes them. N: log-n scaling at inference: a memory-layer query
    # that attends to n > N keys (its local ones, and memory's: all of it, or mem_topk entries) has its logits
    # multiplied by log(n) / log(N), so that its attention stays as sharp over a memory larger than any it trained
    # on, instead of spreading over the many similar keys a long memory holds (logn_scale). N: the keys a query
    # attended to in training, (d + 1) x the rows' length for cross-batch range d.
    mem_attention_logn: Optional[int] = None
    # tokens of a long input that stay in the local window instead of memory; None: 1024 (LongLLaMA's) capped at
    # the window, and the whole window without memory layers (where earlier tokens would be read into nothing)
    last_context_length: Optional[int] = None
    # null, or int8 / int4: the checkpoint stores its linear layers' weights quantized (quantize.py)
    quantization: Optional[str] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:  # no grouped-query attention
            self.num_key_value_heads = self.num_attention_heads
        checks.validate_config(self)
        if self.last_context_length is None:
            window = self.max_position_embeddings
            # LongLLaMA's 1024 for its 2048 window: half the window stays free for what is generated next, since
            # the whole local window is evicted when it overflows
            self.last_context_length = min(1024, window // 2) if self.mem_layers else window
        self.mem_layers = sorted(self.mem_layers)
        if self.mem_attention_grouping is not None:
            self.mem_attention_grouping = tuple(self.mem_attention_grouping)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_parameters(self) -> int:
        """The model's weights (a tied embedding counted once), from the sizes alone: so memory can be checked before
        anything is allocated."""
        hidden, ffn = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn + 2 * hidden  # wqkv, wo, MLP, two norms
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)  # embed and lm_head
        return embeddings + self.num_hidden_layers * layer + hidden  # and the final norm

    @property
    def rope_bytes(self) -> int:
        """The float32 rotary tables' bytes (cos, sin: W x head_dim)."""
        return 2 * self.max_position_embeddings * self.head_dim * 4

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "LongLlamaConfig":
        """Build from a (Hugging Face) config dict: unknown keys are ignored with a warning, unsupported values raise."""
        config = cls(**checks.config_values(values, overrides, {f.name for f in fields(cls)}))
        if values.get("head_dim", config.head_dim) != config.head_dim:
            raise ValueError(f"config: head_dim={values['head_dim']} differs from hidden_size / num_attention_heads")
        return config

    @classmethod
    def from_json(cls, path, **overrides) -> "LongLlamaConfig":
        return cls.from_dict(checks.read_config_json(path), **overrides)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["mem_attention_grouping"] = list(self.mem_attention_grouping) if self.mem_attention_grouping else None
        return values


# Named shapes, for training from scratch and benchmarks (vocab_size is set from the tokenizer when training).
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=256, mem_layers=[2], last_context_length=128, vocab_size=4096),
    # tiny, deeper: the CPU reproduction's shape (context_scaling.py), whose memory layer 4 gets keys built by
    # four layers of attention, the depth its copying by content needs
    "tiny6": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6, num_attention_heads=4,
                  max_position_embeddings=256, mem_layers=[4], last_context_length=128, vocab_size=4096),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=1024, mem_layers=[4, 8], last_context_length=512),
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               max_position_embeddings=2048, mem_layers=[6, 12, 18], last_context_length=1024),
    "code-7b": dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-5,
                    mem_layers=[8, 16, 24], last_context_length=1024),
}


# ----------------------------------------------------------------------------------------------------------------------
# Rotary embeddings (Hugging Face "rotate half" layout)


def rope_tables(head_dim: int, length: int, theta: float, scaling: Optional[dict] = None, device=None):
    """cos and sin, each [length, head_dim], for positions 0 .. length-1 (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # frequencies repeated twice: [length, head_dim]
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq, scaling: dict):
    """Llama-3.1's rope_scaling, which stretches its 8k-token training to 128k: frequencies that turn less than once
    in the original context (wavelength > context / low_freq_factor) are divided by `factor`, those that turn often
    (wavelength < context / high_freq_factor) are kept, and those between are blended, linearly in 1 / wavelength."""
    context = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    turns = context * inv_freq / (2 * math.pi)  # turns in the original context: context / wavelength
    kept = ((turns - low) / (high - low)).clamp(0, 1)  # 0: divided by factor, 1: kept
    return inv_freq * (kept + (1 - kept) / factor)


def logn_scale(trained_keys: int, keys_seen: torch.Tensor) -> torch.Tensor:
    """max(1, log(n) / log(trained_keys)) for each n of keys_seen: the factor log-n scaling multiplies a query's
    logits by when it attends to n keys (mem_attention_logn). Softmax over n keys whose logits are about equal puts
    1/n on each, so a key must outscore them by log(n) to keep its weight: scaling the logits by log n keeps a
    margin learnt over trained_keys keys as decisive over more (as Qwen's logn attention does for long inputs)."""
    return (keys_seen.double().log() / math.log(trained_keys)).clamp(min=1).float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x [..., T, D] to the positions whose tables are cos, sin [T, D]. Passing -sin rotates back."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The memory layer's attention: one softmax over the local window and the memory


@dataclass
class Keys:
    """Keys and values that a layer's queries attend to (the local window, or memory), and which of them each sees."""

    keys: torch.Tensor  # [B, G, S, D]: G key/value heads
    values: torch.Tensor
    visible: torch.Tensor  # bool, broadcastable to [B, G, R, T, S]: which keys each of the R x T queries of a head sees
    # True: no key is padding, so `visible` is only the causal rule (the local window) or every key (memory): the
    # kernels apply it themselves or need no mask
    unpadded: bool = False
    # True: attended by the formula, not a kernel call: a compiled decode step's local slots (the compiler fuses
    # the formula into a few loops), and exact top-k memory
    by_formula: bool = False
    # [B, G, R, T, S] float32 q.k / sqrt(D), where choosing the keys computed them (exact top-k): the formula reuses
    # them, in float32, rather than multiplying again
    scores: Optional[torch.Tensor] = None


def plain_attention(q, local: Keys, memory: Optional[Keys]):
    """The memory layer's attention written out: one softmax over the local window's and memory's logits.

    q: [B, G, R, T, D] (R query heads share each of the G key/value heads). Returns [B, G, R, T, D]. The softmax runs
    in float32; masked logits get the lowest float, so that a query with nothing visible (padding) yields a finite,
    ignored output. It holds [T, S] logits per head: memory_layer_attention computes the same without them.
    """
    parts = [local] if memory is None else [local, memory]
    logits = []
    for part in parts:
        scores = torch.einsum("bgrtd,bgsd->bgrts", q, part.keys.to(q.dtype)).div_(math.sqrt(q.shape[-1]))
        logits.append(scores.masked_fill_(~part.visible, torch.finfo(scores.dtype).min))  # [B, G, R, T, S]
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = 0
    for p, part in zip(probs.split([s.shape[-1] for s in logits], dim=-1), parts):
        out = out + torch.einsum("bgrts,bgsd->bgrtd", p, part.values.to(q.dtype))
    return out


def memory_layer_attention(q, local: Keys, memory: Optional[Keys]):
    """`plain_attention` through fused kernels: one call for the local window, one for memory, merged by their
    log-sum-exp. No [T, S] logits are ever held, so the workspace is bounded by the window, not by the memory.

    q: [B, G, R, T, D]. Returns [B, G, R, T, D].
    """
    out, lse = attention_and_lse(q, local, stacked=q.shape[3] == 1)
    if memory is not None:
        out, lse = merge_attention(out, lse, *attention_and_lse(q, memory, stacked=True))
    return out.to(q.dtype)


def attention_and_lse(q, part: Keys, stacked: bool):
    """softmax(q k^T / sqrt(D), masked) v over one part's keys, and its log-sum-exp per query.

    q: [B, G, R, T, D]. Returns out [B, G, R, T, D] and lse [B, G, R, T] (float32, -inf for a query that sees no
    key). `stacked`: the R query heads of a key/value head go to the kernel as R*T queries of that head, so the keys
    are read in place, never repeated (memory, or a single query); else as [B, R*G, T, D] against repeated keys,
    which lets a whole window use the kernel's own causal mask.
    """
    batch_size, kv_heads, rep, length, head_dim = q.shape
    keys, values, visible = part.keys, part.values, part.visible
    if stacked:
        q_part, visible = q.reshape(batch_size, kv_heads, rep * length, head_dim), visible.flatten(2, 3)
    else:
        q_part, visible = q.reshape(batch_size, kv_heads * rep, length, head_dim), visible.flatten(1, 2)
        if rep > 1:  # grouped-query attention: repeat the key/value heads of the window (small)
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    # a causal mask ending at the last key is the kernel's own; a single query of an unpadded window sees every key
    causal = part.unpadded and not stacked and 1 < length == keys.shape[2]
    mask = None if part.unpadded and (stacked or causal or length == 1) else visible  # [B, X, Q, S]
    scale = 1 / math.sqrt(head_dim)
    if part.by_formula:  # the softmax in float32
        if part.scores is None:  # products in the compute dtype, as the kernels take them
            # keys @ q^T, not q @ keys^T: a CPU matmul copies a transposed slice of the cache, not a plain one
            scores = (keys.to(q.dtype) @ q_part.transpose(-1, -2)).transpose(-1, -2).float() * scale  # [B, X, Q, S]
            values = values.to(q.dtype)
        else:  # the float32 scores the keys were chosen by, and float32 products after them
            scores, values = part.scores.flatten(2, 3) if stacked else part.scores.flatten(1, 2), values.float()
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = scores.logsumexp(-1)
        out, mask = ((scores - lse.unsqueeze(-1)).exp().to(values.dtype) @ values).to(q.dtype), visible
    elif q.is_cuda:
        out, lse = cuda_attention_and_lse(q_part, keys, values, mask, causal, scale)
    else:
        bias = None if mask is None else additive_mask(mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_part, keys, values, is_causal=causal, attn_mask=bias, scale=scale)
    if mask is not None:  # a query that sees nothing (padding): output 0, and a weight of nothing in merges
        blind = ~mask.any(-1)
        out, lse = out.masked_fill(blind.unsqueeze(-1), 0), lse.masked_fill(blind, float("-inf"))
    return out.view(q.shape), lse.float().view(q.shape[:-1])


def additive_mask(mask, dtype):
    """A bool mask as the kernels take it: 0 where a key is seen, -inf where it is not."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Two attention results over disjoint key sets, merged into the one softmax over their union.

    Each output is weighted by its share of the total probability mass, exp(lse - total lse). A query that sees
    nothing in either set (padding) has -inf twice: its output becomes 0, finite and ignored.
    """
    total = torch.logaddexp(lse_a, lse_b).clamp(min=torch.finfo(torch.float32).min)
    weight_a, weight_b = (lse_a - total).exp().unsqueeze(-1), (lse_b - total).exp().unsqueeze(-1)
    return out_a.float() * weight_a + out_b.float() * weight_b, total


def cuda_attention_and_lse(q, keys, values, mask, causal: bool, scale: float):
    """The CUDA kernels: flash attention (16-bit, no mask) or memory-efficient attention (any mask, float32).

    Both need head_dim a multiple of 8 (LongLLaMA-3B has 100): zero columns are exact (they add nothing to
    q.k, and the output's padded columns are dropped). The efficient kernel wants its bias 16-aligned in the
    key dimension and pads its lse to blocks of 32 queries.
    """
    head_dim, queries, key_count = q.shape[-1], q.shape[2], keys.shape[2]
    pad = -head_dim % 8
    if pad:
        q, keys, values = (F.pad(x, (0, pad)) for x in (q, keys, values))
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, keys, values, 0.0, causal, False,
                                                                        scale=scale)[:2]
    else:
        bias = None
        if mask is not None:
            bias = F.pad(additive_mask(mask, q.dtype), (0, -key_count % 16))[..., :key_count]
            bias = bias.expand(q.shape[0], q.shape[1], queries, -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, keys, values, bias, True, 0.0, causal,
                                                                           scale=scale)[:2]
        lse = lse[..., :queries]
    return out[..., :head_dim], lse


ATTENTION_KERNELS = {"fused": memory_layer_attention, "plain": plain_attention}


def grouped_attention(q, local: Keys, memory: Optional[Keys], grouping, attend=memory_layer_attention):
    """`attend` over at most `grouping` = (heads, queries) at a time: mem_attention_grouping, which bounds the
    workspace and changes no output. A group holds whole key/value heads (all query heads that share them).

    q: [B, G, R, T, D]. Of the local window, a group of queries sees the keys up to its last query: the keys after it
    are cut off, and its causal mask then ends at its last key as a whole window's does. Memory is seen whole.
    """
    kv_heads, rep, length = q.shape[1:4]
    group_heads, group_queries = max(1, grouping[0] // rep), grouping[1]
    out = torch.empty_like(q)
    for g in range(0, kv_heads, group_heads):
        for t in range(0, length, group_queries):
            heads, queries = slice(g, g + group_heads), slice(t, t + group_queries)
            seen = local.keys.shape[2] - length + min(queries.stop, length)  # keys up to the part's last query
            local_part = replace(local, keys=local.keys[:, heads, :seen], values=local.values[:, heads, :seen],
                                 visible=_mask_part(local.visible, heads, queries)[..., :seen])
            memory_part = None if memory is None else replace(
                memory, keys=memory.keys[:, heads], values=memory.values[:, heads],
                visible=_mask_part(memory.visible, heads, queries),
                scores=None if memory.scores is None else memory.scores[:, heads, :, queries])
            out[:, heads, :, queries] = attend(q[:, heads, :, queries], local_part, memory_part)
    return out


def _mask_part(visible, heads: slice, queries: slice):
    """A mask [B, G or 1, R or 1, T or 1, S] narrowed to a group's key/value heads and queries, where it has them."""
    every = slice(None)
    return visible[:, heads if visible.shape[1] > 1 else every, :, queries if visible.shape[3] > 1 else every]


# ----------------------------------------------------------------------------------------------------------------------
# Cross-batch attention: FoT training


def cross_batch_attention(q, k, k_first, v, cross_batch_range: int, stepping: bool = False, packing: int = 1):
    """FoT training attention of a memory layer over a batch [B, ...] of consecutive document pieces.

    Queries of element b see their own keys (`k`, standard positions, causal) and all keys of elements
    b-1 .. b-d (`k_first`, rotated as if at position 0, no causal mask), d = cross_batch_range: earlier pieces of
    the same document are the positives, other documents the negatives. No wrap-around below index 0.
    q: [B, H, T, D]; k, k_first, v: [B, Hkv, T, D]. Returns [B, H, T, D].
    """
    batch_size, _, length, _ = q.shape
    # element b's view of element b-j is the batch rolled by j: [B, Hkv, d*T, D]
    shifts = range(1, cross_batch_range + 1)
    other_keys = torch.cat([k_first[:, :, :0]] + [k_first.roll(j, dims=0) for j in shifts], dim=2)
    other_values = torch.cat([v[:, :, :0]] + [v.roll(j, dims=0) for j in shifts], dim=2)
    contexts = cross_batch_contexts(batch_size, cross_batch_range, stepping, packing, q.device)
    shift_of_key = torch.arange(1, cross_batch_range + 1, device=q.device).repeat_interleave(length)  # [d*T]: j
    other_visible = shift_of_key[None, :] < contexts[:, None]  # [B, d*T]: element b sees b-j while j < contexts[b]
    own_visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()  # [T, T]: causal
    visible = torch.cat([own_visible.expand(batch_size, 1, length, length),
                         other_visible[:, None, None, :].expand(-1, 1, length, -1)], dim=-1)  # [B, 1, T, (d+1)*T]
    return training_attention(q, torch.cat([k, other_keys], dim=2), torch.cat([v, other_values], dim=2), visible)


def cross_batch_contexts(batch_size: int, cross_batch_range: int, stepping: bool = False, packing: int = 1,
                         device=None):
    """[B]: how many contexts (batch elements b, b-1, ...) each element's memory-layer queries see, itself included.

    d + 1 for every element, or with `stepping`, element i of each pack of `packing` elements sees
    min(i * ceil((d+1) / max(k-1, 1)) + 1, d+1), so that one batch trains several memory sizes. Never below index 0.
    """
    if cross_batch_range < 0 or packing < 1 or batch_size % packing:
        raise ValueError(f"cross-batch needs range >= 0, packing >= 1 dividing the batch size {batch_size}")
    contexts = torch.full((batch_size,), cross_batch_range + 1, device=device)
    if stepping and packing > 1:
        step = -(-(cross_batch_range + 1) // (packing - 1))  # ceil division
        in_pack = torch.arange(batch_size, device=device) % packing
        contexts = torch.clamp(in_pack * step + 1, max=cross_batch_range + 1)
    return torch.minimum(contexts, torch.arange(batch_size, device=device) + 1)  # nothing below index 0


def training_attention(q, keys, values, visible):
    """Attention through PyTorch's scaled_dot_product_attention, for training: q [B, H, T, D], keys and values
    [B, Hkv, S, D], visible [B, 1, T, S] bool. Returns [B, H, T, D].

    The fused kernels never hold the [B, H, T, S] logits (nor keep them for the backward pass), which is what lets
    cross-batch attention over (d+1)*T keys train at 3B shapes. Grouped-query heads are repeated, and on CUDA
    head_dim is zero-padded to a multiple of 8 (exact: zeros add nothing to q.k, and the padded output columns are
    dropped), which the fused kernels need (head_dim 100 in LongLLaMA-3B).
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    rep = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    pad = -head_dim % 8 if q.is_cuda else 0
    if pad:
        q, keys, values = (F.pad(x, (0, pad)) for x in (q, keys, values))
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible,
                                         scale=1 / math.sqrt(head_dim))
    return out[..., :head_dim]


# ----------------------------------------------------------------------------------------------------------------------
# Caches: the local window of every layer, the memory of each memory layer


@dataclass
class LocalCache:
    """One layer's keys and values of the current window, in W preallocated slots (as gpt-fast's KVCache).

    Slot i holds a key rotated to position i: the oldest entry is position 0 (positions are relative to
    the window), and since the whole window is evicted at once, a cached key's position never changes.
    """

    keys: torch.Tensor  # [B, Hkv, W, D]
    values: torch.Tensor

    def write(self, slots, keys, values, seen: int):
        """Store keys/values [B, Hkv, T, D] at `slots` [T] and return those of the first `seen` slots."""
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        return self.keys[:, :, :seen], self.values[:, :, :seen]


@dataclass
class MemoryCache:
    """One memory layer's (key, value) memory: keys rotated as if at position 0, with the precision of `dtype`.

    Entries are rounded to `dtype` (mem_dtype) where they are written, and kept in the compute dtype, so that
    attention reads them in place instead of converting all of memory at every call: the values are exactly those
    of a memory stored in `dtype` and cast for use. The buffers grow by half, so appending a window or an evicted
    local cache is amortised O(its size), and `reserve` sizes them at once for a prompt of known length. `valid`
    marks entries that were real tokens (not padding) when they were read.
    """

    dtype: torch.dtype
    keys: Optional[torch.Tensor] = None  # [B, Hkv, capacity, D]
    values: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None  # [B, capacity] bool
    length: int = 0
    # False: the buffers are shared (Cache.copy) or someone else's (a memory file): the next append moves to new ones
    owned: bool = True

    def append(self, keys, values, valid):
        """Add keys/values [B, Hkv, T, D] (keys already at position 0) and valid [B, T]: the one way into memory."""
        start, end = self.length, self.length + keys.shape[2]
        room = 0 if self.keys is None else self.keys.shape[2]
        if end > room or not self.owned:  # grown by half, so appending is amortised O(what is appended)
            self.reserve(room if end <= room else max(end, room + room // 2), like=values)
        self.keys[:, :, start:end] = keys.to(self.dtype)  # rounded to mem_dtype, then stored
        self.values[:, :, start:end] = values.to(self.dtype)
        self.valid[:, start:end] = valid
        self.length = end

    def seen_by(self, q, padding: bool) -> Keys:
        """What the queries q [B, G, R, T, D] see of memory: every valid entry, the same for every query (no causal
        mask). `padding`: some entry may be padding, so the mask must be applied."""
        keys, values, valid = self.view()
        return Keys(keys.to(q.dtype), values.to(q.dtype), valid[:, None, None, None, :], unpadded=not padding)

    def view(self):
        """keys, values [B, Hkv, M, D] and valid [B, M] of the M entries in memory."""
        return self.keys[:, :, :self.length], self.values[:, :, :self.length], self.valid[:, :self.length]

    def reserve(self, capacity: int, like):
        """Make room for `capacity` entries, stored like `like` [B, Hkv, *, D] (see `storage`)."""
        if self.keys is not None and capacity <= self.keys.shape[2] and self.owned:
            return
        batch_size, kv_heads, _, head_dim = like.shape
        old, (dtype, device) = (self.view() if self.length else None), self.storage(like)
        pinned = device != like.device  # host RAM for a GPU (topk.py): pinned, so copies to and from it overlap work
        self.keys = torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype, device=device, pin_memory=pinned)
        self.values = torch.zeros_like(self.keys, pin_memory=pinned)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device, pin_memory=pinned)
        if old is not None:  # what is already in memory
            self.keys[:, :, :self.length], self.values[:, :, :self.length], self.valid[:, :self.length] = old
        self.owned = True

    def storage(self, like) -> tuple:
        """(dtype, device) entries are stored in, for a model whose keys look like `like`: its own."""
        return like.dtype, like.device

    def adopt(self, keys, values, valid, like):
        """Make this empty memory hold keys/values [B, Hkv, M, D] and valid [B, M], stored as `storage(like)` says,
        without copying them (a memory file's mapped pages): the next append moves memory into buffers of its own."""
        self.keys, self.values, self.valid, self.length, self.owned = keys, values, valid, keys.shape[2], False

    def shared_copy(self) -> "MemoryCache":
        """A copy that shares the entries: they never change once written, and whichever of the two appends
        first moves to buffers of its own."""
        self.owned = False
        return copy.copy(self)

    def entries_seen(self, q):
        """[B, H, T, M] bool: the memory entries each of the queries q [B, H, T, D] attends to (for reading attention
        weights, passkey.py): every valid one."""
        batch_size, heads, length, _ = q.shape
        return self.valid[:, None, None, :self.length].expand(batch_size, heads, length, -1).to(q.device)


@dataclass
class Cache:
    """Everything a model keeps between calls: memories of the memory layers and the local window of all layers."""

    batch_size: int
    memory: dict  # layer index -> MemoryCache, for each memory layer
    local: Optional[list] = None  # one LocalCache per layer, once generation keeps a local window
    local_valid: Optional[torch.Tensor] = None  # [B, W]: which local slots hold real (non-padding) tokens
    local_length: int = 0  # tokens in the local window (the same for every layer)
    position: int = 0  # absolute position of the next token: tokens read so far
    padding: bool = False  # some token read so far was padding (attention_mask 0), so masks are not just causal

    @property
    def memory_size(self) -> int:
        return max((memory.length for memory in self.memory.values()), default=0)

    def copy(self) -> "Cache":
        """An independent copy, e.g. to ask several questions about one document read once. The memories' entries
        are shared until one of the copies appends (MemoryCache.shared_copy), so copying costs the local window."""
        clone = copy.deepcopy(replace(self, memory={}))
        clone.memory = {i: memory.shared_copy() for i, memory in self.memory.items()}
        return clone


# ----------------------------------------------------------------------------------------------------------------------
# The model


class CrossBatch(NamedTuple):
    range: int  # d: how many batch elements before its own a memory layer's queries see
    stepping: bool
    packing: int


@dataclass
class Window:
    """What every layer needs to know about the (at most W) tokens it is processing."""

    cos: torch.Tensor  # [T, D] rotary tables of the tokens' positions in the window
    sin: torch.Tensor
    visible: torch.Tensor  # [B, 1, 1, T, S] bool: which of the first S local slots each query sees
    valid: torch.Tensor  # [B, T]: which tokens are real (they enter memory with this mask)
    cache: Optional[Cache] = None
    slots: Optional[torch.Tensor] = None  # [T]: local-cache slots the tokens' keys go to; None: they go to memory
    compiled: bool = False  # a compiled decode step: whole blocks of local slots, masked (decode_slot_block)
    kernel: str = "fused"  # ATTENTION_KERNELS
    cross_batch: Optional[CrossBatch] = None  # training: memory layers use cross-batch attention
    mem_query_scale: Optional[torch.Tensor] = None  # [T, 1]: memory layers' queries times it (log-n scaling)


class Attention(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)
        self.is_memory_layer = layer_index in config.mem_layers
        self.rotary = not self.is_memory_layer or config.mem_positionals
        self.grouping = config.mem_attention_grouping if self.is_memory_layer else None

    def project(self, x):
        """Queries [B, H, T, D], keys and values [B, Hkv, T, D], before any rotation."""
        batch_size, length, _ = x.shape
        q, k, v = self.wqkv(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                      self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch_size, length, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(batch_size, length, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(batch_size, length, self.kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x, window: Window):
        batch_size, length, _ = x.shape
        q, k, v = self.project(x)
        # Rotating to position 0 is the identity, so the unrotated keys are the keys memory stores: wherever a
        # key was read, queries see it at the same relative distance, and memory never has to be re-rotated.
        k_first = k
        if self.rotary:
            q, k = apply_rope(q, window.cos, window.sin), apply_rope(k, window.cos, window.sin)
        if self.is_memory_layer and window.mem_query_scale is not None:  # scaling q scales all of its logits
            q = (q.float() * window.mem_query_scale).to(q.dtype)

        if window.cross_batch is not None and self.is_memory_layer:
            batch = window.cross_batch
            out = cross_batch_attention(q, k, k_first, v, batch.range, batch.stepping, batch.packing)
        elif window.cross_batch is not None:
            out = training_attention(q, k, v, window.visible[:, :, 0])
        else:
            cache, memory = window.cache, window.cache.memory.get(self.layer_index)
            if window.slots is not None:  # the window stays in the local cache, after what it holds already
                k, v = cache.local[self.layer_index].write(window.slots, k, v, seen=window.visible.shape[-1])
            q = q.view(batch_size, self.kv_heads, self.heads // self.kv_heads, length, self.head_dim)  # [B,G,R,T,D]
            local = Keys(k, v, window.visible, unpadded=not (cache.padding or window.compiled),
                         by_formula=window.compiled)
            seen = memory.seen_by(q, cache.padding) if memory is not None and memory.length else None
            if self.grouping is None:
                out = ATTENTION_KERNELS[window.kernel](q, local, seen)
            else:
                out = grouped_attention(q, local, seen, self.grouping, ATTENTION_KERNELS[window.kernel])
            if memory is not None and window.slots is None:
                memory.append(k_first, v, window.valid)  # the window was read alone: now it joins memory
        return self.wo(out.reshape(batch_size, self.heads, length, self.head_dim).transpose(1, 2)
                       .reshape(batch_size, length, self.heads * self.head_dim))

    def load_memory(self, x, window: Window):
        """Only what a window read into memory leaves behind in this memory layer: its keys and values."""
        _, k_first, v = self.project(x)
        window.cache.memory[self.layer_index].append(k_first, v, window.valid)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalised in float32, cast back, then scaled (as LLaMA does)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU; gate and up projections are one matmul."""

    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LongLlamaConfig, layer_index: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, window: Window):
        h = x + self.attention(self.attention_norm(x), window)
        return h + self.mlp(self.mlp_norm(h))


class LongLlama(nn.Module):
    attention_kernel = "fused"  # memory-layer and local attention at inference: "fused" or "plain" (ATTENTION_KERNELS)
    # a compiled decode step attends to the local slots up to a multiple of this many, masked: its shapes change once
    # per so many tokens (symbolic after the first change, so compiled once more), and a step reads the slots in use,
    # not all W (8,192 for SmolLM2: 190 MB of keys and values per token)
    decode_slot_block = 256

    def __init__(self, config: LongLlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False  # training: recompute each block in the backward pass
        self.compiled_layers = None  # LongLlama._layers through torch.compile, for decode steps (compile_decode)
        self.reset_rope()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_rope(self):
        """(Re)compute the rotary tables; positions never exceed the window, so W rows are enough."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings, self.config.rope_theta,
                               self.config.rope_scaling, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, batch_size: int) -> Cache:
        config, dtype = self.config, getattr(torch, self.config.mem_dtype)
        if config.mem_topk is None:
            return Cache(batch_size, {i: MemoryCache(dtype) for i in config.mem_layers})
        import topk  # top-k memory: a MemoryCache that attends to K entries per query only
        return Cache(batch_size, {i: topk.TopkMemory.for_config(config, dtype) for i in config.mem_layers})

    def forward(self, input_ids, cache: Optional[Cache] = None, use_cache: bool = False,
                last_context_length: Optional[int] = None, attention_mask=None, last_logits_only: bool = False,
                progress: bool = False, cross_batch_range: Optional[int] = None, stepping: bool = False,
                packing: int = 1):
        """Logits [B, L, V] of input_ids [B, L] (only [B, 1, V] of the last token with last_logits_only).

        Inference: the first L - last_context_length tokens are read into memory window by window; the rest stay
        in the local cache when use_cache, else go to memory too. Returns (logits, cache). attention_mask [B, L]
        (1 = real token, 0 = padding) covers the new tokens only; the cache remembers the rest. Inference never
        records an autograd graph: the caches are state, not something to differentiate.
        Training: pass cross_batch_range to run a [B, T] batch with cross-batch attention (memory layers also see
        the d batch elements before their own); returns (logits, None).
        """
        if cross_batch_range is not None:
            return self._cross_batch_forward(input_ids, CrossBatch(cross_batch_range, stepping, packing)), None
        with torch.no_grad():
            return self._read(input_ids, cache, use_cache, last_context_length, attention_mask, last_logits_only,
                              progress)

    def _read(self, input_ids, cache, use_cache, last_context_length, attention_mask, last_logits_only, progress):
        """Inference: windows of W tokens into memory, the last context into the local cache (see forward)."""
        cache, valid, to_memory = self._start_reading(input_ids, cache, use_cache, last_context_length,
                                                      attention_mask)
        length, window_size = input_ids.shape[1], self.config.max_position_embeddings
        spans = [(s, min(s + window_size, to_memory)) for s in range(0, to_memory, window_size)]
        if length > to_memory:
            spans.append((to_memory, length))
        logits = []
        for start, end in tqdm(spans, desc="reading", unit="window", leave=False) if progress else spans:
            # a later call in a conversation already has a local window: everything goes through it
            keep_local = cache.local is not None or (use_cache and start == to_memory)
            # when only the last logits are wanted, a window read into memory matters only by that memory
            memory_only = last_logits_only and end < length and not keep_local
            window = self._window(input_ids[:, start:end], valid[:, start:end], cache, keep_local)
            if window.compiled:
                hidden = self.compiled_layers(self, input_ids[:, start:end], window)
            else:
                hidden = self._layers(input_ids[:, start:end], window, memory_only)
            if memory_only:
                continue
            if not last_logits_only:
                logits.append(self.lm_head(hidden))
            elif end == length:
                logits.append(self.lm_head(hidden[:, -1:]))
        return torch.cat(logits, dim=1), cache

    def _start_reading(self, input_ids, cache, use_cache, last_context_length, attention_mask):
        """The cache a read continues (a new one if None), which tokens are real, and how many go to memory."""
        window_size = self.config.max_position_embeddings
        last_context_length = self.config.last_context_length if last_context_length is None else last_context_length
        if not 0 <= last_context_length <= window_size:
            raise ValueError(f"last_context_length must lie in [0, {window_size}], got {last_context_length}")
        batch_size, length = input_ids.shape
        cache = self.new_cache(batch_size) if cache is None else cache
        if cache.batch_size != batch_size:
            raise ValueError(f"batch size {batch_size} does not match the cache's {cache.batch_size}")
        if cache.local is not None and not use_cache:
            raise ValueError("a cache holding a local window can only be continued with use_cache=True")
        if attention_mask is None:
            valid = torch.ones(batch_size, length, dtype=torch.bool, device=input_ids.device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                                 f"{tuple(input_ids.shape)}")
            valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            cache.padding = cache.padding or not bool(valid.all())
        to_memory = max(length - last_context_length, 0)
        if cache.local is None:  # windows go straight to memory: size it once rather than by growing
            like = self.embed.weight.new_empty(batch_size, self.config.num_key_value_heads, 0, self.config.head_dim)
            for memory in cache.memory.values():
                memory.reserve(memory.length + (to_memory if use_cache else length), like)
        return cache, valid, to_memory

    def _window(self, tokens, valid, cache: Cache, keep_local: bool) -> Window:
        """What the layers need to process the window `tokens` [B, T]: read alone into memory, or after what the
        local cache holds (`keep_local`), with rotary positions relative to the local window's oldest slot."""
        length = tokens.shape[1]
        compiled = False
        if keep_local:
            self.make_local_room(cache, length)
            start = cache.local_length
            cache.local_valid[:, start:start + length] = valid
            cache.local_length += length
            compiled = length == 1 and self.compiled_layers is not None
            seen = start + length
            if compiled:  # the slots up to a multiple of decode_slot_block, masked: its shapes change rarely
                seen = min(-(-seen // self.decode_slot_block) * self.decode_slot_block, cache.local_valid.shape[1])
            key_valid = cache.local_valid[:, :seen]
        else:
            start, key_valid = 0, valid
        slots = torch.arange(start, start + length, device=tokens.device)
        cache.position += length
        return Window(self.rope_cos[slots], self.rope_sin[slots], causal_visible(start, length, key_valid), valid,
                      cache, slots if keep_local else None, compiled, self.attention_kernel,
                      mem_query_scale=self.mem_query_scale(slots, cache))

    def mem_query_scale(self, slots, cache: Cache) -> Optional[torch.Tensor]:
        """[T, 1] log-n factors of the memory layers' queries at local slots `slots` (None: mem_attention_logn is
        off): each attends to its local slot and those before it, and to memory (all of it, or mem_topk entries)."""
        config = self.config
        if config.mem_attention_logn is None:
            return None
        memory = cache.memory_size if config.mem_topk is None else min(config.mem_topk, cache.memory_size)
        return logn_scale(config.mem_attention_logn, slots + 1 + memory)[:, None]

    def _layers(self, tokens, window: Window, memory_only: bool = False):
        """The embedding, every block and the final norm: ids [B, T] -> hidden states [B, T, hidden].

        memory_only: the window goes to memory and nothing else of it is wanted. Memory keys and values come from a
        memory layer's input, and a window read into memory keeps nothing in other layers, so the blocks after the
        last memory layer, and that layer's own attention, change nothing that lasts: they are skipped, and None is
        returned. With one memory layer, reading then costs no memory attention at all."""
        x = self.embed(tokens)
        if not memory_only:
            for block in self.layers:
                x = block(x, window)
            return self.norm(x)
        if self.config.mem_layers:
            last = max(self.config.mem_layers)
            for block in self.layers[:last]:
                x = block(x, window)
            self.layers[last].attention.load_memory(self.layers[last].attention_norm(x), window)
        return None

    def make_local_room(self, cache: Cache, length: int):
        """Make room for `length` new tokens in the local window, evicting the whole window when it would overflow."""
        config, param = self.config, self.embed.weight
        if cache.local is None:
            shape = (cache.batch_size, config.num_key_value_heads, config.max_position_embeddings, config.head_dim)
            cache.local = [LocalCache(param.new_zeros(shape), param.new_zeros(shape)) for _ in self.layers]
            cache.local_valid = torch.zeros(shape[0], shape[2], dtype=torch.bool, device=param.device)
        if cache.local_length + length > config.max_position_embeddings:
            self._evict(cache)

    def _evict(self, cache: Cache):
        """Move the whole local window out: memory layers append it to memory, other layers drop it.

        Evicting everything at once (not token by token) keeps the positions of cached keys fixed until they
        leave, moves whole windows into memory as reading a long input does, and happens once per ~W tokens.
        """
        n = cache.local_length
        for i, memory in cache.memory.items():
            keys = cache.local[i].keys[:, :, :n]
            if self.layers[i].attention.rotary:
                keys = apply_rope(keys.float(), self.rope_cos[:n], -self.rope_sin[:n])  # back to position 0
            memory.append(keys, cache.local[i].values[:, :, :n], cache.local_valid[:, :n])
        cache.local_length = 0

    def _cross_batch_forward(self, input_ids, cross_batch: CrossBatch):
        """Training: a [B, T] batch of consecutive document pieces, memory layers attending across the batch."""
        batch_size, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"training sequences must fit the window: {length} > {self.config.max_position_embeddings}")
        valid = torch.ones(batch_size, length, dtype=torch.bool, device=input_ids.device)
        window = Window(self.rope_cos[:length], self.rope_sin[:length], causal_visible(0, length, valid), valid,
                        cross_batch=cross_batch)
        x = self.embed(input_ids)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, window, use_reentrant=False)
            else:
                x = block(x, window)
        return self.lm_head(self.norm(x))

    def compile_decode(self) -> "LongLlama":
        """Run every later decode step (one new token per row, continuing a cache that keeps a local window)
        through torch.compile, as gpt-fast does: the layers become one compiled graph instead of hundreds of
        small calls, a large part of a small model's decode time. The step attends to whole blocks of local slots
        (decode_slot_block) under its mask, so its shapes change once per block; the local length and memory (which
        grows only at evictions) cost a recompilation or two at their first changes, after which they are symbolic.
        Compiling takes seconds to a minute and needs a C++ compiler on CPU: worth it for long answers, or many
        questions about one document.
        (The compiled function takes the model as an argument, so a copy of the model runs its own weights.)"""
        checks.check_can_compile(self.embed.weight.device)
        self.compiled_layers = torch.compile(LongLlama._layers)
        return self


def causal_visible(start: int, length: int, key_valid):
    """[B, 1, 1, T, S] bool: query i (at slot start+i) sees the real keys (key_valid [B, S]) at slots <= start+i."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = slots[None, :] <= (start + torch.arange(length, device=key_valid.device))[:, None]  # [T, S]
    return causal & key_valid[:, None, None, None, :]


def load(ckpt_dir, device="cpu", dtype=torch.float32, quantize: Optional[str] = None, **config_overrides):
    """Load a checkpoint directory (checkpoint.load: config_overrides such as mem_layers replace config.json's)."""
    import checkpoint  # checkpoint files are checkpoint.py's job; it builds this file's LongLlama
    return checkpoint.load(ckpt_dir, device, dtype, quantize, **config_overrides)


def save(model: LongLlama, out_dir):
    """Write config.json and model.safetensors into out_dir (checkpoint.save)."""
    import checkpoint
    checkpoint.save(model, out_dir)
