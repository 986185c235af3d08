"""A naive float64 LongLLaMA for the tests, written independently of longllama.py.

It re-states the original implementation (the Hugging Face remote code of LongLLaMA) step by step rather than
efficiently: the local cache keeps *unrotated* keys with their absolute position ids and re-rotates them at every
call relative to the oldest one, masks are additive, memory and local logits are concatenated explicitly, key/value
heads are repeated for grouped-query attention, and the whole previous local cache is dropped into memory when the
cache would outgrow the window. Only the weights are taken from the model under test.
"""

import math

import torch


def rope_angles(positions, head_dim, theta):
    """[..., head_dim] rotation angles of integer positions, frequencies theta^(-2i/d) repeated twice."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * freqs
    return torch.cat([angles, angles], dim=-1)


def rotate(x, positions, theta):
    """x [B, H, S, D] rotated to positions [B, S] (rotate-half layout)."""
    angles = rope_angles(positions, x.shape[-1], theta)[:, None]  # [B, 1, S, D]
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * angles.cos() + rotated_half * angles.sin()


class NaiveLongLlama:
    def __init__(self, model):
        c = model.config
        self.c = c
        sd = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}
        self.embed = sd["embed.weight"]
        self.norm = sd["norm.weight"]
        self.lm_head = sd["lm_head.weight"]
        d, h, hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        self.layers = []
        for i in range(c.num_hidden_layers):
            wq, wk, wv = sd[f"layers.{i}.attention.wqkv.weight"].split([h * d, hkv * d, hkv * d])
            gate, up = sd[f"layers.{i}.mlp.gate_up.weight"].chunk(2)
            self.layers.append(dict(
                wq=wq, wk=wk, wv=wv, wo=sd[f"layers.{i}.attention.wo.weight"], gate=gate, up=up,
                down=sd[f"layers.{i}.mlp.down.weight"],
                norm1=sd[f"layers.{i}.attention_norm.weight"], norm2=sd[f"layers.{i}.mlp_norm.weight"]))
        self.mem_dtype = getattr(torch, c.mem_dtype)
        self.local = None  # per layer: (keys [B, H, S, D] unrotated, values, position ids [B, S])
        self.local_mask = None  # [B, S] 1 for real tokens
        self.memory = [None] * c.num_hidden_layers  # per memory layer: (keys, values, additive mask [B, M])

    # ------------------------------------------------------------------ building blocks
    def rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps))

    def store(self, x):
        """Round-trip through the memory dtype, as storing in memory does."""
        return x.to(self.mem_dtype).to(torch.float64)

    def attention(self, i, x, positions, mask, use_cache):
        c, p = self.c, self.layers[i]
        b, t, _ = x.shape
        h, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = (x @ p["wq"].T).view(b, t, h, d).transpose(1, 2)
        k = (x @ p["wk"].T).view(b, t, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
        v = (x @ p["wv"].T).view(b, t, hkv, d).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
        is_mem = i in c.mem_layers
        positionals = not is_mem or c.mem_positionals
        past = self.local[i] if self.local is not None else None
        memory = self.memory[i]

        update = None
        if is_mem and past is None and not use_cache:
            update = (self.store(k), self.store(v), mask[:, -1, :])  # mask of the window's last query
        if past is not None:
            drop = past[0].shape[2]
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
            positions = torch.cat([past[2], positions], dim=1)
            if k.shape[2] > c.max_position_embeddings:
                if is_mem and use_cache:
                    evicted = (self.store(k[:, :, :drop]), self.store(v[:, :, :drop]), mask[:, -1, :drop])
                    memory = evicted if memory is None else tuple(torch.cat([a, e], dim=-2 if a.dim() == 4 else 1)
                                                                  for a, e in zip(memory, evicted))
                k, v, positions, mask = k[:, :, drop:], v[:, :, drop:], positions[:, drop:], mask[..., drop:]
        new_past = (k, v, positions) if use_cache else None

        if positionals:
            rel = positions - positions.min(dim=1, keepdim=True).values
            q = rotate(q, rel[:, -t:], c.rope_theta)
            k = rotate(k, rel, c.rope_theta)
        if is_mem and c.mem_attention_logn is not None:  # log-n scaling: n = the keys a query attends to
            local_keys = k.shape[2] - t + 1 + torch.arange(t, dtype=torch.float64)  # its own and those before it
            mem_keys = 0 if memory is None else memory[0].shape[2] if c.mem_topk is None else \
                min(c.mem_topk, memory[0].shape[2])
            factor = torch.log(local_keys + mem_keys) / math.log(c.mem_attention_logn)
            q = q * torch.where(factor > 1, factor, 1.0)[:, None]  # [T, 1]: all of each query's logits
        logits = q @ k.transpose(-1, -2) / math.sqrt(d) + mask[:, None]
        values = v
        if memory is not None:
            mem_k, mem_v, mem_mask = memory
            mem_logits = q @ mem_k.transpose(-1, -2) / math.sqrt(d) + mem_mask[:, None, None, :]
            chosen = self.chosen_memory(q, mem_k, mem_mask)
            if chosen is not None:
                mem_logits = mem_logits.masked_fill(~chosen, torch.finfo(torch.float64).min)
            logits = torch.cat([logits, mem_logits], dim=-1)
            values = torch.cat([v, mem_v], dim=2)
        logits = logits.clamp(min=-1e6)
        out = torch.softmax(logits, dim=-1) @ values
        if update is not None:
            memory = update if memory is None else (torch.cat([memory[0], update[0]], 2),
                                                    torch.cat([memory[1], update[1]], 2),
                                                    torch.cat([memory[2], update[2]], 1))
        self.memory[i] = memory
        return out.transpose(1, 2).reshape(b, t, h * d) @ p["wo"].T, new_past

    def chosen_memory(self, q, mem_k, mem_mask):
        """With mem_topk: [B, H, T, M] bool, the memory entries each query may attend to (None: all of them).

        exact: the mem_topk best-scoring valid entries of each query. blocks: memory cut into blocks of
        mem_block_size entries in reading order; a query's bound for a block is the sum over dimensions of the larger
        of q * max and q * min of the block's valid keys (scaled as logits); each query's bounds go through a
        log-softmax over the blocks; a block's score for a key/value head is the largest of those over the call's
        queries at up to 32 positions (all of them, or 32 evenly spaced ending with the last), in every query head of
        the group; the ceil(mem_topk / mem_block_size) best blocks are open to all the call's queries.
        """
        c = self.c
        k, (b, h, t, _), m = c.mem_topk, q.shape, mem_k.shape[2]
        valid = mem_mask == 0  # [B, M]
        if k is None:
            return None
        if c.mem_retrieval == "exact":
            if k >= m:
                return None
            scores = (q @ mem_k.transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf"))
            best = scores.topk(k, dim=-1).indices
            return torch.zeros(b, h, t, m, dtype=torch.bool).scatter_(-1, best, True)
        size = c.mem_block_size
        count = -(-k // size)
        if count * size >= m:
            return None
        per_kv = h // c.num_key_value_heads
        chosen = torch.zeros(b, h, t, m, dtype=torch.bool)
        for row in range(b):
            for first_head in range(0, h, per_kv):
                heads = slice(first_head, first_head + per_kv)
                # the queries of every head of the group at the probe positions: all, or 32 evenly spaced ending last
                positions = range(t) if t <= 32 else [t - 1 - (t // 32) * j for j in range(32)]
                queries = q[row, heads][:, list(positions)].reshape(-1, q.shape[-1]) / math.sqrt(q.shape[-1])
                bounds = []  # [blocks] of [queries]: the most a key of the block could score
                for start in range(0, m, size):
                    keys = mem_k[row, first_head, start:start + size][valid[row, start:start + size]]
                    if len(keys) == 0:
                        bounds.append(torch.full((len(queries),), float("-inf"), dtype=torch.float64))
                        continue
                    top, bottom = keys.max(dim=0).values, keys.min(dim=0).values
                    bounds.append(torch.maximum(queries * top, queries * bottom).sum(dim=-1))
                shares = torch.log_softmax(torch.stack(bounds, dim=1), dim=1)  # [queries, blocks]
                best = shares.max(dim=0).values.tolist()
                for block in sorted(range(len(best)), key=lambda i: -best[i])[:count]:
                    chosen[row, heads, :, block * size:(block + 1) * size] = True
        return chosen

    def model_call(self, ids, pad_mask, use_cache):
        """One call of the underlying model on ids [B, T] (at most a window), as the original's LongLlamaModel."""
        b, t = ids.shape
        start = 0 if self.local is None else int(self.local[0][2].max()) + 1
        positions = torch.arange(start, start + t).expand(b, t)
        past_len = 0 if self.local is None else self.local[0][0].shape[2]
        full_pad = pad_mask if self.local is None else torch.cat([self.local_mask, pad_mask], dim=1)
        # additive mask [B, T, past+T]: causal over the new tokens, padding over every key
        allowed = torch.ones(t, past_len + t, dtype=torch.bool).tril(past_len) & full_pad[:, None, :].bool()
        mask = torch.zeros(b, t, past_len + t, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
        x = self.embed[ids]
        new_local = []
        for i, p in enumerate(self.layers):
            a, past = self.attention(i, self.rms(x, p["norm1"]), positions, mask, use_cache)
            x = x + a
            hn = self.rms(x, p["norm2"])
            x = x + (torch.nn.functional.silu(hn @ p["gate"].T) * (hn @ p["up"].T)) @ p["down"].T
            new_local.append(past)
        if use_cache:
            kept = new_local[0][0].shape[2]
            self.local = new_local
            self.local_mask = full_pad[:, -kept:]
        return self.rms(x, self.norm) @ self.lm_head.T

    # ------------------------------------------------------------------ the original's long-input handling
    def __call__(self, ids, use_cache=False, last_context_length=None, attention_mask=None):
        c = self.c
        lcl = c.last_context_length if last_context_length is None else last_context_length
        b, length = ids.shape
        pad = torch.ones(b, length, dtype=torch.long) if attention_mask is None else attention_mask.long()
        to_memory = max(length - lcl, 0)
        logits = []
        for beg in range(0, to_memory, c.max_position_embeddings):
            end = min(to_memory, beg + c.max_position_embeddings)
            logits.append(self.model_call(ids[:, beg:end], pad[:, beg:end], self.local is not None and use_cache))
        if length > to_memory:
            logits.append(self.model_call(ids[:, to_memory:], pad[:, to_memory:], use_cache))
        return torch.cat(logits, dim=1)

    @property
    def memory_size(self):
        return max((m[0].shape[2] for m in self.memory if m is not None), default=0)
