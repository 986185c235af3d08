"""LongLLaMA: a LLaMA decoder whose memory layers attend to everything read before (Focused Transformer, FoT).

    import longllama
    model = longllama.load("ckpt/", dtype=torch.bfloat16)
    logits, cache = model(prompt_ids, use_cache=True)          # long prompt: memory + local window
    logits, cache = model(next_ids, cache=cache, use_cache=True)

Where FoT lives in this file:
- `MemoryCache`: the (key, value) memory of one memory layer. Keys are stored rotated as if they stood at
  position 0, so a key means the same thing whenever it was read.
- `LocalCache` / `Cache`: the current window of every layer, and eviction of the whole window into memory.
- `Attention.forward`: one softmax over the local window and the memory (`grouped_attention`), computed by fused
  kernels merged by their log-sum-exp (`fused_attention`) or written out (`plain_attention`).
- Top-k memory (`mem_topk`, the FoT paper's kNN memory): each query attends to K memory entries only, its own best
  (`topk_attention_and_lse`) or the blocks its call's queries want most (`MemoryCache.select_blocks`), so that
  reading and answering stop growing with the memory.
- `LongLlama.forward`: cutting a long input into windows of W tokens (`last_context_length`);
  `compile_decode` runs one-token steps through torch.compile with shapes that never change.
- `cross_batch_attention`: FoT training, where memory layers also see other documents' keys (`training_attention`).
- `QuantizedLinear`: int8 / int4 weights for decoding on a CPU, where a step's time is the weights' bytes.
"""

import copy
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LongLlamaConfig:
    """The keys of a LongLLaMA `config.json`. Defaults: the LongLLaMA-3B shapes, and, as in a plain LLaMA
    config.json, no memory layers (PRESETS["3b"] has them)."""

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
    # paper's kNN memory did: the K best-scoring ones ("exact"), or the best blocks of mem_block_size entries
    # ("blocks": ceil(K / mem_block_size) blocks per key/value head and call, chosen by bounds on their keys)
    mem_topk: Optional[int] = None
    mem_retrieval: str = "blocks"
    mem_block_size: int = 64
    # True: top-k memory's entries stay in host RAM (pinned on CUDA), only the block bounds on the compute device;
    # each call copies over the blocks it chose. Memory then grows with RAM, not with GPU memory.
    mem_on_host: bool = False
    # tokens of a long input that stay in the local window instead of memory; None: 1024 (LongLLaMA's) capped at
    # the window, and the whole window without memory layers (where earlier tokens would be read into nothing)
    last_context_length: Optional[int] = None
    # null, or int8 / int4: the checkpoint stores its linear layers' weights quantized (see QuantizedWeight)
    quantization: Optional[str] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:  # no grouped-query attention
            self.num_key_value_heads = self.num_attention_heads
        self._validate()
        if self.last_context_length is None:
            window = self.max_position_embeddings
            self.last_context_length = min(1024, window) if self.mem_layers else window
        self.mem_layers = sorted(self.mem_layers)
        if self.mem_attention_grouping is not None:
            self.mem_attention_grouping = tuple(self.mem_attention_grouping)

    def _validate(self):
        """Refuse, naming the key, any value the model cannot run with. config.json, load()'s overrides, presets and
        the command lines all build a config, so this runs before any tensor is allocated."""
        heads, layers, vocab, window = (self.num_attention_heads, self.num_hidden_layers, self.vocab_size,
                                        self.max_position_embeddings)
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"]
        check_values(vars(self), [
            (sizes, lambda v: is_int(v) and v > 0, "a positive integer"),
            (["num_key_value_heads"], lambda v: heads % v == 0, f"a divisor of num_attention_heads={heads}"),
            (["hidden_size"], lambda v: v % (2 * heads) == 0,
             f"divisible by num_attention_heads={heads} into an even head_dim (rotary embeddings turn pairs)"),
            (["rms_norm_eps", "rope_theta"], lambda v: is_number(v) and v > 0, "a positive finite number"),
            (["rope_scaling"], lambda v: v is None or is_llama3_scaling(v),
             'null or {"rope_type": "llama3", "factor", "low_freq_factor" < "high_freq_factor", '
             '"original_max_position_embeddings"} (positive numbers); other rope scalings are not supported'),
            (["tie_word_embeddings", "mem_positionals", "mem_on_host"], lambda v: isinstance(v, bool), "true or false"),
            (["bos_token_id", "eos_token_id"], lambda v: is_int(v) and 0 <= v < vocab,
             f"a token id in [0, vocab_size={vocab})"),
            # LLaMA configs write -1 or null for "no padding token"; the model itself never reads it
            (["pad_token_id"], lambda v: v is None or is_int(v), "null or an integer"),
            # duplicates are refused rather than merged: "6,12,12" is more likely a typo than a wish
            (["mem_layers"], lambda v: is_int_list(v, 0, layers) and len(set(v)) == len(v),
             f"a list of distinct layer indices in [0, num_hidden_layers={layers})"),
            (["mem_dtype"], lambda v: v in MEM_DTYPES, f"one of {', '.join(MEM_DTYPES)}"),
            (["mem_attention_grouping"], lambda v: v is None or (is_int_list(v, 1) and len(v) == 2),
             "null or two positive integers [heads, queries]"),
            (["mem_topk"], lambda v: v is None or (is_int(v) and v > 0), "null or a positive integer"),
            (["mem_retrieval"], lambda v: v in MEM_RETRIEVALS, f"one of {', '.join(MEM_RETRIEVALS)}"),
            (["mem_block_size"], lambda v: is_int(v) and v > 0, "a positive integer"),
            (["mem_on_host"], lambda v: not v or self.mem_topk is not None,
             "false without mem_topk (memory attended whole is read whole at every call)"),
            (["last_context_length"], lambda v: v is None or (is_int(v) and 0 <= v <= window),
             f"null or an integer in [0, max_position_embeddings={window}]"),
            (["quantization"], lambda v: v is None or v in QUANTIZATIONS, f"null or one of {', '.join(QUANTIZATIONS)}"),
        ], label=lambda key: f"config: {key}")
        if self.model_bytes(torch.bfloat16) >= ADDRESSABLE_BYTES:
            raise ValueError(f"config: {self.num_parameters:.3g} weights and a window of {window} tokens are more "
                             f"than any machine can address (2**48 bytes)")

    @property
    def num_parameters(self) -> int:
        """The model's weights (a tied embedding counted once), from the sizes alone: so memory can be checked before
        anything is allocated."""
        hidden, ffn = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * ffn + 2 * hidden  # wqkv, wo, MLP, two norms
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)  # embed and lm_head
        return embeddings + self.num_hidden_layers * layer + hidden  # and the final norm

    def model_bytes(self, dtype: torch.dtype) -> int:
        """Memory a loaded model takes: its weights in dtype and the float32 rotary tables (cos, sin: W x head_dim).
        Quantized, the linear layers (lm_head too, even when tied) take QUANTIZED_BYTES per weight: an estimate (low
        for an int4 checkpoint that holds some layers in int8, a kept GGUF Q4_K_M), which load() replaces by the
        stored checkpoint's own sizes (TensorFile.loaded_bytes)."""
        rope = self.rope_bytes
        if self.quantization is None:
            return self.num_parameters * dtype.itemsize + rope
        hidden, layers = self.hidden_size, self.num_hidden_layers
        floats = self.vocab_size * hidden + (2 * layers + 1) * hidden  # the embedding and the norms
        linear = self.num_parameters - floats + (self.vocab_size * hidden if self.tie_word_embeddings else 0)
        return int(floats * dtype.itemsize + linear * QUANTIZED_BYTES[self.quantization]) + rope

    @property
    def rope_bytes(self) -> int:
        """The float32 rotary tables' bytes (cos, sin: W x head_dim)."""
        return 2 * self.max_position_embeddings * self.head_dim * 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "LongLlamaConfig":
        """Build from a (Hugging Face) config dict: unknown keys are ignored with a warning, unsupported values raise."""
        values = {**values, **overrides}
        if values.get("model_type", "llama") not in ("llama", "longllama"):
            raise ValueError(f"config: unsupported architecture model_type={values['model_type']!r} "
                             "(expected llama or longllama)")
        for key, supported in _HF_REQUIRED_VALUES.items():
            if key in values and values[key] != supported:
                raise ValueError(f"config: {key}={values[key]!r} is not supported (only {supported!r})")
        known = {f.name for f in fields(cls)}
        if set(overrides) - known:  # a misspelt override is a mistake in the caller's code, not an old config file
            raise ValueError(f"config: unknown overrides {sorted(set(overrides) - known)}")
        unknown = sorted(set(values) - known - set(_HF_REQUIRED_VALUES) - _HF_BOOKKEEPING)
        if unknown:
            warnings.warn(f"config: ignoring unknown keys {unknown}")
        config = cls(**{k: v for k, v in values.items() if k in known})
        if values.get("head_dim", config.head_dim) != config.head_dim:
            raise ValueError(f"config: head_dim={values['head_dim']} differs from hidden_size / num_attention_heads")
        return config

    @classmethod
    def from_json(cls, path, **overrides) -> "LongLlamaConfig":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # a hostile file nests deep
            raise ValueError(f"{path}: cannot read config ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: config must be a JSON object")
        return cls.from_dict(values, **overrides)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["mem_attention_grouping"] = list(self.mem_attention_grouping) if self.mem_attention_grouping else None
        return values


# dtypes memory keys and values may be stored in: integer or bool storage would silently corrupt them
MEM_DTYPES = ("bfloat16", "float16", "float32", "float64")
# how mem_topk chooses the memory entries a query attends to: see MemoryCache.select_blocks and topk_attention_and_lse
MEM_RETRIEVALS = ("blocks", "exact")
# how a checkpoint's linear layers may be quantized (QuantizedWeight), and the bytes per weight each takes, scales
# included (int4: groups of 32, a bfloat16 scale and zero point each)
QUANTIZATIONS = ("int8", "int4")
QUANTIZED_BYTES = {"int8": 1.01, "int4": 0.625}
# No machine addresses more (x86-64 and arm64 use 48-bit virtual addresses): a config needing more is nonsense.
ADDRESSABLE_BYTES = 2**48


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a number of layers


def is_number(value) -> bool:
    """A finite int or float: JSON and float() accept NaN and Infinity, which no setting can use."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int_list(value, low: int, high: float = math.inf) -> bool:
    """A list (or tuple) of integers in [low, high): a string such as "23" is not the list [2, 3]."""
    return isinstance(value, (list, tuple)) and all(is_int(v) and low <= v < high for v in value)


def is_llama3_scaling(value) -> bool:
    numbers = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    return (isinstance(value, dict) and value.get("rope_type", value.get("type")) == "llama3"
            and all(is_number(value.get(key)) and value[key] > 0 for key in numbers)
            and value["low_freq_factor"] < value["high_freq_factor"])


def check_values(values: dict, rules, label=str):
    """Raise ValueError for the first value that breaks its rule, naming it with label(key).

    rules: (keys, test, what each must be), checked in order, so that a test may rely on the keys checked before it.
    """
    for keys, test, what in rules:
        for key in keys:
            if not test(values[key]):
                raise ValueError(f"{label(key)} must be {what}, got {values[key]!r}")


# Hugging Face config keys that change nothing here when they hold these values (and anything else is unsupported).
_HF_REQUIRED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# Hugging Face config keys that carry no information for this model.
_HF_BOOKKEEPING = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map",
                   "initializer_range", "use_cache", "attention_dropout", "pretraining_tp", "head_dim"}

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


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x [..., T, D] to the positions whose tables are cos, sin [T, D]. Passing -sin rotates back."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Caches


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

    Entries are rounded to `dtype` (mem_dtype) where they are written. Memory attended densely is kept in the
    compute dtype, so that attention reads it in place instead of converting all of it at every call: the values
    are exactly those of a memory stored in `dtype` and cast for use. Memory read sparsely (`sparse`: top-k) is held
    in `dtype` itself, half the bytes of float32 for bfloat16, since only the few entries chosen are cast. The
    buffers grow by half, so appending a window or an evicted local cache is amortised O(its size), and `reserve`
    sizes them at once for a prompt of known length. `valid` marks entries that were real tokens (not padding) when
    they were read. With `block_size`, memory is also summarised in blocks of that many consecutive entries: per
    dimension, the largest and the smallest of their valid keys, so that `choose_blocks` bounds what any key of a
    block can score without reading the block.
    """

    dtype: torch.dtype
    sparse: bool = False
    block_size: Optional[int] = None
    on_host: bool = False  # entries in host RAM (pinned when the compute device is a GPU), bounds on the device
    keys: Optional[torch.Tensor] = None  # [B, Hkv, capacity, D]
    values: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None  # [B, capacity] bool
    # [B, Hkv, capacity / block_size, 2D] float32: per dimension, the largest of a block's valid keys and the largest
    # of their negatives (minus the smallest); the lowest float where a block has no valid key yet
    block_bounds: Optional[torch.Tensor] = None
    length: int = 0
    # False: the buffers are shared (Cache.copy) or someone else's (a memory file): the next append moves to new ones
    owned: bool = True

    def append(self, keys, values, valid):
        """Add keys/values [B, Hkv, T, D] (keys already at position 0) and valid [B, T]: the one way into memory."""
        start, end = self.length, self.length + keys.shape[2]
        room = 0 if self.keys is None else self.keys.shape[2]
        if end > room or not self.owned:  # grown by half, so appending is amortised O(what is appended)
            self.reserve(room if end <= room else max(end, room + room // 2), like=values)
        keys = keys.to(self.dtype)  # rounded to mem_dtype, then stored
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values.to(self.dtype)
        self.valid[:, start:end] = valid
        self.length = end
        self._bound(start, keys, valid)

    def hold(self, keys, values, valid, like):
        """Make this empty memory hold keys/values [B, Hkv, M, D] and valid [B, M] as they are, without copying,
        when they are stored as it stores entries (dtype and device of `like` [B, Hkv, *, D], or mem_dtype if
        sparse), else by appending them. Memory read from a memory-mapped file then stays in the file: pages are
        read only where attention looks, and an append moves memory into buffers of its own."""
        stored = self.dtype if self.sparse else like.dtype
        if keys.dtype != stored or values.dtype != stored or keys.device != self._entry_device(like.device):
            return self.append(keys.to(like), values.to(like), valid.to(like.device))
        self.keys, self.values, self.valid, self.length, self.owned = keys, values, valid, keys.shape[2], False
        if self.block_size:
            self._new_bounds(keys.shape[0], keys.shape[1], self.length, keys.shape[3], like.device)
            self._bound(0, keys.to(like.device), valid.to(like.device))

    def _bound(self, start: int, keys, valid):
        """Widen the bounds of the blocks that keys [B, Hkv, T, D] (entries start..start+T) fall into, 65536 entries
        at a time (a memory file's millions of entries must not be widened to float32 all at once)."""
        if not self.block_size:
            return
        for first in range(0, keys.shape[2], 1 << 16):
            part = keys[:, :, first:first + (1 << 16)]
            signed = torch.cat([part, -part], dim=-1).float()  # [B, Hkv, T, 2D]
            hidden = ~valid[:, None, first:first + part.shape[2], None]
            signed = signed.masked_fill_(hidden, torch.finfo(torch.float32).min)  # padding widens no bound
            blocks = torch.arange(start + first, start + first + part.shape[2], device=keys.device) // self.block_size
            self.block_bounds.scatter_reduce_(2, blocks[None, None, :, None].expand(signed.shape), signed, "amax")

    def _new_bounds(self, batch_size: int, kv_heads: int, capacity: int, head_dim: int, device):
        blocks = -(-capacity // self.block_size)
        self.block_bounds = torch.full((batch_size, kv_heads, blocks, 2 * head_dim), torch.finfo(torch.float32).min,
                                       device=device)

    def shared_copy(self) -> "MemoryCache":
        """A copy that shares the entries: they never change once written, and whichever of the two appends
        first moves to buffers of its own."""
        self.owned = False
        return copy.copy(self)

    def reserve(self, capacity: int, like):
        """Make room for `capacity` entries, stored like `like` [B, Hkv, *, D] (its dtype unless sparse, and device)."""
        if self.keys is not None and capacity <= self.keys.shape[2] and self.owned:
            return
        batch_size, kv_heads, _, head_dim = like.shape
        old = dict(keys=self.keys, values=self.values, valid=self.valid, block_bounds=self.block_bounds)
        dtype, device = self.dtype if self.sparse else like.dtype, self._entry_device(like.device)
        pinned = device != like.device  # host RAM for a GPU: pinned, so copies to and from it can overlap work
        self.keys = torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype, device=device, pin_memory=pinned)
        self.values = torch.zeros_like(self.keys, pin_memory=pinned)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device, pin_memory=pinned)
        if self.block_size:
            self._new_bounds(batch_size, kv_heads, capacity, head_dim, like.device)
        for name, tensor in old.items():  # what is already in memory: its entries, and the blocks they are in
            if tensor is not None and self.length:
                dim = 2 if tensor.dim() == 4 else 1  # entries (or blocks) are dim 2 of [B, Hkv, *, D], 1 of [B, *]
                used = -(-self.length // self.block_size) if name.startswith("block") else self.length
                getattr(self, name).narrow(dim, 0, used).copy_(tensor.narrow(dim, 0, used))
        self.owned = True

    def _entry_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.on_host else device

    def view(self):
        """keys, values [B, Hkv, M, D] and valid [B, M] of the M entries in memory."""
        return self.keys[:, :, :self.length], self.values[:, :, :self.length], self.valid[:, :self.length]

    def select_blocks(self, q, count: int):
        """The entries of the `count` blocks each key/value head's queries q [B, Hkv, R, T, D] (R query heads
        sharing it) want most (`choose_blocks`): keys, values [B, Hkv, count * block_size, D] (in q's dtype) and
        valid [B, Hkv, count * block_size], in memory order."""
        entries = (self.choose_blocks(q, count)[..., None] * self.block_size
                   + torch.arange(self.block_size, device=q.device)).flatten(2)  # [B, Hkv, n * block_size]
        inside = entries < self.length  # the last block may not be full yet
        entries = entries.clamp(max=self.length - 1).to(self.keys.device)  # on_host: only the chosen cross over
        index = entries[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        keys, values = (x.gather(2, index).to(q.device, q.dtype, non_blocking=True) for x in (self.keys, self.values))
        valid = self.valid[:, None].expand(-1, entries.shape[1], -1).gather(2, entries).to(q.device) & inside
        return keys, values, valid

    def choose_blocks(self, q, count: int):
        """[B, Hkv, count]: the blocks, in memory order, that each key/value head's queries q [B, Hkv, R, T, D] want
        most.

        A query's score for a block is the most that any key of the block can score, from the block's bounds: per
        dimension the larger of q * max and q * min (as Quest bounds its pages). A softmax over the blocks turns
        each query's scores into shares, so that a query that singles out one block counts as much as a query
        that scores high everywhere, and a block's score is the largest share any of them gives it: a block that
        one query needs is chosen even when the others want other blocks. The queries that choose are those of at
        most PROBES positions of the call (`probe_positions`: the last one always), so that choosing costs
        PROBES x blocks dot products per head whatever the window; the rest is linear in what is chosen.
        """
        blocks = -(-self.length // self.block_size)
        probes = q[:, :, :, probe_positions(q.shape[3], q.device)].flatten(2, 3).float()  # [B, Hkv, R*P, D]
        probes = probes / math.sqrt(q.shape[-1])  # scaled as attention scales: the shares are its softmax's
        # q.k <= relu(q).max(k) + relu(-q).max(-k), per dimension; -inf for a block of padding only
        bound = torch.cat([probes.clamp(min=0), (-probes).clamp(min=0)], dim=-1) @ self.block_bounds[:, :, :blocks].mT
        best = (bound - bound.logsumexp(dim=-1, keepdim=True)).amax(dim=2)  # [B, Hkv, N]: the largest log-share
        return best.topk(min(count, blocks), dim=-1).indices.sort(dim=-1).values


PROBES = 32  # query positions of a call that choose memory blocks (MemoryCache.select_blocks)


def probe_positions(length: int, device=None):
    """The positions, of a call's `length` queries, whose queries choose memory blocks: all of them up to PROBES,
    else PROBES evenly spaced ones ending with the last (the one a generated token comes from)."""
    if length <= PROBES:
        return torch.arange(length, device=device)
    return length - 1 - (length // PROBES) * torch.arange(PROBES - 1, -1, -1, device=device)


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

    def tensors(self) -> dict:
        """What the cache holds as named tensors, for a file: each memory layer's entries, every layer's filled local
        slots (LongLlama.cache_from_tensors reads them back).

        Memory goes out in mem_dtype where that is narrower than the dtype it is held in: its values were rounded to
        mem_dtype when written, so nothing is lost and a file of bfloat16 memory read in float32 is half the size.
        """
        tensors = {}
        for i, memory in self.memory.items():
            keys, values, valid = memory.view()
            stored = memory.dtype if memory.dtype.itemsize < keys.dtype.itemsize else keys.dtype
            tensors |= {f"memory.{i}.keys": keys.to(stored), f"memory.{i}.values": values.to(stored),
                        f"memory.{i}.valid": valid}
        if self.local is not None:
            for i, local in enumerate(self.local):
                tensors |= {f"local.{i}.keys": local.keys[:, :, :self.local_length],
                            f"local.{i}.values": local.values[:, :, :self.local_length]}
            tensors["local.valid"] = self.local_valid[:, :self.local_length]
        return {name: tensor.contiguous() for name, tensor in tensors.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Attention


class Source(NamedTuple):
    """Keys and values that queries attend to, with which of them each query sees."""

    keys: torch.Tensor  # [B, G, S, D]
    values: torch.Tensor
    visible: torch.Tensor  # [B, 1, 1, T, S] bool, or [B, 1, 1, 1, S]: the same keys for every query (memory)
    # True: `visible` says nothing a kernel needs told: every key (memory, or a single query at the end of the
    # window) or causal ending at the last key, with no padding; False: apply `visible` as given
    implied: bool = False
    # True: attend by the formula, not a kernel call. In a compiled decode step one query's attention to the W
    # local slots costs less so (the compiler fuses it into a few loops); memory, which can be long, keeps the kernel
    written_out: bool = False
    # K: each query attends only to the K visible keys it scores highest (mem_topk's exact retrieval)
    topk: Optional[int] = None


def plain_attention(q, sources):
    """One softmax over several Sources, written out: the reference formula.

    q: [B, G, R, T, D] (G key/value heads, R query heads sharing each). Returns [B, G, R, T, D].
    The softmax runs in float32; masked logits get the lowest float so that a query with nothing visible
    (padding) yields a finite, ignored output. It holds [T, S] logits per head: fused_attention does not.
    """
    scale = math.sqrt(q.shape[-1])
    logits = []
    for keys, _, visible, *_, topk in sources:
        scores = torch.einsum("bgrtd,bgsd->bgrts", q, keys.to(q.dtype)).div_(scale)  # [B, G, R, T, S]
        if topk is not None:
            visible = topk_visible(scores, visible, topk)
        logits.append(scores.masked_fill_(~visible, torch.finfo(scores.dtype).min))
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    out = 0
    for p, source in zip(probs.split([s.shape[-1] for s in logits], dim=-1), sources):
        out = out + torch.einsum("bgrts,bgsd->bgrtd", p, source.values.to(q.dtype))
    return out


def fused_attention(q, sources):
    """`plain_attention` through fused kernels: one call per source, merged by log-sum-exp.

    No [T, S] logits are ever held, so the workspace is bounded by the window, not by the memory. A source
    whose mask is the same for every query (memory) is attended by the R query heads of a key/value head
    stacked as R*T queries, so memory is read in place, never repeated or copied. Masks that a source says are
    `implied` are left to the kernels (causal) or dropped; a `written_out` source is attended by the formula, with
    its mask.
    """
    batch_size, kv_heads, rep, length, head_dim = q.shape
    out = lse = None
    for keys, values, visible, implied, written_out, topk in sources:
        shared = visible.shape[-2] == 1  # one mask row for every query: no causal mask
        visible = visible[:, :, 0]  # [B, 1, T or 1, S]
        if shared:
            q_source = q.reshape(batch_size, kv_heads, rep * length, head_dim)  # [B, G, R*T, D]
        else:
            q_source = q.reshape(batch_size, kv_heads * rep, length, head_dim)  # [B, H, T, D]
            if rep > 1:  # grouped-query attention: repeat the key/value heads of the window (small)
                keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        # implied masks are causal and end at the last key (bottom-right): none for memory or a single query (it
        # sees every key), the kernel's own for a whole window
        causal = implied and not shared and not written_out and 1 < length == keys.shape[2]
        mask_free = implied and not written_out and (shared or causal or length == 1)
        if topk is not None:
            source_out, source_lse = topk_attention_and_lse(q_source, keys, values, visible, topk)
        else:
            source_out, source_lse = attention_and_lse(q_source, keys, values, None if mask_free else visible,
                                                       causal, written_out)
        source_out = source_out.view(batch_size, kv_heads, rep, length, head_dim)
        source_lse = source_lse.view(batch_size, kv_heads, rep, length)
        if out is None:
            out, lse = source_out, source_lse
        else:
            out, lse = merge_attention(out, lse, source_out, source_lse)
    return out.to(q.dtype)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Two attention results over disjoint key sets, merged into the one softmax over their union.

    Each output is weighted by its share of the total probability mass, exp(lse - total lse). A query that sees
    nothing in either set (padding) has -inf twice: its output becomes 0, finite and ignored.
    """
    total = torch.logaddexp(lse_a, lse_b).clamp(min=torch.finfo(torch.float32).min)
    weight_a, weight_b = (lse_a - total).exp().unsqueeze(-1), (lse_b - total).exp().unsqueeze(-1)
    return out_a.float() * weight_a + out_b.float() * weight_b, total


def attention_and_lse(q, keys, values, visible=None, causal: bool = False, written_out: bool = False):
    """softmax(q k^T / sqrt(D), masked) v and its log-sum-exp per query, by a fused kernel (or, written_out, as
    the formula: for a few keys inside a compiled graph).

    q: [B, X, Q, D]; keys, values: [B, X, S, D]; visible: None or bool broadcastable to [B, X, Q, S]. Returns
    out [B, X, Q, D] (q.dtype) and lse [B, X, Q] (float32, -inf for a query that sees no key).
    """
    scale = 1 / math.sqrt(q.shape[-1])
    bias = None if visible is None or written_out else torch.zeros(visible.shape, dtype=q.dtype,
                                                                   device=q.device).masked_fill_(~visible, float("-inf"))
    if written_out:  # in float32, as the kernels compute
        scores = (q.float() @ keys.float().transpose(-1, -2)) * scale  # [B, X, Q, S]
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        lse = scores.logsumexp(-1)
        out = ((scores - lse.unsqueeze(-1)).exp() @ values.float()).to(q.dtype)
    elif q.is_cuda:
        out, lse = _cuda_attention_and_lse(q, keys, values, bias, causal, scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys, values, is_causal=causal, attn_mask=bias, scale=scale)
    if visible is not None:  # a query that sees nothing (padding): output 0, and a weight of nothing in merges
        blind = ~visible.any(-1)
        out, lse = out.masked_fill(blind.unsqueeze(-1), 0), lse.masked_fill(blind, float("-inf"))
    return out, lse.float()


def topk_attention_and_lse(q, keys, values, visible, topk: int):
    """attention_and_lse over only the `topk` visible keys that score highest for each query: exact top-k, the
    correctness baseline of mem_topk. It scores every key, so it costs as much as attending to all of them.

    q: [B, X, Q, D]; keys, values: [B, X, S, D]; visible: bool broadcastable to [B, X, Q, S].
    """
    scores = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, X, Q, S]
    scores = scores.masked_fill(~topk_visible(scores, visible, topk), float("-inf"))
    lse = scores.logsumexp(-1)  # -inf for a query that sees nothing: its output is then 0
    out = (scores - lse.clamp(min=torch.finfo(torch.float32).min).unsqueeze(-1)).exp() @ values.float()
    return out.to(q.dtype), lse


def topk_visible(scores, visible, topk: int):
    """visible [.., Q, S] (broadcastable to scores), narrowed to the `topk` visible keys of highest score per query."""
    scores = scores.masked_fill(~visible, float("-inf"))
    chosen = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & visible


def _cuda_attention_and_lse(q, keys, values, bias, causal: bool, scale: float):
    """The CUDA kernels: flash attention (16-bit, no mask) or memory-efficient attention (any mask, float32).

    Both need head_dim a multiple of 8 (LongLLaMA-3B has 100): zero columns are exact (they add nothing to
    q.k, and the output's padded columns are dropped). The efficient kernel wants its bias 16-aligned in the
    key dimension and pads its lse to blocks of 32 queries.
    """
    head_dim, queries, key_count = q.shape[-1], q.shape[2], keys.shape[2]
    pad = -head_dim % 8
    if pad:
        q, keys, values = (F.pad(x, (0, pad)) for x in (q, keys, values))
    if bias is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, keys, values, 0.0, causal, False,
                                                                        scale=scale)[:2]
    else:
        if bias is not None:
            aligned = F.pad(bias, (0, -key_count % 16))[..., :key_count]
            bias = aligned.expand(q.shape[0], q.shape[1], queries, key_count)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, keys, values, bias, True, 0.0, causal,
                                                                           scale=scale)[:2]
        lse = lse[..., :queries]
    return out[..., :head_dim], lse


ATTENTION_KERNELS = {"fused": fused_attention, "plain": plain_attention}


def grouped_attention(q, sources, grouping=None, kernel: str = "fused"):
    """Memory-layer attention for q [B, H, T, D], optionally over at most `grouping` = (heads, queries) at a time.

    Grouping only bounds the workspace; outputs are the same. With grouped-query attention a group holds whole
    key/value heads (all query heads that share them). `kernel` is "fused" or "plain" (the written-out
    formula, for comparison). Returns [B, H, T, D].
    """
    attend = ATTENTION_KERNELS[kernel]
    batch_size, heads, length, head_dim = q.shape
    kv_heads = sources[0].keys.shape[1]
    q = q.view(batch_size, kv_heads, heads // kv_heads, length, head_dim)  # [B, G, R, T, D]
    if grouping is None:
        return attend(q, sources).reshape(batch_size, heads, length, head_dim)
    group_heads = max(1, grouping[0] // (heads // kv_heads))
    group_queries = grouping[1]
    out = torch.empty_like(q)
    for g in range(0, kv_heads, group_heads):
        for t in range(0, length, group_queries):
            heads_, queries = slice(g, g + group_heads), slice(t, t + group_queries)
            part = [_part_of_source(source, heads_, queries, length) for source in sources]
            out[:, heads_, :, queries] = attend(q[:, heads_, :, queries], part)
    return out.reshape(batch_size, heads, length, head_dim)


def _part_of_source(source, heads: slice, queries: slice, length: int):
    """What the queries [queries] (of `length`) of key/value heads [heads] see of one source.

    Memory (one mask row for all queries) is seen whole. Of the local window, the keys after the part's last
    query are cut off: no query of the part sees them, and the part's causal mask then ends at its last key
    as a whole window's does, so the kernels can apply it themselves.
    """
    keys, values, visible = source[:3]
    if visible.shape[-2] == 1:  # its mask may differ by key/value head (top-k blocks)
        return source._replace(keys=keys[:, heads], values=values[:, heads],
                               visible=visible[:, heads] if visible.shape[1] > 1 else visible)
    seen = keys.shape[2] - length + min(queries.stop, length)  # keys up to the part's last query
    return source._replace(keys=keys[:, heads, :seen], values=values[:, heads, :seen],
                           visible=visible[..., queries, :seen])


def causal_visible(start: int, length: int, key_valid):
    """[B, 1, 1, T, S] bool: query i (at slot start+i) sees the real keys (key_valid [B, S]) at slots <= start+i."""
    slots = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = slots[None, :] <= (start + torch.arange(length, device=key_valid.device))[:, None]  # [T, S]
    return causal & key_valid[:, None, None, None, :]


def cross_batch_attention(q, k, k_first, v, cross_batch_range: int, stepping: bool = False, packing: int = 1):
    """FoT training attention of a memory layer over a batch [B, ...] of consecutive document pieces.

    Queries of element b see their own keys (`k`, standard positions, causal) and all keys of elements
    b-1 .. b-d (`k_first`, rotated as if at position 0, no causal mask), d = cross_batch_range: earlier pieces of
    the same document are the positives, other documents the negatives. No wrap-around below index 0.
    With `stepping`, element i of each pack of `packing` elements sees min(i*ceil((d+1)/max(k-1,1)) + 1, d+1)
    contexts, itself included, so one batch trains several memory sizes.
    q: [B, H, T, D]; k, k_first, v: [B, Hkv, T, D]. Returns [B, H, T, D].
    """
    batch_size, _, length, _ = q.shape
    if cross_batch_range < 0 or packing < 1 or batch_size % packing:
        raise ValueError(f"cross-batch needs range >= 0, packing >= 1 dividing the batch size {batch_size}")
    # element b's view of element b-j is the batch rolled by j: [B, Hkv, d*T, D]
    shifts = range(1, cross_batch_range + 1)
    other_keys = torch.cat([k_first[:, :, :0]] + [k_first.roll(j, dims=0) for j in shifts], dim=2)
    other_values = torch.cat([v[:, :, :0]] + [v.roll(j, dims=0) for j in shifts], dim=2)

    contexts = torch.full((batch_size,), cross_batch_range + 1, device=q.device)
    if stepping and packing > 1:
        step = -(-(cross_batch_range + 1) // (packing - 1))  # ceil division
        in_pack = torch.arange(batch_size, device=q.device) % packing
        contexts = torch.clamp(in_pack * step + 1, max=cross_batch_range + 1)
    contexts = torch.minimum(contexts, torch.arange(batch_size, device=q.device) + 1)  # nothing below index 0
    shift_of_key = torch.arange(1, cross_batch_range + 1, device=q.device).repeat_interleave(length)  # [d*T]: j
    other_visible = shift_of_key[None, :] < contexts[:, None]  # [B, d*T]

    all_valid = torch.ones(batch_size, length, dtype=torch.bool, device=q.device)
    sources = [
        Source(k, v, causal_visible(0, length, all_valid)),
        Source(other_keys, other_values, other_visible[:, None, None, None, :].expand(-1, 1, 1, length, -1)),
    ]
    return training_attention(q, sources)


def training_attention(q, sources):
    """Attention over Sources through PyTorch's scaled_dot_product_attention, for training.

    The fused kernels never hold the [B, H, T, S] logits (nor keep them for the backward pass), which is what
    lets cross-batch attention over (d+1)*T keys train at 3B shapes. The sources' keys are concatenated,
    which is cheap here (a training batch) but would copy the whole memory at inference. Grouped-query heads
    are repeated, and on CUDA head_dim is zero-padded to a multiple of 8 (exact: zeros add nothing to q.k,
    and the padded output columns are dropped), which the fused kernels need (head_dim 100 in LongLLaMA-3B).
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    rep = heads // sources[0].keys.shape[1]
    keys = torch.cat([source.keys for source in sources], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([source.values for source in sources], dim=2).repeat_interleave(rep, dim=1)
    visible = torch.cat([source.visible for source in sources], dim=-1)[:, :, 0]  # [B, 1, T, S]
    pad = -head_dim % 8 if q.is_cuda else 0
    if pad:
        q, keys, values = (F.pad(x, (0, pad)) for x in (q, keys, values))
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible,
                                         scale=1 / math.sqrt(head_dim))
    return out[..., :head_dim]


class CrossBatch(NamedTuple):
    range: int
    stepping: bool
    packing: int


@dataclass
class Window:
    """What every layer needs to know about the tokens it is processing."""

    slots: torch.Tensor  # [T]: local slots, and rotary positions, of the tokens
    cos: torch.Tensor  # [T, D] rotary tables for those positions
    sin: torch.Tensor
    visible: torch.Tensor  # [B, 1, 1, T, S]: which of the first S local slots each query sees (causal and padding)
    valid: torch.Tensor  # [B, T]: which new tokens are real (they enter memory with this mask)
    cache: Optional[Cache] = None
    keep_local: bool = False  # True: keys stay in the local cache; False: memory layers load the window into memory
    cross_batch: Optional[CrossBatch] = None  # training: memory layers use cross-batch attention
    padding: bool = True  # False: no key in the cache or the window is padding, so every mask is causal
    all_slots: bool = False  # True: S is all W local slots, not just those up to the last token (compiled decode)
    memory_only: bool = False  # True: only the memory the window leaves behind is wanted, not its outputs
    kernel: str = "fused"  # "fused" or "plain" attention (see ATTENTION_KERNELS)


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
        self.topk, self.retrieval = config.mem_topk, config.mem_retrieval

    def _project(self, x):
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
        q, k, v = self._project(x)
        # Rotating to position 0 is the identity, so the unrotated keys are the keys memory stores: wherever a
        # key was read, queries see it at the same relative distance, and memory never has to be re-rotated.
        k_first = k
        if self.rotary:
            q, k = apply_rope(q, window.cos, window.sin), apply_rope(k, window.cos, window.sin)

        if window.cross_batch is None:
            out = self._attend_local_and_memory(q, k, k_first, v, window)
        elif self.is_memory_layer:
            out = cross_batch_attention(q, k, k_first, v, *window.cross_batch)
        else:
            out = training_attention(q, [Source(k, v, window.visible)])
        return self.wo(out.transpose(1, 2).reshape(batch_size, length, self.heads * self.head_dim))

    def _attend_local_and_memory(self, q, k, k_first, v, window: Window):
        cache = window.cache
        if window.keep_local:
            k, v = cache.local[self.layer_index].write(window.slots, k, v, seen=window.visible.shape[-1])
        sources = [Source(k, v, window.visible, implied=not (window.padding or window.all_slots),
                          written_out=window.all_slots)]
        memory = cache.memory.get(self.layer_index)
        if memory is not None and memory.length:
            sources.append(self._memory_source(q, memory, window.padding))
        out = grouped_attention(q, sources, self.grouping, window.kernel)
        if memory is not None and not window.keep_local:
            memory.append(k_first, v, window.valid)  # the window was read alone: now it joins memory
        return out

    def _retrieval(self, memory: MemoryCache) -> Optional[str]:
        """How mem_topk = K narrows this memory: "exact" (the K entries each query scores highest), "blocks" (the
        ceil(K / block size) blocks its key/value head's queries want most), or None where the choice would take
        every entry, or without mem_topk: memory is then attended whole."""
        if self.topk is None:
            return None
        whole = self.topk if self.retrieval == "exact" else self._blocks_wanted(memory) * memory.block_size
        return self.retrieval if whole < memory.length else None

    def _blocks_wanted(self, memory: MemoryCache) -> int:
        return -(-self.topk // memory.block_size)  # ceil: at least K entries

    def _memory_source(self, q, memory: MemoryCache, padding: bool) -> Source:
        """What the queries q [B, H, T, D] see of memory (see _retrieval)."""
        retrieval = self._retrieval(memory)
        if retrieval == "blocks":
            keys, values, valid = memory.select_blocks(self._grouped(q), self._blocks_wanted(memory))
            return Source(keys, values, valid[:, :, None, None, :])  # [B, Hkv, 1, 1, S]: chosen per key/value head
        keys, values, valid = (x.to(q.device) for x in memory.view())  # on_host: copied over whole
        # the same mask for every query, no causal mask: [B, 1, 1, 1, M]
        return Source(keys.to(q.dtype), values.to(q.dtype), valid[:, None, None, None, :], implied=not padding,
                      topk=self.topk if retrieval == "exact" else None)

    def memory_seen(self, q, memory: MemoryCache):
        """[B, H, T, M] bool: the memory entries each of the queries q [B, H, T, D] (rotated) attends to, as
        _memory_source chooses them; for reading attention weights (passkey.py), not for computing attention."""
        keys, _, valid = (x.to(q.device) for x in memory.view())
        batch_size, heads, length, _ = q.shape
        seen = valid[:, None, None, :].expand(batch_size, heads, length, -1)
        retrieval = self._retrieval(memory)
        if retrieval == "exact":
            scores = self._grouped(q).float() @ keys.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, R, T, M]
            seen = topk_visible(scores.flatten(1, 2), seen, self.topk)
        elif retrieval == "blocks":
            blocks = memory.choose_blocks(self._grouped(q), self._blocks_wanted(memory))  # [B, Hkv, n]
            chosen = torch.zeros(batch_size, self.kv_heads, -(-memory.length // memory.block_size), dtype=torch.bool,
                                 device=q.device).scatter_(-1, blocks, True)
            chosen = chosen.repeat_interleave(memory.block_size, dim=-1)[..., :memory.length]  # [B, Hkv, M]
            seen = seen & chosen.repeat_interleave(heads // self.kv_heads, dim=1)[:, :, None]
        return seen

    def _grouped(self, q):
        """q [B, H, T, D] as [B, Hkv, R, T, D]: the R query heads of each key/value head together."""
        batch_size, heads, length, head_dim = q.shape
        return q.view(batch_size, self.kv_heads, heads // self.kv_heads, length, head_dim)

    def load_memory(self, x, window: Window):
        """Only what a window read into memory leaves behind in this memory layer: its keys and values."""
        _, k_first, v = self._project(x)
        window.cache.memory[self.layer_index].append(k_first, v, window.valid)


# ----------------------------------------------------------------------------------------------------------------------
# The model


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

    def reset_rope(self):
        """(Re)compute the rotary tables; positions never exceed the window, so W rows are enough."""
        cos, sin = rope_tables(self.config.head_dim, self.config.max_position_embeddings, self.config.rope_theta,
                               self.config.rope_scaling, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def compile_decode(self) -> "LongLlama":
        """Run every later decode step (one new token per row, continuing a cache that keeps a local window)
        through torch.compile, as gpt-fast does: the layers become one compiled graph instead of hundreds of
        small calls, a large part of a small model's decode time. The step attends to all W local slots under
        its mask, so its shapes are the same at every token; memory grows only at evictions, and its first changes
        cost a recompilation or two (after that its size is symbolic). Compiling takes seconds to a minute
        and needs a C++ compiler on CPU: worth it for long answers, or many questions about one document.
        (The compiled function takes the model as an argument, so a copy of the model runs its own weights.)"""
        check_can_compile(self.embed.weight.device)
        self.compiled_layers = torch.compile(LongLlama._layers)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self, batch_size: int) -> Cache:
        config = self.config
        sparse = config.mem_topk is not None
        block_size = config.mem_block_size if sparse and config.mem_retrieval == "blocks" else None
        memory = {i: MemoryCache(getattr(torch, config.mem_dtype), sparse, block_size, config.mem_on_host)
                  for i in config.mem_layers}
        return Cache(batch_size, memory)

    def cache_from_tensors(self, tensors: dict, batch_size: int, position: int, padding: bool) -> Cache:
        """The cache that Cache.tensors() wrote, on this model's device and in its dtype. Tensors that do not fit
        this model (names, shapes, dtypes) raise ValueError naming the first of them."""
        config, param = self.config, self.embed.weight
        kv_shape = (config.num_key_value_heads, config.head_dim)

        def entries(name: str) -> int:
            mask = tensors.get(name)
            if mask is None or mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != batch_size:
                raise ValueError(f"{name} is missing or not a [{batch_size}, entries] bool mask")
            return mask.shape[1]

        expected = {}  # name -> shape
        for i in config.mem_layers:
            size = entries(f"memory.{i}.valid")
            expected |= {f"memory.{i}.{part}": (batch_size, kv_shape[0], size, kv_shape[1])
                         for part in ("keys", "values")}
            expected[f"memory.{i}.valid"] = (batch_size, size)
        local_length = entries("local.valid") if "local.valid" in tensors else None
        if local_length is not None:
            if local_length > config.max_position_embeddings:
                raise ValueError(f"local.valid holds {local_length} slots, more than the window's "
                                 f"{config.max_position_embeddings}")
            for i in range(config.num_hidden_layers):
                expected |= {f"local.{i}.{part}": (batch_size, kv_shape[0], local_length, kv_shape[1])
                             for part in ("keys", "values")}
            expected["local.valid"] = (batch_size, local_length)
        _refuse_mismatch("cache", set(expected), set(tensors))
        for name, shape in expected.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or tensor.is_floating_point() == name.endswith(".valid"):
                raise ValueError(f"{name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, this "
                                 f"model expects {shape}")

        cache = self.new_cache(batch_size)
        like = param.new_empty(batch_size, kv_shape[0], 0, kv_shape[1])
        for i, memory in cache.memory.items():
            memory.hold(tensors[f"memory.{i}.keys"], tensors[f"memory.{i}.values"],
                        tensors[f"memory.{i}.valid"].to(param.device), like)
        if local_length is not None:
            self._prepare_local(cache, local_length)
            slots = torch.arange(local_length, device=param.device)
            for i, local in enumerate(cache.local):
                local.write(slots, tensors[f"local.{i}.keys"].to(param), tensors[f"local.{i}.values"].to(param),
                            local_length)
            cache.local_valid[:, :local_length] = tensors["local.valid"].to(param.device)
            cache.local_length = local_length
        cache.position, cache.padding = position, padding
        return cache

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
            self._reserve_memory(cache, to_memory if use_cache else length)
        spans = [(s, min(s + window_size, to_memory)) for s in range(0, to_memory, window_size)]
        if length > to_memory:
            spans.append((to_memory, length))
        logits = []
        for start, end in tqdm(spans, desc="reading", unit="window", leave=False) if progress else spans:
            # a later call in a conversation already has a local window: everything goes through it
            keep_local = cache.local is not None or (use_cache and start == to_memory)
            # when only the last logits are wanted, a window read into memory matters only by that memory
            memory_only = last_logits_only and end < length and not keep_local
            hidden = self._window(input_ids[:, start:end], valid[:, start:end], cache, keep_local, memory_only)
            if memory_only:
                continue
            if not last_logits_only:
                logits.append(self.lm_head(hidden))
            elif end == length:
                logits.append(self.lm_head(hidden[:, -1:]))
        return torch.cat(logits, dim=1), cache

    def _reserve_memory(self, cache: Cache, entries: int):
        config = self.config
        like = self.embed.weight.new_empty(cache.batch_size, config.num_key_value_heads, 0, config.head_dim)
        for memory in cache.memory.values():
            memory.reserve(memory.length + entries, like)

    def _window(self, tokens, valid, cache: Cache, keep_local: bool, memory_only: bool = False):
        """Run at most W tokens through every layer; returns the final hidden states [B, T, hidden] (None when
        memory_only: see _layers)."""
        length = tokens.shape[1]
        all_slots = False
        if keep_local:
            self._prepare_local(cache, length)
            start = cache.local_length
            cache.local_valid[:, start:start + length] = valid
            cache.local_length += length
            # a compiled decode step sees all W slots, masked, so that its shapes are the same at every token
            all_slots = length == 1 and self.compiled_layers is not None
            key_valid = cache.local_valid if all_slots else cache.local_valid[:, :start + length]
        else:
            start, key_valid = 0, valid
        slots = torch.arange(start, start + length, device=tokens.device)
        window = Window(slots, self.rope_cos[slots], self.rope_sin[slots], causal_visible(start, length, key_valid),
                        valid, cache, keep_local, padding=cache.padding, all_slots=all_slots,
                        memory_only=memory_only, kernel=self.attention_kernel)
        hidden = self.compiled_layers(self, tokens, window) if all_slots else self._layers(tokens, window)
        cache.position += length
        return hidden

    def _layers(self, tokens, window: Window):
        """The embedding, every block and the final norm: ids [B, T] -> hidden states [B, T, hidden].

        window.memory_only: the window goes to memory and nothing else of it is wanted. Memory keys and values
        come from a memory layer's input, and a window read into memory keeps nothing in other layers, so the
        blocks after the last memory layer, and that layer's own attention, change nothing that lasts: they are
        skipped, and None is returned. With one memory layer, reading then costs no memory attention at all."""
        x = self.embed(tokens)
        if not window.memory_only:
            for block in self.layers:
                x = block(x, window)
            return self.norm(x)
        if self.config.mem_layers:
            last = max(self.config.mem_layers)
            for block in self.layers[:last]:
                x = block(x, window)
            self.layers[last].attention.load_memory(self.layers[last].attention_norm(x), window)
        return None

    def _prepare_local(self, cache: Cache, length: int):
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
        batch_size, length = input_ids.shape
        if length > self.config.max_position_embeddings:
            raise ValueError(f"training sequences must fit the window: {length} > {self.config.max_position_embeddings}")
        valid = torch.ones(batch_size, length, dtype=torch.bool, device=input_ids.device)
        window = Window(torch.arange(length, device=input_ids.device), self.rope_cos[:length], self.rope_sin[:length],
                        causal_visible(0, length, valid), valid, cross_batch=cross_batch)
        x = self.embed(input_ids)
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, window, use_reentrant=False)
            else:
                x = block(x, window)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------------------------------------------------
# Weight-only quantization: int8 and int4 linear layers for CPU decoding

INT4_GROUP = 64  # input channels sharing an int4 scale and zero point, where this project quantizes
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes the int4 kernel takes (GGUF's 4-bit blocks are 32 wide)
PACKED_ROWS = 1024  # rows of an int4 weight packed for the kernel at a time: a multiple of its 64-row blocks
# int8 layers multiply this many rows or more (a prefill) by their weight rebuilt in the compute dtype: one GEMM
# then beats the int8 kernel, made for a few rows (measured at 3B's width in bfloat16: the kernel takes 0.5 ms per
# row of 8640 x 2 by 3200; rebuilding takes 9.5 ms, and the GEMM 8 ms for 32 rows, 76 ms for 512)
DEQUANTIZE_ROWS = 32


class QuantizedWeight(NamedTuple):
    """A linear layer's weight [N, K] as a quantized checkpoint stores it (as {layer}.weight, .scales, .zeros).
    Every part is indexed by output row first, so rows are fused (q/k/v), split and reordered as a float weight's are.

    - int8: q int8 [N, K] and scales [N]: w = q * scale, one scale per output channel.
    - int4: q uint8 [N, K / 2], two 4-bit values per byte, the even column in the low nibble; scales and zeros
      [N, K / group]: w = (q - 8) * scale + zero, per group of input channels.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor] = None

    @property
    def scheme(self) -> str:
        return "int8" if self.zeros is None else "int4"

    @property
    def shape(self) -> tuple:
        rows, columns = self.q.shape
        return rows, columns * (2 if self.zeros is not None else 1)

    def map(self, fn) -> "QuantizedWeight":
        """The same weight with fn applied to each part (a row slice, a row reordering, a cast)."""
        return QuantizedWeight(*(None if part is None else fn(part) for part in self))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] the parts stand for."""
        if self.zeros is None:
            return self.q.float() * self.scales.float()[:, None]
        rows, columns = self.shape
        groups = unpack_nibbles(self.q).float().view(rows, self.scales.shape[1], -1)  # [N, K / group, group]
        return ((groups - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(rows, columns)


def pack_nibbles(q):
    """[N, K] integers in [0, 15] -> uint8 [N, K / 2]: column 2j in the low nibble of byte j, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed):
    """uint8 [N, K / 2] -> int32 [N, K], the inverse of pack_nibbles."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1).int()


def int4_fits(rows: int, columns: int, group: int) -> bool:
    """Whether the int4 kernel takes a [rows, columns] weight in groups of `group`: it needs rows divisible by 16."""
    return rows % 16 == 0 and group in INT4_GROUPS and columns % group == 0


def quantize_weight(weight, scheme: str, group: int = INT4_GROUP) -> QuantizedWeight:
    """A float weight [N, K] quantized to `scheme`, round to nearest. Scales and zero points are rounded to bfloat16
    (what the kernels take) before the values are, so that the values are rounded against the scales used.
    int4 falls back to int8 for a weight the int4 kernel cannot take (see int4_fits)."""
    w = weight.detach().float()
    rows, columns = w.shape
    if scheme == "int4" and int4_fits(rows, columns, group):
        groups = w.view(rows, -1, group)  # [N, K / group, group]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)  # q = 0 stands for the group's minimum
        q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
        return QuantizedWeight(pack_nibbles(q.view(rows, columns)), scale, zero)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [N]
    return QuantizedWeight((w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8), scale)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight [N, K] is kept quantized (a QuantizedWeight) and multiplied by PyTorch's
    packed-weight kernels, as gpt-fast does. Decoding reads every weight once per token, so its speed is set by the
    weights' bytes: int8 halves bfloat16's, int4 quarters them.

    - int8 (`torch._weight_int8pack_mm`): for DEQUANTIZE_ROWS rows or more, and on a GPU, the weight is rebuilt in
      the compute dtype, in a buffer kept for it (`scratch`: the size of the largest such layer), for one ordinary
      matrix multiply instead.
    - int4 (`torch._weight_int4pack_mm_for_cpu`): the values are repacked at load into the kernel's own layout, which
      depends on the CPU's vector width, so checkpoints store the portable one. CPU only.
    Activations reach the CPU kernels in bfloat16 (in float32 they are several times slower) and leave in their own
    dtype.
    """

    def __init__(self, stored: QuantizedWeight):
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.scheme = stored.scheme
        if self.scheme == "int8":
            self.register_buffer("weight", aligned(stored.q.contiguous()))  # [N, K] int8
            self.register_buffer("scales", stored.scales.to(torch.bfloat16).contiguous())  # [N]
        else:
            self.group = self.in_features // stored.scales.shape[1]
            # the kernel's layout packs blocks of 64 rows (or fewer) on their own, so packing a few blocks at a time
            # gives the same bytes without unpacking the whole weight to int32 (8 bytes per stored byte) at once
            rows = stored.q.split(PACKED_ROWS)
            packed = torch.cat([torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(part), 1) for part in rows])
            self.register_buffer("weight", packed)  # [N, K / 2] uint8, the kernel's layout
            self.register_buffer("scales", torch.stack([stored.scales, stored.zeros], dim=-1).transpose(0, 1)
                                 .to(torch.bfloat16).contiguous())  # [K / group, N, 2]

    @classmethod
    def quantized(cls, weight, scheme: str) -> "QuantizedLinear":
        return cls(quantize_weight(weight, scheme))

    def forward(self, x):
        flat = x.reshape(-1, self.in_features)
        if self.scheme == "int8" and (not x.is_cpu or flat.shape[0] >= DEQUANTIZE_ROWS):
            weight = scratch(self.weight.shape, x.dtype, x.device).copy_(self.weight)
            out = F.linear(flat, weight.mul_(self.scales.to(x.dtype)[:, None]))
        elif self.scheme == "int8":
            out = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales)
        else:
            out = torch._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), self.weight, self.group, self.scales)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


_SCRATCH = {}  # (dtype, device) -> the buffer int8 weights are rebuilt in, as large as the largest so far


def scratch(shape, dtype: torch.dtype, device: torch.device):
    """A buffer of this shape, reused from call to call: on this CPU a fresh buffer of a large weight's size costs
    page faults that take 8 times as long as rebuilding the weight in it (measured: 77 ms against 9.5 ms for an
    8640 x 2 by 3200 weight)."""
    numel = math.prod(shape)
    buffer = _SCRATCH.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def aligned(tensor):
    """The tensor, copied where its data does not start on a 64-byte boundary. A checkpoint's tensors are mapped from
    the file at whatever offset they sit, and the int8 kernel's vector loads crash the process on weights that are
    not 16-byte aligned."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def check_quantization(scheme: str, device: torch.device):
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {scheme!r}")
    if scheme == "int4" and device.type != "cpu":
        raise ValueError("int4 weights run on the CPU only (PyTorch's CUDA int4 kernel packs them otherwise): "
                         "use int8 on a GPU")


def linear_layers(model: "LongLlama") -> dict:
    """{qualified name: (parent module, attribute)} of every linear layer: attention, MLP and lm_head."""
    return {name: (model.get_submodule(name.rpartition(".")[0]) if "." in name else model, name.rpartition(".")[2])
            for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantizedLinear))}


def quantize(model: "LongLlama", scheme: str) -> "LongLlama":
    """Replace every linear layer's weight by its `scheme` (int8 or int4) quantization, in place, layer by layer.
    The embedding and the norms stay as they are (a lookup reads one row of the embedding per token)."""
    check_quantization(scheme, model.embed.weight.device)
    for name, (parent, attribute) in linear_layers(model).items():
        setattr(parent, attribute, QuantizedLinear.quantized(getattr(parent, attribute).weight, scheme))
    model.config = replace(model.config, quantization=scheme)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: a directory with config.json and model.safetensors


def tensors_to_save(state: dict, config: LongLlamaConfig) -> dict:
    """A model state dict as stored: contiguous, without the tied lm_head (safetensors stores each tensor once)."""
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    return {name: tensor.contiguous() for name, tensor in state.items() if name != tied}


def checkpoint_writers(out_dir: Path, config: LongLlamaConfig, state: dict) -> dict:
    """{path: writer} for config.json and model.safetensors, for `write_atomically` (callers may add files)."""
    tensors, config_text = tensors_to_save(state, config), json.dumps(config.to_dict(), indent=2) + "\n"
    return {out_dir / "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            out_dir / "config.json": lambda p: p.write_text(config_text)}


def write_atomically(writers: dict):
    """Write files {path: write(temporary_path)}: all to temporary names first, then each renamed over its path.

    An interrupted write leaves the previous files as they were and no temporaries; the renames come only once
    every file is complete. Files get the usual permissions (safetensors creates its files private).
    """
    mode = 0o666 & ~_umask()
    temporary = {Path(path): Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}") for path in writers}
    try:
        for (path, write), tmp in zip(writers.items(), temporary.values()):
            write(tmp)
            os.chmod(tmp, mode)
        for path, tmp in temporary.items():
            os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model: LongLlama, out_dir):
    """Write config.json and model.safetensors into out_dir (created if needed)."""
    if model.config.quantization:  # int4 weights are held in a layout of this CPU's: not what a checkpoint stores
        raise ValueError(f"a model with {model.config.quantization} weights is not saved: save it unquantized, and "
                         "quantize it when it loads (load(quantize=...)) or into a checkpoint (convert_weights.py "
                         "--quantize)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(checkpoint_writers(out_dir, model.config, model.state_dict()))


def resolve_device(name: Optional[str] = None) -> torch.device:
    """The device named ("cpu", "cuda", "cuda:1"; default: cuda when present, else cpu), refused unless it is here."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    return device


def check_can_compile(device: torch.device):
    """torch.compile's code for a CPU is C++, built by the compiler inductor looks for ($CXX, else g++): refuse in
    one line, before any work, where it is missing."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError(f"compiling on CPU needs a C++ compiler: {os.environ.get('CXX', 'g++')} does not run "
                         "(install g++ or set CXX)") from None


def available_bytes(device: torch.device) -> int:
    """Free memory: the GPU's on cuda, the RAM the kernel can hand out (MemAvailable) on cpu."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


def _refuse_mismatch(path, expected: set, found: set):
    for problem, names in (("missing", expected - found), ("unexpected", found - expected)):
        if names:
            raise ValueError(f"{path}: {problem} tensors {sorted(names)[:3]}{' ...' if len(names) > 3 else ''} "
                             "for this config")


def load(ckpt_dir, device="cpu", dtype=torch.float32, quantize: Optional[str] = None,
         **config_overrides) -> LongLlama:
    """Load a checkpoint directory; config_overrides (mem_layers, mem_dtype, ...) replace config.json values.
    quantize ("int8" or "int4"): every linear layer is quantized as it is read (see QuantizedLinear), so that no
    unquantized copy of the model exists at any time. A quantized checkpoint (config.json's "quantization") loads
    as it is stored; dtype is then that of the embedding, the norms and the activations between layers.

    Everything that can be checked is checked before the weights are read: the config, that the weights fit in
    the device's free memory, and that the file holds the layers the config says.
    """
    ckpt_dir, device = Path(ckpt_dir), resolve_device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    for name in ("config.json", "model.safetensors"):
        if not (ckpt_dir / name).is_file():
            raise ValueError(f"{ckpt_dir}: not a checkpoint directory ({name} is missing)")
    config = LongLlamaConfig.from_json(ckpt_dir / "config.json", **config_overrides)
    stored = config.quantization
    if quantize is not None and stored not in (None, quantize):
        raise ValueError(f"{ckpt_dir} holds {stored} weights: they load as they are (leave out quantize), or quantize "
                         f"the unquantized checkpoint to {quantize}")
    config.quantization = quantize = quantize or stored
    if quantize is not None:
        check_quantization(quantize, device)
    path = ckpt_dir / "model.safetensors"
    try:
        f = TensorFile(path, device)
        needed = f.loaded_bytes(dtype) + config.rope_bytes if stored else config.model_bytes(dtype)
        available = available_bytes(device)
        if needed > available:
            raise ValueError(f"{ckpt_dir}: the model needs {needed / 2**30:.1f} GiB in "
                             f"{str(dtype).removeprefix('torch.')}, {available / 2**30:.1f} GiB are free on {device}")
        model = _read_weights(f, config, path, dtype, stored)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    if config.tie_word_embeddings and quantize:  # lm_head, not in the file, is the embedding quantized
        model.lm_head = QuantizedLinear.quantized(model.embed.weight, quantize)
    elif config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.reset_rope()
    return model.eval()


class TensorFile:
    """A safetensors file whose tensors are each read through a mapping of the file of their own, released with the
    tensor. Loading then keeps resident only the pages of the tensors the model holds as they are stored, plus the
    one being read: one mapping for the whole load would keep every page read resident until loading ends (for int4
    weights, which are repacked as they load, a second copy of the model)."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = str(path), str(device)
        with safe_open(self.path, framework="pt", device=self.device) as f:
            self.names = set(f.keys())

    def keys(self) -> set:
        return self.names

    def loaded_bytes(self, dtype: torch.dtype) -> int:
        """Memory the file's tensors take once loaded, from its header alone: integer tensors (quantized weights) as
        stored, floating-point ones in dtype (bfloat16 scales and zero points too: they are small)."""
        with safe_open(self.path, framework="pt") as f:
            slices = [f.get_slice(name) for name in self.names]
            return sum(math.prod(s.get_shape()) * (1 if s.get_dtype() in ("I8", "U8") else dtype.itemsize)
                       for s in slices)

    def get_tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt", device=self.device) as f:
            return f.get_tensor(name)


def _read_weights(f: TensorFile, config: LongLlamaConfig, path: Path, dtype: torch.dtype,
                  stored: Optional[str]) -> LongLlama:
    """The model of `config` with the weights of a safetensors file, read one tensor at a time, so that peak memory
    is the model plus one tensor. Linear layers become QuantizedLinear as they are read when config is
    quantized: from their stored parts (`stored`), else quantized from float."""
    names = set(f.keys())
    if any(name.startswith("model.layers.") for name in names):
        raise ValueError(f"{path.parent} holds Hugging Face tensor names: convert it first "
                         f"(python convert_weights.py {path.parent} OUT_DIR)")
    # layers first, from the names alone: building a model of a million layers to compare takes minutes
    layers_in_file = {f"layers.{name.split('.')[1]}.*" for name in names if name.startswith("layers.")}
    _refuse_mismatch(path, {f"layers.{i}.*" for i in range(config.num_hidden_layers)}, layers_in_file)
    with torch.device("meta"):
        model = LongLlama(config)
    expected = {k: v.shape for k, v in tensors_to_save(model.state_dict(), config).items()}
    linear = linear_layers(model) if config.quantization else {}
    if stored:  # each linear layer's weight is stored as its parts: {layer}.weight, .scales and, for int4, .zeros
        expected.update({f"{layer}.scales": None for layer in linear if f"{layer}.weight" in expected})
        expected.update({name: None for name in names if name.endswith(".zeros")
                         and name.removesuffix(".zeros") in linear})
    _refuse_mismatch(path, set(expected), names)
    state = {}
    for name, shape in expected.items():
        layer = name.removesuffix(".weight")
        if layer in linear:  # quantized now, so that the model never holds it unquantized
            parent, attribute = linear[layer]
            setattr(parent, attribute, QuantizedLinear(
                _stored_weight(f, layer, shape, stored, path) if stored
                else quantize_weight(_float_tensor(f, name, shape, path), config.quantization)))
        elif name.endswith(".weight"):
            state[name] = _float_tensor(f, name, shape, path).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return model


def _float_tensor(f: TensorFile, name: str, shape, path: Path):
    tensor = f.get_tensor(name)
    if tensor.shape != shape:
        raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: {name} holds {tensor.dtype}, not floating-point weights")
    return tensor


def _stored_weight(f: TensorFile, layer: str, shape, scheme: str, path: Path) -> QuantizedWeight:
    """A linear layer's QuantizedWeight as a quantized checkpoint stores it, checked against its [N, K] shape."""
    names = [f"{layer}.weight", f"{layer}.scales"] + ([f"{layer}.zeros"] if f"{layer}.zeros" in f.keys() else [])
    return check_stored_weight(QuantizedWeight(*(f.get_tensor(name) for name in names)), shape, scheme,
                               f"{path}: {layer}")


def check_stored_weight(weight: QuantizedWeight, shape, scheme: Optional[str], where: str) -> QuantizedWeight:
    """The weight, refused unless its parts are a stored int8 or int4 weight of this [N, K] shape: int4 only where
    scheme allows it (None: either), in groups the int4 kernel takes."""
    parts = [part for part in weight if part is not None]
    rows, columns = shape
    groups = weight.scales.shape[-1] if weight.scales.dim() == 2 else 0
    if weight.scheme == "int4" and groups == 0:
        raise ValueError(f"{where} is not a stored int4 weight: its scales are {tuple(weight.scales.shape)}, not "
                         "[rows, groups]")
    if weight.scheme == "int8":
        expected = (torch.int8, (rows, columns)), (rows,)
    else:
        expected = (torch.uint8, (rows, columns // 2)), (rows, groups), (rows, groups)
    found = (parts[0].dtype, tuple(parts[0].shape)), *(tuple(part.shape) for part in parts[1:])
    if found != expected or not all(part.is_floating_point() for part in parts[1:]):
        found = ", ".join(f"{str(part.dtype).removeprefix('torch.')} {tuple(part.shape)}" for part in parts)
        raise ValueError(f"{where} is not a stored {weight.scheme} weight of shape {tuple(shape)} (found {found})")
    if weight.scheme == "int4" and scheme not in (None, "int4"):
        raise ValueError(f"{where} is stored as int4 in an {scheme} checkpoint")
    if weight.scheme == "int4" and (columns % groups or not int4_fits(rows, columns, columns // groups)):
        raise ValueError(f"{where} is stored as int4 in groups of {columns / groups:g} over {rows} rows: the int4 "
                         f"kernel takes groups of {', '.join(map(str, INT4_GROUPS))} and rows in multiples of 16")
    return weight
