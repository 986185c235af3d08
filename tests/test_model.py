"""longllama.py inference against the naive float64 reference in tests/reference.py, with both attention kernels."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import checks
import generate
import longllama
import quantize
import topk
from reference import NaiveLongLlama, rotate

WINDOW = 16


@pytest.fixture(autouse=True, params=["fused", "plain"])
def kernel(request, monkeypatch):
    """Every test runs with the fused kernels (merged by log-sum-exp) and with the written-out formula."""
    monkeypatch.setattr(longllama.LongLlama, "attention_kernel", request.param)
    return request.param


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=WINDOW, mem_layers=[1], last_context_length=6, mem_dtype="float32")
    values.update(overrides)
    model = longllama.LongLlama(longllama.LongLlamaConfig(**values)).eval()
    # larger weights than the init's 0.02, so that attention patterns are far from uniform and errors show
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def tokens(batch, length, seed=1):
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol=2e-4):
    diff = (actual.double() - expected).abs().max().item()
    assert diff < atol, f"max abs difference {diff}"


@torch.no_grad()
def run_both(model, calls, atol=2e-4, **kwargs):
    """Run the same sequence of calls [(ids, use_cache, attention_mask)] through model and reference."""
    reference = NaiveLongLlama(model)
    cache = None
    for ids, use_cache, mask in calls:
        logits, cache = model(ids, cache=cache, use_cache=use_cache, attention_mask=mask, **kwargs)
        expected = reference(ids, use_cache=use_cache, attention_mask=mask, **kwargs)
        rows = slice(None) if mask is None else mask.bool()
        assert_close(logits[rows] if mask is not None else logits, expected[rows] if mask is not None else expected, atol)
    assert cache.memory_size == reference.memory_size
    return cache


# ---------------------------------------------------------------------------------------------------- attention


def naive_attention(q, local_k, local_v, local_visible, mem_k, mem_v, mem_valid):
    """float64, explicit concatenation of local and memory keys with explicit masks."""
    q, local_k, local_v, mem_k, mem_v = (x.double() for x in (q, local_k, local_v, mem_k, mem_v))
    rep = q.shape[1] // local_k.shape[1]
    keys = torch.cat([local_k, mem_k], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([local_v, mem_v], dim=2).repeat_interleave(rep, dim=1)
    visible = torch.cat([local_visible, mem_valid[:, None, :].expand(-1, q.shape[2], -1)], dim=-1)  # [B, T, S+M]
    logits = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1) @ values


@pytest.mark.parametrize("heads,kv_heads,grouping", [(4, 4, None), (4, 4, (1, 1)), (4, 4, (3, 5)), (6, 2, (2, 4)),
                                                     (6, 3, None), (6, 1, (4, 7))])
@pytest.mark.parametrize("masks", ["padded", "causal", "all slots"])
def test_grouped_attention_matches_naive_attention(heads, kv_heads, grouping, masks, kernel):
    """Masks as reading makes them: with padding (applied as given), causal (left to the kernels), and over all
    local slots, some after the last query, as a compiled decode step has them (its local attention written out)."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    b, t, start, m, d = 2, 9, 5, 13, 8
    slots = start + t + (4 if masks == "all slots" else 0)
    q = torch.randn(b, heads, t, d, generator=g)
    local_k, local_v = torch.randn(2, b, kv_heads, slots, d, generator=g)
    mem_k, mem_v = torch.randn(2, b, kv_heads, m, d, generator=g)
    padding = masks == "padded"
    key_valid = torch.rand(b, slots, generator=g) > 0.2 if padding else torch.ones(b, slots, dtype=torch.bool)
    key_valid[:, start + t - 1] = True
    mem_valid = torch.rand(b, m, generator=g) > 0.3 if padding else torch.ones(b, m, dtype=torch.bool)
    visible = longllama.causal_visible(start, t, key_valid)
    local = longllama.Keys(local_k, local_v, visible, unpadded=masks == "causal", by_formula=masks == "all slots")
    memory = longllama.Keys(mem_k, mem_v, mem_valid[:, None, None, None, :], unpadded=not padding)
    attend, grouped_q = longllama.ATTENTION_KERNELS[kernel], q.view(b, kv_heads, heads // kv_heads, t, d)
    if grouping is None:
        out = attend(grouped_q, local, memory)
    else:
        out = longllama.grouped_attention(grouped_q, local, memory, grouping, attend)
    out = out.reshape(b, heads, t, d)

    causal = torch.arange(slots)[None, :] <= torch.arange(start, start + t)[:, None]
    expected = naive_attention(q, local_k, local_v, causal & key_valid[:, None, :], mem_k, mem_v, mem_valid)
    assert_close(out, expected, atol=1e-5)


def test_rope_matches_reference_rotation():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 10, 8)
    cos, sin = longllama.rope_tables(8, 10, 500.0)
    expected = rotate(x.double(), torch.arange(10)[None], 500.0)
    assert_close(longllama.apply_rope(x, cos, sin), expected, atol=1e-5)
    assert_close(longllama.apply_rope(longllama.apply_rope(x, cos, sin), cos, -sin), x.double(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- long inputs


def test_long_input_over_many_windows_matches_reference():
    model = tiny_model()
    cache = run_both(model, [(tokens(2, 5 * WINDOW + 3), False, None)])
    assert cache.memory_size == 5 * WINDOW + 3  # without a local cache everything ends in memory
    assert cache.local is None


def test_prompt_then_step_by_step_decoding_through_many_evictions_matches_reference():
    model = tiny_model(mem_layers=[0, 2])
    calls = [(tokens(2, 3 * WINDOW + 5), True, None)]
    calls += [(tokens(2, 1, seed=100 + i), True, None) for i in range(3 * WINDOW)]
    cache = run_both(model, calls)
    assert 0 < cache.local_length <= WINDOW


def can_compile() -> bool:
    try:
        checks.check_can_compile(torch.device("cpu"))
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not can_compile(), reason="torch.compile on CPU needs a C++ compiler"))], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", ["left-padded", "grouped", "top-k blocks", "top-k exact", "log-n"])
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)  # never quietly fall back to running eagerly
def test_decode_steps_over_blocks_of_local_slots_match_reference_through_evictions(case, compiled, kernel):
    """compile_decode's step (whole blocks of local slots under a mask, local attention written out) against the float64
    reference, through evictions: with padding (masks everywhere) and with grouped-query heads and
    mem_attention_grouping (no padding: the memory kernel runs mask-free), with top-k memory (bfloat16), and with
    log-n scaling (its factors computed outside the step, passed in). Eagerly too, so that the step's attention is
    checked where no compiler is."""
    if kernel == "plain":
        pytest.skip("the step's written-out local attention belongs to the fused path")
    torch._dynamo.reset()  # compilations of _layers so far (other models) do not count towards the limit
    if case in ("left-padded", "log-n"):
        model = tiny_model(mem_layers=[0, 2], mem_attention_logn=8 if case == "log-n" else None)
        ids, mask = tokens(2, 2 * WINDOW + 3), torch.ones(2, 2 * WINDOW + 3)
        mask[1, :WINDOW + 2] = 0
    elif case == "grouped":
        model = tiny_model(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, mem_layers=[1],
                           mem_attention_grouping=(2, 1))
        ids, mask = tokens(2, 2 * WINDOW + 3), None
    else:
        model = tiny_model(mem_layers=[0, 2], mem_dtype="bfloat16", **TOPK[case.split()[1]])
        ids, mask = tokens(2, 2 * WINDOW + 3), None
    model.decode_slot_block = 5  # blocks of slots that end before the window does, the last cut short by it
    step_function = model.compile_decode().compiled_layers if compiled else longllama.LongLlama._layers
    steps = []
    model.compiled_layers = lambda *args: steps.append(args[-1]) or step_function(*args)
    calls = [(ids, True, mask)] + [(tokens(2, 1, seed=500 + i), True, None) for i in range(2 * WINDOW + 4)]
    cache = run_both(model, calls, atol=3e-3 if case.startswith("top-k") else 2e-4)
    assert len(steps) == 2 * WINDOW + 4 and all(window.compiled for window in steps)
    assert cache.memory_size > 3 * WINDOW  # the steps evicted the local window into memory twice


def test_continuation_calls_of_several_tokens_and_a_long_follow_up_match_reference():
    model = tiny_model()
    calls = [(tokens(2, 2 * WINDOW), True, None)]
    calls += [(tokens(2, n, seed=200 + n), True, None) for n in (3, 5, 7, 1, WINDOW, 2)]
    calls.append((tokens(2, 3 * WINDOW + 4, seed=300), True, None))  # long question: windows through the local cache
    calls += [(tokens(2, 1, seed=400 + i), True, None) for i in range(5)]
    run_both(model, calls)


def test_batch_of_three_with_grouped_query_attention_and_rope_theta_matches_reference():
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, rope_theta=1e6,
                       mem_layers=[1, 2], last_context_length=10)
    calls = [(tokens(3, 4 * WINDOW + 7), True, None)] + [(tokens(3, 1, seed=10 + i), True, None) for i in range(20)]
    run_both(model, calls)


@pytest.mark.parametrize("grouping", [(1, 1), (2, 3), (3, 16), (100, 100)])
def test_mem_attention_grouping_changes_nothing(grouping):
    ungrouped = tiny_model(num_attention_heads=4, num_key_value_heads=2)
    grouped = tiny_model(num_attention_heads=4, num_key_value_heads=2, mem_attention_grouping=grouping)
    grouped.load_state_dict(ungrouped.state_dict())
    ids, step = tokens(2, 3 * WINDOW + 2), tokens(2, 1, seed=5)
    with torch.no_grad():
        a, cache_a = ungrouped(ids, use_cache=True)
        b, cache_b = grouped(ids, use_cache=True)
        assert_close(b, a.double(), atol=1e-5)
        for _ in range(WINDOW + 3):
            a, cache_a = ungrouped(step, cache=cache_a, use_cache=True)
            b, cache_b = grouped(step, cache=cache_b, use_cache=True)
            assert_close(b, a.double(), atol=1e-5)
    run_both(grouped, [(ids, True, None), (step, True, None)])


def test_bfloat16_memory_matches_reference_storing_bfloat16():
    model = tiny_model(mem_dtype="bfloat16")
    calls = [(tokens(2, 3 * WINDOW + 1), True, None)] + [(tokens(2, 1, seed=i), True, None) for i in range(WINDOW)]
    # float32 and float64 keys occasionally round to neighbouring bfloat16 values: a looser tolerance
    cache = run_both(model, calls, atol=3e-3)
    keys, values, _ = cache.memory[1].view()  # kept in the compute dtype, holding bfloat16 values
    assert torch.equal(keys, keys.bfloat16().float()) and torch.equal(values, values.bfloat16().float())


def test_no_positionals_in_memory_layers_matches_reference():
    model = tiny_model(mem_positionals=False, mem_layers=[0, 1])
    calls = [(tokens(2, 3 * WINDOW + 1), True, None)] + [(tokens(2, 1, seed=i), True, None) for i in range(WINDOW)]
    run_both(model, calls)


def test_left_padded_batch_matches_reference():
    model = tiny_model()
    ids = tokens(2, 3 * WINDOW)
    mask = torch.ones_like(ids)
    mask[1, :WINDOW + 3] = 0  # row 1 is left-padded past the first window
    calls = [(ids, True, mask)] + [(tokens(2, 1, seed=i), True, torch.ones(2, 1)) for i in range(WINDOW + 2)]
    cache = run_both(model, calls)
    _, _, valid = cache.memory[1].view()
    assert not valid[1, :WINDOW + 3].any() and valid[1, WINDOW + 3:].all() and valid[0].all()


def test_padding_is_invisible_within_one_window():
    model = tiny_model(last_context_length=WINDOW)
    ids = tokens(1, 10)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1)
    with torch.no_grad():
        alone, _ = model(ids, use_cache=True)
        batched, _ = model(torch.cat([padded, torch.cat([ids, ids[:, :4]], 1)]), use_cache=True,
                           attention_mask=torch.cat([mask, torch.ones(1, 14)]))
    assert_close(batched[0, 4:], alone[0].double(), atol=5e-5)


# ---------------------------------------------------------------------------------------------------- equivalences


def test_step_by_step_decoding_equals_one_full_forward_within_a_window():
    model = tiny_model(last_context_length=WINDOW)
    ids = tokens(2, WINDOW)
    with torch.no_grad():
        full, _ = model(ids)
        logits, cache = model(ids[:, :3], use_cache=True)
        steps = [logits]
        for t in range(3, WINDOW):
            logits, cache = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(logits)
    assert_close(torch.cat(steps, dim=1), full.double(), atol=5e-5)
    assert cache.memory_size == 0


def test_without_memory_layers_the_model_is_plain_llama():
    model = tiny_model(mem_layers=[], last_context_length=WINDOW)
    ids = tokens(2, WINDOW)
    with torch.no_grad():
        logits, cache = model(ids)
    # plain LLaMA: standard RoPE at absolute positions, causal attention, no memory anywhere
    expected = NaiveLongLlama(model)(ids, use_cache=False, last_context_length=WINDOW)
    assert_close(logits, expected)
    assert cache.memory == {}


def test_last_logits_only_is_the_last_row_of_all_logits():
    model = tiny_model()
    ids = tokens(2, 2 * WINDOW + 3)
    with torch.no_grad():
        full, _ = model(ids, use_cache=True)
        last, _ = model(ids, use_cache=True, last_logits_only=True)
    assert last.shape == (2, 1, 61)
    assert_close(last, full[:, -1:].double(), atol=1e-5)


@pytest.mark.parametrize("mem_layers", [[1], [0, 2], []])
def test_reading_for_the_last_logits_only_skips_what_memory_does_not_need_and_changes_no_result(mem_layers):
    """Windows read into memory stop at the last memory layer's keys and values; the last logits and every later
    step stay those of the reference, which computes every layer of every window."""
    model = tiny_model(mem_layers=mem_layers)
    ids = tokens(2, 3 * WINDOW + 5)
    mask = torch.ones_like(ids)
    mask[1, :WINDOW + 3] = 0  # left padding over a whole window and into the next
    reference = NaiveLongLlama(model)
    last, cache = model(ids, use_cache=True, attention_mask=mask, last_logits_only=True)
    assert_close(last, reference(ids, use_cache=True, attention_mask=mask)[:, -1:])
    for seed in range(WINDOW):  # on through an eviction of the local window into memory
        step = tokens(2, 1, seed=seed)
        logits, cache = model(step, cache=cache, use_cache=True)
        assert_close(logits, reference(step, use_cache=True, attention_mask=torch.ones_like(step)))
    assert cache.memory_size == reference.memory_size


def test_cache_copy_answers_several_questions_about_one_document():
    model = tiny_model()
    document, q1, q2 = tokens(1, 3 * WINDOW), tokens(1, 4, seed=7), tokens(1, 5, seed=8)
    with torch.no_grad():
        _, read_once = model(document, use_cache=True)
        a1, _ = model(q1, cache=read_once.copy(), use_cache=True)
        a2, _ = model(q2, cache=read_once.copy(), use_cache=True)
        _, fresh = model(document, use_cache=True)
        b2, _ = model(q2, cache=fresh, use_cache=True)
    assert torch.equal(a2, b2)
    assert read_once.position == 3 * WINDOW and fresh.position == 3 * WINDOW + 5
    assert not torch.equal(a1[:, -1], a2[:, -1])


@pytest.mark.parametrize("topk", [None, 6])
def test_cache_copies_share_memory_until_they_append_and_stay_independent(topk):
    """Copies of one read document, stepped in turn through evictions into memory, each give what a fresh reading
    followed by its own steps gives, and the original is left as it was."""
    model = tiny_model(mem_layers=[0, 2], mem_topk=topk, mem_block_size=4)
    document = tokens(1, 3 * WINDOW + 5)

    def read_document():  # with room to spare in memory, where copies would append over each other if they could
        _, cache = model(document, use_cache=True)
        for memory in cache.memory.values():
            memory.reserve(memory.length + 4 * WINDOW, like=memory.keys)
        return cache

    original = read_document()
    assert original.memory[0].keys.shape[2] > original.memory[0].length
    before = [t.clone() for t in original.memory[0].view()]
    copies = [original.copy(), original.copy()]
    assert all(c.memory[0].keys is original.memory[0].keys for c in copies)  # nothing copied yet
    steps = [[tokens(1, 1, seed=100 * c + i) for i in range(2 * WINDOW)] for c in range(2)]
    logits = [[], []]
    for i in range(2 * WINDOW):
        for c in range(2):  # interleaved: each copy appends while the other holds the same entries
            out, copies[c] = model(steps[c][i], cache=copies[c], use_cache=True)
            logits[c].append(out)
    for c in range(2):
        fresh, expected = read_document(), []
        for step in steps[c]:
            out, fresh = model(step, cache=fresh, use_cache=True)
            expected.append(out)
        assert_close(torch.cat(logits[c], 1), torch.cat(expected, 1).double(), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(original.memory[0].view(), before))
    assert original.memory[0].length < copies[0].memory[0].length


def test_memory_grows_in_chunks_not_per_token():
    model = tiny_model()
    _, cache = model(tokens(1, 2 * WINDOW), use_cache=True)
    memory = cache.memory[1]
    capacities = [memory.keys.shape[2]]
    with torch.no_grad():
        for i in range(8 * WINDOW):
            _, cache = model(tokens(1, 1, seed=i), cache=cache, use_cache=True)
            if memory.keys.shape[2] != capacities[-1]:
                capacities.append(memory.keys.shape[2])
    # geometric growth: a handful of reallocations for 8 windows of tokens, none per token
    assert len(capacities) <= 6
    assert all(new >= 1.45 * old for old, new in zip(capacities, capacities[1:]))  # by half, rounded down
    assert memory.keys.shape[2] >= memory.length


# ---------------------------------------------------------------------------------------------------- top-k memory

TOPK = dict(exact=dict(mem_retrieval="exact", mem_topk=5), blocks=dict(mem_retrieval="blocks", mem_topk=6,
                                                                       mem_block_size=4))


@pytest.mark.parametrize("retrieval", ["exact", "blocks"])
@pytest.mark.parametrize("case", ["left-padded", "grouped", "continued", "long windows"])
def test_topk_memory_matches_reference_choosing_the_same_entries(retrieval, case):
    """mem_topk far below the memory's size, against the reference's own choice of entries (tests/reference.py):
    16-bit memory (held in mem_dtype), left padding, grouped-query heads with mem_attention_grouping, two memory
    layers, continuation calls of several tokens, decode steps through evictions of the local window, and windows
    longer than topk.PROBES, where only some of the queries choose blocks. Two memory
    layers use float16 memory: bfloat16 keys of float32 and float64 inputs, rounded to neighbouring values now and
    then, grow apart through a second memory layer by more than any tolerance that would still catch a mistake."""
    settings = TOPK[retrieval] | dict(mem_dtype="bfloat16" if case == "grouped" else "float16")
    mask = None
    if case == "left-padded":
        model, ids = tiny_model(mem_layers=[0, 2], **settings), tokens(2, 4 * WINDOW + 3)
        mask = torch.ones_like(ids)
        mask[1, :WINDOW + 6] = 0  # one block of memory is all padding, the next half padding
    elif case == "grouped":
        model = tiny_model(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, mem_layers=[1],
                           mem_attention_grouping=(2, 3), **settings)
        ids = tokens(2, 4 * WINDOW + 3)
    elif case == "long windows":
        model = tiny_model(max_position_embeddings=80, last_context_length=40, **settings)
        ids = tokens(2, 4 * 80 + 3)
    else:  # and the entries in host RAM (on a CPU the same RAM, but through the copies a GPU would make)
        model, ids = tiny_model(mem_layers=[1, 2], mem_on_host=True, **settings), tokens(2, 3 * WINDOW)
    calls = [(ids, True, mask)]
    if case == "continued":
        calls += [(tokens(2, n, seed=200 + n), True, None) for n in (3, 7, WINDOW, 2)]
    calls += [(tokens(2, 1, seed=300 + i), True, None) for i in range(WINDOW + 3)]
    cache = run_both(model, calls, atol=3e-3)  # bfloat16 memory: see test_bfloat16_memory_matches_reference_...
    memory = cache.memory[model.config.mem_layers[0]]
    assert memory.keys.dtype == getattr(torch, settings["mem_dtype"])  # read sparsely: held in mem_dtype
    assert cache.memory_size > 8 * model.config.mem_topk


@pytest.mark.parametrize("memory", ["all", "exact", "blocks"])
def test_log_n_scaling_matches_reference_and_changes_logits_only_beyond_the_trained_keys(memory):
    """mem_attention_logn: memory-layer queries that attend to n > N keys (local and memory; with top-k, K of
    memory) have their logits times log(n) / log(N), the reference's own count of keys (tests/reference.py): through
    windows read into memory, left padding, decode steps and evictions. Off (None), or with N above every n, the
    logits are those of attention without it."""
    settings = dict(mem_layers=[0, 2]) | (TOPK[memory] | dict(mem_dtype="float16") if memory != "all" else {})
    ids, mask = tokens(2, 3 * WINDOW + 3), torch.ones(2, 3 * WINDOW + 3)
    mask[1, :WINDOW + 2] = 0
    calls = [(ids, True, mask)] + [(tokens(2, 1, seed=400 + i), True, None) for i in range(WINDOW + 3)]
    scaled = tiny_model(mem_attention_logn=8, **settings)
    run_both(scaled, calls, atol=3e-3 if memory != "all" else 2e-4)
    with torch.no_grad():
        plain, never = tiny_model(**settings), tiny_model(mem_attention_logn=10**6, **settings)
        logits = [model(ids, use_cache=True, attention_mask=mask)[0] for model in (scaled, plain, never)]
    assert torch.equal(logits[1], logits[2])  # a factor of 1 changes nothing
    assert (logits[0] - logits[1]).abs().max() > 0.1


@pytest.mark.parametrize("retrieval", ["exact", "blocks"])
def test_topk_covering_all_of_memory_is_full_attention(retrieval):
    full = tiny_model(mem_layers=[0, 2])
    covering = tiny_model(mem_layers=[0, 2], **(TOPK[retrieval] | dict(mem_topk=10 * WINDOW)))
    calls = [(tokens(2, 5 * WINDOW + 3), True, None)] + [(tokens(2, 1, seed=i), True, None) for i in range(WINDOW)]
    run_both(covering, calls)
    with torch.no_grad():
        cache_full = cache_covering = None
        for ids, *_ in calls:
            a, cache_full = full(ids, cache=cache_full, use_cache=True)
            b, cache_covering = covering(ids, cache=cache_covering, use_cache=True)
            assert_close(b, a.double(), atol=1e-5)


def test_choosing_every_block_or_every_key_gives_attention_to_all_of_memory():
    """The two retrieval paths themselves, asked for everything: all of memory in order, each key once."""
    g = torch.Generator().manual_seed(3)
    b, kv_heads, m, d, size = 2, 2, 23, 8, 4
    memory = topk.TopkMemory(torch.float32, topk=m, block_size=size)
    keys, values = torch.randn(2, b, kv_heads, m, d, generator=g)
    valid = torch.rand(b, m, generator=g) > 0.2
    for first in range(0, m, 5):  # appended in pieces that do not line up with the blocks
        memory.append(keys[:, :, first:first + 5], values[:, :, first:first + 5], valid[:, first:first + 5])
    q = torch.randn(b, kv_heads, 1, 7, d, generator=g)
    chosen_keys, chosen_values, chosen_valid = memory.select_blocks(q, count=-(-m // size))
    assert torch.equal(chosen_keys[:, :, :m], keys) and torch.equal(chosen_values[:, :, :m], values)
    assert torch.equal(chosen_valid[:, :, :m], valid[:, None].expand(-1, kv_heads, -1))
    assert not chosen_valid[:, :, m:].any()
    visible = valid[:, None, None, None]  # [B, 1, 1, 1, M]
    scores = q @ keys[:, :, None].transpose(-1, -2)  # [B, G, 1, 7, M]
    exact = longllama.Keys(keys, values, topk.topk_visible(scores, visible, m), by_formula=True)
    out, lse = longllama.attention_and_lse(q, exact, stacked=True)
    expected, expected_lse = longllama.attention_and_lse(q, longllama.Keys(keys, values, visible), stacked=True)
    assert_close(out, expected.double(), atol=1e-5)
    assert_close(lse, expected_lse.double(), atol=1e-5)


def test_a_held_memory_is_bounded_in_pieces_as_one_appended_whole_would_be():
    """adopt() takes a memory file's entries as they are and bounds them 65536 at a time: the same bounds as
    appending them, across the pieces' edges (blocks of 48 do not divide 65536)."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 2, 70000, 2, generator=g).bfloat16()
    valid = torch.rand(1, 70000, generator=g) > 0.1
    held = topk.TopkMemory(torch.bfloat16, topk=48, block_size=48)
    held.adopt(keys, keys, valid, like=keys.float())
    assert held.keys is keys and not held.owned
    lowest = torch.finfo(torch.float32).min
    signed = torch.cat([keys, -keys], -1).float().masked_fill(~valid[:, None, :, None], lowest)  # [1, 2, M, 4]
    blocks = -(-70000 // 48)
    expected = F.pad(signed, (0, 0, 0, blocks * 48 - 70000), value=lowest).view(1, 2, blocks, 48, 4).amax(dim=3)
    assert torch.equal(held.block_bounds[:, :, :blocks], expected)


def test_block_bounds_are_the_extremes_of_valid_keys_through_growth():
    g = torch.Generator().manual_seed(4)
    memory = topk.TopkMemory(torch.bfloat16, topk=3, block_size=3)
    keys = torch.randn(1, 2, 40, 4, generator=g)
    valid = torch.rand(1, 40, generator=g) > 0.3
    for first in range(0, 40, 7):  # growing by doubling several times
        memory.append(keys[:, :, first:first + 7], keys[:, :, first:first + 7], valid[:, first:first + 7])
    stored = keys.bfloat16().float()
    for block in range(14):
        inside = slice(3 * block, 3 * block + 3)
        kept = stored[0, :, inside][:, valid[0, inside]]  # [2, n, 4]
        if kept.shape[1]:
            assert torch.equal(memory.block_bounds[0, :, block], torch.cat([kept.amax(dim=1), -kept.amin(dim=1)], -1))
        else:
            assert (memory.block_bounds[0, :, block] == torch.finfo(torch.float32).min).all()


# ---------------------------------------------------------------------------------------------------- quantized weights


def dequantized_as_specified(weight, scheme: str):
    """The weight that QuantizedLinear's scheme should multiply by, from the float weight, written out here. Scales
    and zero points are rounded to bfloat16 first, the values against them: int8: s = max |w| / 127 per output
    channel, q = round(w / s); int4: per group of 64 input channels, s = (max - min) / 15, z = min + 8 s,
    q = round((w - z) / s + 8) in [0, 15], w ~ (q - 8) s + z. int4 layers whose output count is not a multiple of 16
    are int8."""
    w = weight.detach().double()
    if scheme == "int8" or w.shape[0] % 16:
        scale = (w.abs().amax(dim=1) / 127).bfloat16().double()
        return (w / scale[:, None]).round().clamp(-127, 127) * scale[:, None]
    groups = w.view(w.shape[0], -1, 64)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).bfloat16().double()
    zero = (low + 8 * scale).bfloat16().double()
    q = ((groups - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(w.shape)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_match_the_reference_with_the_weights_dequantized_by_their_specification(scheme, tmp_path):
    """load(quantize=...) against the float64 reference whose weights are dequantized here, independently. The
    kernels take activations in bfloat16, rounded in every linear layer of 4 layers: the tolerance is that
    (several percent here), far below a layer given another's weight; each layer's own precision is checked tightly
    by test_a_quantized_layer_multiplies_by_its_specified_weight_within_bfloat16_rounding."""
    model = tiny_model(hidden_size=64, intermediate_size=128, mem_layers=[0, 2])
    longllama.save(model, tmp_path)
    quantized = longllama.load(tmp_path, quantize=scheme)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    kinds = {name: getattr(parent, attribute).scheme
             for name, (parent, attribute) in quantize.linear_layers(quantized).items()}
    assert kinds["lm_head"] == "int8" and kinds["layers.0.mlp.down"] == scheme  # 61 outputs: int8 in int4 too
    with torch.no_grad():
        for name, (parent, attribute) in quantize.linear_layers(model).items():
            layer = getattr(parent, attribute)
            layer.weight.copy_(dequantized_as_specified(layer.weight, kinds[name]))
    reference = NaiveLongLlama(model)
    ids = tokens(2, 3 * WINDOW + 5)
    logits, cache = quantized(ids, use_cache=True)
    expected = reference(ids, use_cache=True)
    scale = expected.abs().max().item()
    assert_close(logits, expected, atol=0.12 * scale)
    for seed in range(WINDOW):  # decoding through an eviction
        step = tokens(2, 1, seed=seed)
        logits, cache = quantized(step, cache=cache, use_cache=True)
        assert_close(logits, reference(step, use_cache=True), atol=0.12 * scale)


@pytest.mark.skipif(not can_compile(), reason="torch.compile on CPU needs a C++ compiler")
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_the_compiled_decode_step_runs_quantized_weights_as_eager_decoding_does(kernel):
    if kernel == "plain":
        pytest.skip("the compiled step belongs to the fused path")
    torch._dynamo.reset()
    eager = quantize.quantize(tiny_model(hidden_size=64, intermediate_size=128), "int4")
    compiled = quantize.quantize(tiny_model(hidden_size=64, intermediate_size=128), "int4").compile_decode()
    with torch.no_grad():
        _, cache_eager = eager(tokens(1, 2 * WINDOW), use_cache=True)
        _, cache_compiled = compiled(tokens(1, 2 * WINDOW), use_cache=True)
        for seed in range(WINDOW + 2):  # through an eviction
            step = tokens(1, 1, seed=seed)
            a, cache_eager = eager(step, cache=cache_eager, use_cache=True)
            b, cache_compiled = compiled(step, cache=cache_compiled, use_cache=True)
            assert_close(b, a.double(), atol=1e-2 * a.abs().max().item())


needs_packing = pytest.mark.skipif(not quantize.can_pack(tiny_model().to(torch.bfloat16)),
                                   reason="oneDNN multiplies bfloat16 only on CPUs with bfloat16 instructions")


@needs_packing
@pytest.mark.parametrize("shape", [(96, 64), (61, 48)])
def test_a_packed_layer_multiplies_as_f_linear_does_bit_for_bit(shape):
    g = torch.Generator().manual_seed(shape[0])
    weight = torch.randn(*shape, generator=g).bfloat16()
    layer = quantize.PackedLinear(weight)
    for x in (torch.randn(1, shape[1], generator=g), torch.randn(2, 7, shape[1], generator=g)):
        assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), weight))
    assert torch.equal(layer.state_dict()["weight"], weight)


def decode_the_same(model, other):
    """Both models read a prompt and decode through an eviction with the same logits, bit for bit."""
    caches = [m(tokens(1, WINDOW + 3), use_cache=True)[1] for m in (model, other)]
    for seed in range(WINDOW):
        step = tokens(1, 1, seed=seed)
        a, caches[0] = model(step, cache=caches[0], use_cache=True)
        b, caches[1] = other(step, cache=caches[1], use_cache=True)
        assert torch.equal(a, b)


@needs_packing
def test_a_packed_model_reads_decodes_saves_and_hashes_as_the_dense_one(tmp_path, kernel):
    """pack_for_cpu holds the weights once, in oneDNN's layout: same logits through prefill and decode steps (an
    eviction included), the same state dict, saved checkpoint and memory fingerprint; and compiled, the packed
    weights are multiplied as they are."""
    dense = tiny_model(hidden_size=64, intermediate_size=128, tie_word_embeddings=True).to(torch.bfloat16)
    packed = quantize.pack_for_cpu(copy.deepcopy(dense))
    kinds = {name: type(getattr(parent, attribute)) for name, (parent, attribute) in
             quantize.linear_layers(packed).items()}
    assert kinds.pop("lm_head") is torch.nn.Linear and set(kinds.values()) == {quantize.PackedLinear}
    assert packed.lm_head.weight is packed.embed.weight  # tied: the embedding's rows, held once
    decode_the_same(dense, packed)
    expected = dense.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in packed.state_dict().items())
    assert dict(quantize.named_weights(packed)).keys() == expected.keys()
    no_files = types.SimpleNamespace(files={})  # the weights' part of the fingerprint is what differs, if anything
    assert (generate.memory_fingerprint(packed, no_files, generate.INSTRUCT)
            == generate.memory_fingerprint(dense, no_files, generate.INSTRUCT))
    decode_the_same(dense, copy.deepcopy(packed))
    longllama.save(packed, tmp_path / "packed")
    assert torch.equal(longllama.load(tmp_path / "packed", dtype=torch.bfloat16)(tokens(1, 5))[0],
                       dense(tokens(1, 5))[0])
    if kernel == "plain" or not can_compile():  # the compiled step belongs to the fused path
        return
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dense.compile_decode(), packed.compile_decode()
    decode_the_same(dense, packed)
    assert not torch._dynamo.utils.counters["graph_break"]  # the packed operator compiles as it is


def test_a_quantized_model_is_not_saved(tmp_path):
    model = quantize.quantize(tiny_model(), "int8")
    with pytest.raises(ValueError, match="a model with int8 weights is not saved"):
        longllama.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="quantize must be one of int8, int4, got 'int2'"):
        quantize.quantize(tiny_model(), "int2")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(96, 128), (61, 64), (48, 192)])
@pytest.mark.parametrize("rows", [5, 20])  # 10 rows: the kernels; 40: int8 rebuilds its weight for one GEMM
def test_a_quantized_layer_multiplies_by_its_specified_weight_within_bfloat16_rounding(scheme, shape, rows):
    """One layer, tightly: its output is x (in bfloat16) times the specified weight, rounded to bfloat16 once."""
    g = torch.Generator().manual_seed(shape[0])
    weight, x = torch.randn(*shape, generator=g), torch.randn(2, rows, shape[1], generator=g)
    layer = quantize.QuantizedLinear.quantized(weight, scheme)
    assert layer.scheme == ("int8" if shape[0] % 16 else scheme)
    expected = x.bfloat16().double() @ dequantized_as_specified(weight, layer.scheme).T
    assert_close(layer(x), expected, atol=2**-7 * expected.abs().max().item())  # one bfloat16 step
    assert 2 * 5 < quantize.DEQUANTIZE_ROWS <= 2 * 20  # so the two row counts take both paths


def test_an_int8_weight_mapped_at_an_odd_address_is_realigned_for_the_kernel():
    """A checkpoint's tensors sit at any offset of the file they are mapped from; the int8 kernel crashes the process
    on weights that are not 16-byte aligned."""
    weight = quantize.quantize_weight(torch.randn(32, 64), "int8")
    odd = torch.empty(32 * 64 + 1, dtype=torch.int8)[1:].view(32, 64).copy_(weight.q)
    layer = quantize.QuantizedLinear(weight._replace(q=odd))
    assert layer.weight.data_ptr() % 64 == 0
    x = torch.randn(1, 64)
    assert torch.equal(layer(x), quantize.QuantizedLinear(weight)(x))


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_calls_raise_clear_errors():
    model = tiny_model()
    with torch.no_grad():
        _, cache = model(tokens(2, 5), use_cache=True)
        with pytest.raises(ValueError, match="batch size"):
            model(tokens(1, 2), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="use_cache"):
            model(tokens(2, 2), cache=cache)
        with pytest.raises(ValueError, match="last_context_length"):
            model(tokens(2, 2), last_context_length=WINDOW + 1)
        with pytest.raises(ValueError, match="attention_mask"):
            model(tokens(2, 2), attention_mask=torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------------- config, checkpoints

LONGLLAMA_3B_CONFIG = {  # the config.json of the published LongLLaMA-3B checkpoint, as Hugging Face writes it
    "architectures": ["LongLlamaForCausalLM"], "auto_map": {"AutoConfig": "configuration_longllama.LongLlamaConfig"},
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 3200, "initializer_range": 0.02,
    "intermediate_size": 8640, "last_context_length": 1024, "max_position_embeddings": 2048,
    "mem_attention_grouping": None, "mem_dtype": "bfloat16", "mem_layers": [6, 12, 18], "mem_positionals": True,
    "model_type": "longllama", "num_attention_heads": 32, "num_hidden_layers": 26, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.30.0",
    "use_cache": True, "vocab_size": 32000,
}


def test_a_longllama_config_json_loads_as_is(recwarn):
    config = longllama.LongLlamaConfig.from_dict(LONGLLAMA_3B_CONFIG)
    assert config.mem_layers == [6, 12, 18] and config.head_dim == 100 and config.num_key_value_heads == 32
    assert not recwarn.list  # every key is known or Hugging Face bookkeeping


@pytest.mark.parametrize("pad_token_id", [None, -1, 0])
def test_llama_configs_without_a_padding_token_load(pad_token_id):
    config = longllama.LongLlamaConfig.from_dict(dict(hidden_size=32, num_attention_heads=4, pad_token_id=pad_token_id))
    assert config.pad_token_id == pad_token_id


def test_unknown_config_keys_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="frobnicate"):
        config = longllama.LongLlamaConfig.from_dict({**LONGLLAMA_3B_CONFIG, "frobnicate": 3})
    assert config.hidden_size == 3200


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2"), "architecture"), (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"), (dict(hidden_size="3200"), "hidden_size"),
    (dict(mem_layers=[26]), "mem_layers"), (dict(num_attention_heads=33), "divisible"),
    (dict(last_context_length=4096), "last_context_length"), (dict(mem_dtype="float8"), "mem_dtype"),
    (dict(mem_attention_grouping=[0, 5]), "grouping"), (dict(head_dim=128), "head_dim"),
])
def test_bad_config_values_raise_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        longllama.LongLlamaConfig.from_dict({**LONGLLAMA_3B_CONFIG, **change})


def test_last_context_length_defaults_to_half_the_window_up_to_1024_or_the_whole_window_without_memory():
    values = {k: v for k, v in LONGLLAMA_3B_CONFIG.items() if k != "last_context_length"}
    assert longllama.LongLlamaConfig.from_dict(values).last_context_length == 1024
    assert longllama.LongLlamaConfig.from_dict({**values, "mem_layers": []}).last_context_length == 2048
    assert longllama.LongLlamaConfig.from_dict({**values, "max_position_embeddings": 512}).last_context_length == 256
    assert longllama.LongLlamaConfig.from_dict({**values, "max_position_embeddings": 8192}).last_context_length == 1024


def test_by_default_the_tokens_generated_after_a_long_prompt_join_its_last_context_in_the_local_window():
    """The whole local window is evicted when it overflows: a last context as long as the window would send the
    question to memory with the first generated token."""
    model = tiny_model(last_context_length=None)
    window = model.config.max_position_embeddings
    _, cache = model(tokens(1, 3 * window), use_cache=True)
    for step in range(1, window // 2 + 1):  # half a window of answer stays beside the prompt's last context
        _, cache = model(tokens(1, 1), cache=cache, use_cache=True)
        assert cache.local_length == model.config.last_context_length + step


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_gives_the_same_model(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    longllama.save(model, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o044  # readable by others, as the umask allows
    loaded = longllama.load(tmp_path)
    ids = tokens(2, 2 * WINDOW)
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    half = longllama.load(tmp_path, dtype=torch.bfloat16, mem_layers=[0, 2], last_context_length=4)
    assert half.embed.weight.dtype == torch.bfloat16 and half.config.mem_layers == [0, 2]


def test_loading_weights_that_do_not_fit_the_config_fails_clearly(tmp_path):
    longllama.save(tiny_model(), tmp_path)
    with pytest.raises(ValueError, match="has shape"):
        longllama.load(tmp_path, intermediate_size=64)
    with pytest.raises(ValueError, match="missing tensors"):
        longllama.load(tmp_path, num_hidden_layers=4)
    with pytest.raises(ValueError, match="unexpected tensors"):
        longllama.load(tmp_path, num_hidden_layers=2)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        longllama.load(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------- CUDA kernels' inputs


def fake_kernel(q, keys, values, bias, causal, scale):
    """What the CUDA kernels compute; they need head_dim a multiple of 8."""
    assert q.shape[-1] % 8 == 0 and keys.shape[-1] % 8 == 0
    return naive_attention_and_lse(q, keys, values, bias, causal, scale)


def naive_attention_and_lse(q, keys, values, bias, causal, scale):
    logits = q.double() @ keys.double().transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.double()
    if causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = logits.logsumexp(-1)
    return (torch.softmax(logits, -1) @ values.double()).to(q.dtype), lse.float()


@pytest.mark.parametrize("case", ["flash", "flash causal", "efficient bias", "efficient float32"])
def test_cuda_path_pads_head_dim_and_aligns_its_inputs_exactly(case, monkeypatch):
    calls = []

    def flash(q, keys, values, dropout, causal, debug, scale):
        calls.append("flash")
        return fake_kernel(q, keys, values, None, causal, scale)

    def efficient(q, keys, values, bias, compute_lse, dropout, causal, scale):
        calls.append("efficient")
        assert compute_lse and (bias is None or (bias.shape == (*q.shape[:3], keys.shape[2])
                                                 and bias.stride(-2) % 16 == 0))
        out, lse = fake_kernel(q, keys, values, bias, causal, scale)
        return out, F_pad(lse, -q.shape[2] % 32), None, None  # lse comes padded to blocks of 32 queries

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention", flash)
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", efficient)
    dtype = torch.float32 if case == "efficient float32" else torch.bfloat16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 9 if "causal" in case else 5, 100, generator=g)  # head_dim 100, as LongLLaMA-3B
    keys, values = torch.randn(2, 2, 3, 9, 100, generator=g)
    visible = (torch.rand(2, 1, q.shape[2], 9, generator=g) > 0.3) if "bias" in case else None
    bias = None if visible is None else torch.zeros(visible.shape).masked_fill(~visible, float("-inf")).to(dtype)
    out, lse = longllama.cuda_attention_and_lse(q.to(dtype), keys.to(dtype), values.to(dtype), visible,
                                                "causal" in case, 0.1)
    assert calls == ["efficient" if "efficient" in case else "flash"]
    expected_out, expected_lse = naive_attention_and_lse(q.to(dtype), keys.to(dtype), values.to(dtype), bias, "causal" in case, 0.1)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_close(out.float(), expected_out.double(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert_close(lse, expected_lse.double(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def F_pad(x, n):
    return torch.nn.functional.pad(x, (0, n), value=float("inf"))


def allocated_bytes(fn) -> int:
    """Bytes fn allocates on CPU (freed or not), by the profiler's count."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(event.cpu_memory_usage for event in prof.events() if event.cpu_memory_usage > 0)


def test_a_decode_step_allocates_nothing_in_proportion_to_memory(kernel):
    if kernel == "plain":
        pytest.skip("the written-out formula holds [queries x memory] logits by design")
    model = tiny_model(mem_dtype="bfloat16")
    allocated = {}
    for windows in (4, 64):
        _, cache = model(tokens(1, windows * WINDOW), use_cache=True)
        step = tokens(1, 1, seed=5)
        model(step, cache=cache.copy(), use_cache=True)  # warm-up
        allocated[windows] = allocated_bytes(lambda: model(step, cache=cache, use_cache=True))
    # 16x the memory (60 more windows of keys and values: 60 * 16 * 2 * 32 * 4 bytes = 245 KB) costs no more
    assert allocated[64] <= allocated[4] + 4096, allocated
