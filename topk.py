"""Top-k memory: each memory-layer query attends to K memory entries only, as the FoT paper's kNN memory did.

LongLLaMA's memory layers attend to all of memory, so reading and answering grow with it. With `mem_topk = K` in
the config, `TopkMemory` takes the place of longllama.MemoryCache and narrows what the queries see
(`TopkMemory.seen_by`): an approximation of attending to all of memory, exact where the K entries hold nearly all
of each query's softmax mass.
- "exact" retrieval: the K entries each query scores highest (`topk_visible`). It scores every key, so it costs as
  much as attending to all of them: the correctness baseline.
- "blocks" retrieval: memory is summarised in blocks of `mem_block_size` consecutive entries by the per-dimension
  largest and smallest of their keys; the ceil(K / block size) blocks that each key/value head's queries can score
  highest on are read (`choose_blocks`), and nothing else, so reading and answering stop growing with memory.
- `mem_on_host`: entries stay in host RAM; only the chosen blocks cross to the GPU.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from longllama import Keys, LongLlamaConfig, MemoryCache

PROBES = 32  # query positions of a call that choose memory blocks (TopkMemory.choose_blocks)


@dataclass
class TopkMemory(MemoryCache):
    """A memory layer's memory whose queries attend to `topk` entries each (see the module docstring).

    Entries are held in `dtype` (mem_dtype) itself, half the bytes of float32 for bfloat16, since only the few
    entries chosen are cast for use.
    """

    topk: int = 0
    retrieval: str = "blocks"  # "blocks" or "exact"
    block_size: Optional[int] = None  # "blocks": entries a block of block_bounds summarises
    on_host: bool = False  # entries in host RAM (pinned when the compute device is a GPU), bounds on the device
    # [B, Hkv, capacity / block_size, 2D] float32: per dimension, the largest of a block's valid keys and the largest
    # of their negatives (minus the smallest); the lowest float where a block has no valid key yet
    block_bounds: Optional[torch.Tensor] = None

    @classmethod
    def for_config(cls, config: LongLlamaConfig, dtype: torch.dtype) -> "TopkMemory":
        block_size = config.mem_block_size if config.mem_retrieval == "blocks" else None
        return cls(dtype, topk=config.mem_topk, retrieval=config.mem_retrieval, block_size=block_size,
                   on_host=config.mem_on_host)

    def storage(self, like) -> tuple:
        return self.dtype, torch.device("cpu") if self.on_host else like.device

    def append(self, keys, values, valid):
        start = self.length
        super().append(keys, values, valid)
        self._bound(start, keys.to(self.dtype), valid)

    def adopt(self, keys, values, valid, like):
        super().adopt(keys, values, valid, like)
        if self.block_size:  # the bounds live on the compute device
            self._new_bounds(keys.shape[0], keys.shape[1], self.length, keys.shape[3], like.device)
            self._bound(0, keys.to(like.device), valid.to(like.device))

    def reserve(self, capacity: int, like):
        if self.keys is not None and capacity <= self.keys.shape[2] and self.owned:
            return
        old_bounds, used = self.block_bounds, -(-self.length // self.block_size) if self.block_size else 0
        super().reserve(capacity, like)
        if self.block_size:
            self._new_bounds(like.shape[0], like.shape[1], capacity, like.shape[3], like.device)
            if used:
                self.block_bounds[:, :, :used] = old_bounds[:, :, :used]

    def _new_bounds(self, batch_size: int, kv_heads: int, capacity: int, head_dim: int, device):
        blocks = -(-capacity // self.block_size)
        self.block_bounds = torch.full((batch_size, kv_heads, blocks, 2 * head_dim), torch.finfo(torch.float32).min,
                                       device=device)

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

    def _narrows(self) -> bool:
        """Whether the choice would leave out some entry: else memory is attended whole."""
        chosen = self.topk if self.retrieval == "exact" else self._blocks_wanted() * self.block_size
        return chosen < self.length

    def _blocks_wanted(self) -> int:
        return -(-self.topk // self.block_size)  # ceil: at least K entries

    def seen_by(self, q, padding: bool) -> Keys:
        """What the queries q [B, G, R, T, D] see of memory: the entries of the blocks their key/value head wants
        most, the K best entries of each query (by the formula), or, where that leaves nothing out, all of it."""
        if self._narrows() and self.retrieval == "blocks":
            keys, values, valid = self.select_blocks(q, self._blocks_wanted())
            return Keys(keys, values, valid[:, :, None, None, :])  # [B, G, 1, 1, S]: chosen per key/value head
        keys, values, valid = (x.to(q.device) for x in self.view())  # on_host: copied over whole
        visible = valid[:, None, None, None, :]  # [B, 1, 1, 1, M]
        if not self._narrows():
            return Keys(keys.to(q.dtype), values.to(q.dtype), visible, unpadded=not padding)
        scores = q.float() @ keys.float()[:, :, None].transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, G, R, T, M]
        return Keys(keys, values, topk_visible(scores, visible, self.topk), by_formula=True, scores=scores)

    def entries_seen(self, q):
        """[B, H, T, M] bool: the memory entries each of the queries q [B, H, T, D] attends to, as seen_by chooses
        them; for reading attention weights (passkey.py), not for computing attention."""
        seen = super().entries_seen(q)
        if not self._narrows():
            return seen
        batch_size, heads, length, head_dim = q.shape
        kv_heads = self.keys.shape[1]
        grouped = q.view(batch_size, kv_heads, heads // kv_heads, length, head_dim)  # [B, G, R, T, D]
        if self.retrieval == "exact":
            scores = grouped.float() @ self.view()[0].to(q.device).float()[:, :, None].transpose(-1, -2)
            return topk_visible(scores.flatten(1, 2), seen, self.topk)
        blocks = self.choose_blocks(grouped, self._blocks_wanted())  # [B, G, n]
        chosen = torch.zeros(batch_size, kv_heads, -(-self.length // self.block_size), dtype=torch.bool,
                             device=q.device).scatter_(-1, blocks, True)
        chosen = chosen.repeat_interleave(self.block_size, dim=-1)[..., :self.length]  # [B, G, M]
        return seen & chosen.repeat_interleave(heads // kv_heads, dim=1)[:, :, None]

    def select_blocks(self, q, count: int):
        """The entries of the `count` blocks each key/value head's queries q [B, G, R, T, D] want most
        (`choose_blocks`): keys, values [B, G, count * block_size, D] (in q's dtype) and valid
        [B, G, count * block_size], in memory order."""
        entries = (self.choose_blocks(q, count)[..., None] * self.block_size
                   + torch.arange(self.block_size, device=q.device)).flatten(2)  # [B, G, n * block_size]
        inside = entries < self.length  # the last block may not be full yet
        entries = entries.clamp(max=self.length - 1).to(self.keys.device)  # on_host: only the chosen cross over
        index = entries[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        keys, values = (x.gather(2, index).to(q.device, q.dtype, non_blocking=True) for x in (self.keys, self.values))
        valid = self.valid[:, None].expand(-1, entries.shape[1], -1).gather(2, entries).to(q.device) & inside
        return keys, values, valid

    def choose_blocks(self, q, count: int):
        """[B, G, count]: the blocks, in memory order, that each key/value head's queries q [B, G, R, T, D] want
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
        probes = q[:, :, :, probe_positions(q.shape[3], q.device)].flatten(2, 3).float()  # [B, G, R*P, D]
        probes = probes / math.sqrt(q.shape[-1])  # scaled as attention scales: the shares are its softmax's
        # q.k <= relu(q).max(k) + relu(-q).max(-k), per dimension; -inf for a block of padding only
        bound = torch.cat([probes.clamp(min=0), (-probes).clamp(min=0)], dim=-1) @ self.block_bounds[:, :, :blocks].mT
        best = (bound - bound.logsumexp(dim=-1, keepdim=True)).amax(dim=2)  # [B, G, N]: the largest log-share
        return best.topk(min(count, blocks), dim=-1).indices.sort(dim=-1).values


def probe_positions(length: int, device=None):
    """The positions, of a call's `length` queries, whose queries choose memory blocks: all of them up to PROBES,
    else PROBES evenly spaced ones ending with the last (the one a generated token comes from)."""
    if length <= PROBES:
        return torch.arange(length, device=device)
    return length - 1 - (length // PROBES) * torch.arange(PROBES - 1, -1, -1, device=device)


def topk_visible(scores, visible, topk: int):
    """visible [.., Q, S] (broadcastable to scores), narrowed to the `topk` visible keys of highest score per query."""
    scores = scores.masked_fill(~visible, float("-inf"))
    chosen = scores.topk(min(topk, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True) & visible
