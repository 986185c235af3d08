"""Cross-batch training attention (FoT training) against a naive per-element loop, and the consistency law."""

import math

import pytest
import torch

import longllama
from test_model import assert_close, tiny_model, tokens


def naive_cross_batch(q, k, k_first, v, d, stepping, packing):
    """Element by element: own keys causally, then all keys of each earlier element it may see (float64)."""
    q, k, k_first, v = (x.double() for x in (q, k, k_first, v))
    rep = q.shape[1] // k.shape[1]
    k, k_first, v = (x.repeat_interleave(rep, dim=1) for x in (k, k_first, v))
    batch_size, _, length, head_dim = q.shape
    step = math.ceil((d + 1) / max(packing - 1, 1))
    out = torch.zeros_like(q)
    for b in range(batch_size):
        contexts = min(b % packing * step + 1, d + 1) if stepping and packing > 1 else d + 1
        others = [j for j in range(1, contexts) if b - j >= 0]
        for t in range(length):
            keys = torch.cat([k[b, :, :t + 1]] + [k_first[b - j] for j in others], dim=1)
            values = torch.cat([v[b, :, :t + 1]] + [v[b - j] for j in others], dim=1)
            weights = torch.softmax(q[b, :, t:t + 1] @ keys.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
            out[b, :, t] = (weights @ values)[:, 0]
    return out


@pytest.mark.parametrize("d,stepping,packing", [(0, False, 1), (1, False, 1), (3, False, 1), (2, False, 2),
                                                (3, True, 2), (5, True, 3), (7, True, 4), (2, True, 1)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cross_batch_attention_matches_naive_loop(d, stepping, packing, kv_heads):
    g = torch.Generator().manual_seed(d * 100 + packing * 10 + kv_heads)
    batch_size, heads, length, head_dim = 12, 4, 6, 8
    q = torch.randn(batch_size, heads, length, head_dim, generator=g)
    k, k_first, v = torch.randn(3, batch_size, kv_heads, length, head_dim, generator=g)
    out = longllama.cross_batch_attention(q, k, k_first, v, d, stepping=stepping, packing=packing)
    assert_close(out, naive_cross_batch(q, k, k_first, v, d, stepping, packing), atol=1e-5)


def test_cross_batch_rejects_a_batch_not_divisible_by_packing():
    x = torch.zeros(3, 2, 4, 8)
    with pytest.raises(ValueError, match="packing"):
        longllama.cross_batch_attention(x, x, x, x, 1, packing=2)


@pytest.mark.parametrize("mem_positionals", [True, False])
def test_training_logits_of_element_1_equal_inference_with_element_0_in_memory(mem_positionals):
    """The consistency law: d = 1, k = 2, and element 0 loaded into memory first (last_context_length = T)."""
    length = 12
    model = tiny_model(mem_layers=[0, 2], mem_positionals=mem_positionals)
    batch = tokens(2, length)
    with torch.no_grad():
        training, _ = model(batch, cross_batch_range=1, packing=2)
        inference, cache = model(batch.reshape(1, 2 * length), last_context_length=length)
    assert cache.memory_size == 2 * length
    assert_close(training[1], inference[0, length:].double(), atol=5e-5)
    assert_close(training[0], inference[0, :length].double(), atol=5e-5)


def test_non_memory_layers_stay_causal_in_training():
    model = tiny_model(mem_layers=[])
    batch = tokens(4, 10)
    with torch.no_grad():
        training, _ = model(batch, cross_batch_range=3)
        alone, _ = model(batch[2:3], last_context_length=10)
    assert_close(training[2:3], alone.double(), atol=5e-5)


def test_training_forward_backward_with_activation_checkpointing_gives_the_same_gradients():
    model = tiny_model(mem_layers=[1]).train()
    batch = tokens(4, 10)

    def gradients():
        model.zero_grad()
        logits, _ = model(batch, cross_batch_range=2, stepping=True, packing=2)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.activation_checkpointing = True
    checkpointed = gradients()
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6)
