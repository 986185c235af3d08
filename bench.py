"""Long-context speed of LongLLaMA inference: prefill (reading a prompt into memory) and decode, on random weights.

    python bench.py --small                          # CPU, about a minute: fused vs plain attention, compiled decode
    python bench.py --preset 3b --prefill 32768,131072 --decode-memory 16384,131072       # one GPU, bfloat16
    python bench.py --preset tiny --prefill 32768 --kernel fused,plain --repeats 1
    python bench.py --ckpt ckpt/3b-8-q4_0 --prefill 512 --decode-memory 0 --compile --llama-cpp 3b-8.q4_0.gguf

Nothing is downloaded: a named shape (longllama.PRESETS, or the small CPU shape below) gets random weights. Each
figure is the median of --repeats timed runs after one warm-up, synchronised on GPU. Prefill is what generate.py
does with a prompt (memory layers read all but the last `last_context_length` tokens into memory, window by
window; only the last token's logits are computed); decode is one greedy token at a time with a given number of
entries in memory. Each figure is also given as a fraction of this device's bound, measured here: prefill's dense
and attention FLOPs over the matmul rate, decode's bytes read per token (weights, local caches, memory) over the
copy bandwidth; decode's bytes per second are printed too (GB/s: how near its kernels come to that bandwidth).
`--compile` also times decode through torch.compile (LongLlama.compile_decode), after its compilation, which is
not timed. `--small` also reads 32k and then 64k tokens with the `tiny` shape, each in a fresh process, to show that
peak memory grows with the memory's keys and values only, not with an attention workspace. `--quantize int8|int4`
(or a quantized `--ckpt`) times quantized weights, `--layers N` a shape cut to N layers (3B's width on a CPU), and
`--llama-cpp FILE.gguf` adds llama.cpp's rows for that file where the llama_cpp package is installed (its decode
after as many tokens as ours holds with nothing in memory: half a window). The table goes to stdout, then one JSON
line with every figure.
"""

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import convert_weights
import generate
import longllama
import passkey
from checkpoint import resolve_device
from checks import check_can_compile, check_values
from cli import (INT_LIMIT, add_memory_arguments, add_quantize_argument, as_command, default_dtype, fail, int_flag,
                 load_checkpoint, memory_overrides, warn)
from quantize import named_weights, pack_for_cpu, quantize
from topk import PROBES, TopkMemory

# The CPU shape of --small: 8 layers, hidden 256, 8 heads, window 256, memory layers 2 and 5, vocab 32000.
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
             max_position_embeddings=256, mem_layers=[2, 5], last_context_length=128)


def build_model(shape: dict, device, dtype) -> longllama.LongLlama:
    torch.manual_seed(0)
    with torch.device(device):
        model = longllama.LongLlama(longllama.LongLlamaConfig(**shape))
    return model.to(dtype).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warm_up=None) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run (of warm_up() where given)."""
    (warm_up or fn)()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# ----------------------------------------------------------------------------------------------------------------------
# The device's bounds


def matmul_flops_per_second(device, dtype) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def copy_bytes_per_second(device) -> float:
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / timed(lambda: dst.copy_(src), device, 5)  # read + write


# ----------------------------------------------------------------------------------------------------------------------
# Work counts


def prefill_flops(config: longllama.LongLlamaConfig, tokens: int) -> float:
    """Matmul FLOPs of reading `tokens` as measure_prefill does, for the last logits only: a window read into memory
    runs only up to the last memory layer's keys and values (LongLlama._layers), the last context runs every layer.
    Each layer run costs its dense matmuls, causal attention inside the window and, in memory layers, attention to
    the memory entries it chooses (memory_attention_flops)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    dense = 2 * (h * (2 * h + 2 * kv) + 3 * h * config.intermediate_size)  # per token and layer
    window, to_memory = config.max_position_embeddings, max(tokens - config.last_context_length, 0)
    spans = [(s, min(s + window, to_memory)) for s in range(0, to_memory, window)] + [(to_memory, tokens)]
    last_memory_layer = max(config.mem_layers, default=-1)
    flops = 2 * h * config.vocab_size
    for start, end in spans:
        n, last = end - start, end == tokens
        layers = config.num_hidden_layers if last else max(last_memory_layer, 0)
        memory_layers = [i for i in config.mem_layers if last or i < last_memory_layer]
        flops += n * layers * (dense + 4 * (n / 2) * h)  # q.k and p.v, causal: half the window on average
        flops += len(memory_layers) * memory_attention_flops(config, n, memory=start)
        if not last and config.mem_layers:
            flops += 2 * n * h * 2 * kv  # the last memory layer's keys and values
    return flops


def memory_attention_flops(config: longllama.LongLlamaConfig, queries: int, memory: int) -> float:
    """One memory layer's attention from `queries` queries to a memory of `memory` entries: all of them, or with
    top-k blocks the chosen blocks and the blocks' bounds, scored by at most topk.PROBES queries (a dot product
    of 2 x head_dim per head). Exact top-k scores every entry."""
    h = config.hidden_size
    if config.mem_topk is None or config.mem_retrieval == "exact":
        return 4 * queries * memory * h
    scoring = 4 * min(queries, PROBES) * -(-memory // config.mem_block_size) * h
    return 4 * queries * chosen_entries(config, memory) * h + scoring


def chosen_entries(config: longllama.LongLlamaConfig, memory: int) -> int:
    """Memory entries a query attends to with top-k blocks: whole blocks, at least mem_topk of them."""
    return min(memory, -(-config.mem_topk // config.mem_block_size) * config.mem_block_size)


def decode_bytes(model: longllama.LongLlama, cache: longllama.Cache) -> float:
    """Bytes one decode step reads: every weight (of the embedding, one row), the local caches and the memories (all
    of each, or with top-k blocks the bounds of every block and the chosen blocks)."""
    config = model.config
    # every weight, quantized ones as stored, but of the embedding (unless lm_head is it) one row
    weights = sum(t.nbytes for name, t in named_weights(model, values=False) if name != "embed.weight")
    local = sum(c.keys[:, :, :cache.local_length].nbytes * 2 for c in cache.local)
    memory = 0
    for m in cache.memory.values():
        entry = m.keys[:, :, :1].nbytes * 2  # one entry's key and value, every head
        if isinstance(m, TopkMemory) and m.block_size:
            blocks = -(-m.length // m.block_size)
            memory += m.block_bounds[:, :, :blocks].nbytes + chosen_entries(config, m.length) * entry
        else:
            memory += m.length * entry
    return weights + local + memory


# ----------------------------------------------------------------------------------------------------------------------
# Measurements


def measure_prefill(model, tokens: int, device, repeats: int, tokenizer=None) -> tuple:
    """Seconds to read a prompt of `tokens` tokens, and with a tokenizer (a trained checkpoint) whether the greedy
    answer to a passkey prompt of that length, the passkey halfway in, is the passkey (else None). Warmed up on a
    few windows, so that a long prompt is not read once more untimed."""
    if tokenizer is None:
        ids, expected = torch.randint(0, model.config.vocab_size, (1, tokens), device=device), None
    else:
        secret = random.Random(tokens).randint(1, passkey.MAX_PASSKEY)
        prompt = passkey.PromptBuilder(tokenizer).build(tokens, 0.5, secret)
        ids, expected = torch.tensor([prompt.ids], device=device), prompt.answer
    read = {}

    def read_prompt():
        read.clear()  # the previous reading's memory goes before the next one is read
        read["logits"], read["cache"] = model(ids, use_cache=True, last_logits_only=True)

    warm_up = ids[:, :4 * model.config.max_position_embeddings]
    seconds = timed(read_prompt, device, repeats, lambda: model(warm_up, use_cache=True, last_logits_only=True))
    if expected is None:
        return seconds, None
    logits, cache, answer = read["logits"], read["cache"], []
    while len(answer) < len(expected):  # greedy, as passkey.py answers
        answer.append(int(logits[0, -1].argmax()))
        logits, cache = model(torch.tensor([answer[-1:]], device=device), cache=cache, use_cache=True)
    return seconds, answer == expected


def measure_decode(model, memory_entries: int, device, repeats: int, steps: int = 16):
    """Seconds per token with `memory_entries` in each memory layer (and a half-full local window)."""
    config = model.config
    window = config.max_position_embeddings
    prompt = memory_entries + window // 2
    ids = torch.randint(0, config.vocab_size, (1, prompt), device=device)
    _, cache = model(ids, use_cache=True, last_logits_only=True, last_context_length=window // 2)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def decode():
        state = cache.copy()  # every repeat decodes from the same memory
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = model(token, cache=state, use_cache=True, last_logits_only=True)
            token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        synchronize(device)
        return (time.perf_counter() - start) / steps

    decode()
    return statistics.median(decode() for _ in range(repeats)), decode_bytes(model, cache)


def llama_cpp_rows(path, prefill: list, context: int, read_bytes: int, repeats: int, bandwidth: float,
                   steps: int = 16) -> list:
    """llama.cpp's prefill and decode figures for a GGUF file, through the llama_cpp package where it happens to be
    installed (it never is required): the same prompt lengths of random tokens, each read in one batch, and decode
    after `context` tokens (half a window, as our decode with nothing in memory; llama.cpp has no FoT memory), with
    as many threads as torch uses. read_bytes: what its decode step reads (llama_cpp_decode_bytes)."""
    try:
        import llama_cpp
    except ImportError:
        print("note: no llama.cpp rows: the llama_cpp package is not installed (pip install llama-cpp-python)")
        return []
    longest = max(prefill + [context])
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=longest + steps * (repeats + 1) + 1, n_batch=longest,
                          n_ubatch=longest, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = random.Random(0)
    ids = [rng.randrange(3, llm.n_vocab()) for _ in range(longest)]
    cpu, rows = torch.device("cpu"), []

    def read(tokens):
        llm.reset()
        llm.eval(ids[:tokens])

    for tokens in prefill:
        seconds = timed(lambda: read(tokens), cpu, repeats)
        rows.append(dict(kernel="llama.cpp", work="prefill", tokens=tokens, seconds=seconds,
                         tokens_per_s=tokens / seconds, of_bound=None, gbps=None, peak_gib=None))

    def decode():  # each run goes on from the last: a few more tokens in its cache, as ours has them
        start = time.perf_counter()
        for token in ids[:steps]:
            llm.eval([token])
        return (time.perf_counter() - start) / steps

    read(context)
    decode()
    seconds = statistics.median(decode() for _ in range(repeats))
    rows.append(dict(kernel="llama.cpp", work="decode", memory=0, context=context, seconds=seconds,
                     tokens_per_s=1 / seconds, of_bound=read_bytes / seconds / bandwidth,
                     gbps=read_bytes / seconds / 1e9, peak_gib=None))  # no peak of its own: it runs in this process
    return rows


def llama_cpp_decode_bytes(reader, path, context: int) -> int:
    """Bytes llama.cpp reads per decode step of the GGUF file `reader` read: every tensor (but the token embedding,
    of which it reads one row, unless it is the output layer too) and its float16 key/value cache of `context`
    tokens."""
    tensors = {tensor.name: int(tensor.n_bytes) for tensor in reader.tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    value = lambda key: convert_weights.gguf_value(reader, f"llama.{key}", path)
    kv_width = value("attention.head_count_kv") * value("embedding_length") // value("attention.head_count")
    return sum(tensors.values()) + value("block_count") * 2 * kv_width * context * 2


def peak_of_reading(tokens: int) -> dict:
    """Read `tokens` tokens with the tiny shape in a fresh process: its peak RSS while reading (the high-water
    mark is reset once the model is built, so neither importing torch nor this parent process hides it) and the
    bytes memory holds."""
    code = f"""
import json, torch, bench
model = bench.build_model(bench.longllama.PRESETS["tiny"], torch.device("cpu"), torch.float32)
model(torch.zeros(1, 600, dtype=torch.long), use_cache=True, last_logits_only=True)  # warm-up: kernels, allocator
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM, the peak resident set
_, cache = model(torch.randint(0, 4096, (1, {tokens})), use_cache=True, last_logits_only=True)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps(dict(peak=int(status["VmHWM"].split()[0]) * 1024,
                      memory=sum(m.keys[:, :, :m.length].nbytes * 2 for m in cache.memory.values()))))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.error = fail  # a bad flag: one line, status 1, as the other commands
    p.add_argument("--small", action="store_true",
                   help="the CPU comparison: small shape, fused vs plain, compiled decode, peak memory")
    p.add_argument("--preset", default=None, choices=list(longllama.PRESETS),
                   help="model shape (random weights; default: 3b)")
    p.add_argument("--ckpt", default=None,
                   help="time this trained checkpoint instead (its shape; --mem-layers kept): each prefill prompt is "
                        "then a passkey prompt, and its row says whether the greedy answer is the passkey")
    p.add_argument("--mem-layers", default=None, metavar="I,J",
                   help="memory layers instead of the shape's, e.g. 1,2 ('' for none)")
    p.add_argument("--layers", type=int_flag, default=None,
                   help="the shape with only this many layers (its memory layers below it kept), e.g. LongLLaMA-3B's "
                        "width in 8 layers")
    p.add_argument("--prefill", default=None,
                   help="prompt lengths to time, comma-separated ('' for none; default: 32768)")
    p.add_argument("--decode-memory", default=None,
                   help="memory sizes to time decode at ('' for none; default: 16384)")
    p.add_argument("--kernel", default=None,
                   help="attention kernels to compare: fused, plain or fused,plain (default: fused)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: as generate.py's (bfloat16 on a GPU or a CPU with bfloat16 instructions)")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--compile", action="store_true", help="also time decode through torch.compile (fused kernels)")
    p.add_argument("--repeats", type=int_flag, default=None, help="timed runs of each figure (default: 3)")
    p.add_argument("--llama-cpp", default=None, metavar="GGUF",
                   help="also time llama.cpp on this GGUF file (the same shape, e.g. convert_weights.py --to gguf of "
                        "--ckpt), where the llama_cpp package is installed: --prefill lengths and decode")
    add_memory_arguments(p)
    add_quantize_argument(p)
    args = p.parse_args(argv)
    resolve_shape_and_work(args)
    try:
        args.prefill = [int(n) for n in args.prefill.split(",") if n]
        args.decode_memory = [int(n) for n in args.decode_memory.split(",") if n]
        if args.mem_layers is not None:
            args.mem_layers = [int(n) for n in args.mem_layers.split(",") if n]
    except ValueError:
        p.error("--prefill, --decode-memory and --mem-layers take comma-separated integers")
    args.kernel = args.kernel.split(",")
    check_values(vars(args), [
        (["kernel"], lambda v: v and set(v) <= set(longllama.ATTENTION_KERNELS),
         f"one or more of {', '.join(longllama.ATTENTION_KERNELS)}"),
        (["repeats"], lambda v: v >= 1, "at least 1"),
        (["layers"], lambda v: v is None or v >= 1, "at least 1"),
        (["prefill"], lambda v: all(0 < n < INT_LIMIT for n in v), "positive token counts (below 2**63)"),
        (["decode_memory"], lambda v: all(0 <= n < INT_LIMIT for n in v), "token counts >= 0 (below 2**63)"),
    ], label=lambda key: "--" + key.replace("_", "-"))
    return args


SMALL_WORK = dict(prefill="4096", decode_memory="4096", kernel="fused,plain", device="cpu")  # --small's, 5+ repeats


def resolve_shape_and_work(args):
    """The shape and work flags after --small and --ckpt, which each bring a shape of their own.

    A shape flag beside either (--preset; --ckpt with --small; --layers with --ckpt, which would have to cut a
    trained model) is refused: two shapes are asked for and one would be silently dropped. The work flags that
    --small sets (--prefill, --decode-memory, --kernel, --device, at least 5 --repeats) are ignored with a warning
    instead: the figures asked for with --small are its comparison, which stays comparable with the README's."""
    if args.small or args.ckpt:
        given = [("--preset", args.preset), ("--ckpt", args.ckpt if args.small else None),
                 ("--layers", None if args.small else args.layers)]
        for flag, value in given:
            if value is not None:
                fail(f"{'--small' if args.small else '--ckpt'} times a shape of its own: no {flag} with it")
    if args.small:  # in float32 unless told otherwise: the README's figures for it are
        ignored = [f"--{key.replace('_', '-')} {getattr(args, key)}" for key, value in SMALL_WORK.items()
                   if getattr(args, key) not in (None, value)]
        if args.repeats is not None and 1 <= args.repeats < 5:
            ignored.append(f"--repeats {args.repeats}")
        if ignored:
            warn(f"--small times its own work (--prefill 4096 --decode-memory 4096 --kernel fused,plain --device cpu, "
                 f"at least 5 repeats): ignoring {', '.join(ignored)}")
        vars(args).update(SMALL_WORK)
        args.dtype = args.dtype or "float32"
        args.compile = True
        args.repeats = 5 if args.repeats is None or 1 <= args.repeats < 5 else args.repeats
    defaults = dict(preset="3b", prefill="32768", decode_memory="16384", kernel="fused", repeats=3)
    vars(args).update({key: value for key, value in defaults.items() if getattr(args, key) is None})


def main(argv=None):
    as_command(lambda: run(parse_args(argv)))


def run(args):
    if args.llama_cpp and not Path(args.llama_cpp).is_file():
        raise ValueError(f"--llama-cpp {args.llama_cpp}: no such file")
    gguf = convert_weights.read_gguf(Path(args.llama_cpp)) if args.llama_cpp else None  # refused now, not later
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    if args.compile:
        try:
            check_can_compile(device)
        except ValueError as e:
            if not args.small:
                raise
            print(f"note: no compiled row: {e}")  # --small's other figures need no compiler
            args.compile = False
    overrides = memory_overrides(args) | ({} if args.mem_layers is None else dict(mem_layers=args.mem_layers))
    tokenizer = None
    if args.ckpt:
        model, tokenizer = load_checkpoint(args.ckpt, None, device, dtype, quantize=args.quantize, **overrides)
    else:
        shape = (SMALL if args.small else longllama.PRESETS[args.preset]) | overrides
        if args.layers is not None:
            shape |= dict(num_hidden_layers=args.layers, mem_layers=[i for i in shape["mem_layers"] if i < args.layers])
        model = build_model(shape, device, dtype)
        if args.quantize:
            quantize(model, args.quantize)
        pack_for_cpu(model)  # as load_checkpoint holds a checkpoint's bfloat16 weights on a CPU
    window = model.config.max_position_embeddings  # decode reads its memory and half a window first
    lengths = args.prefill + [entries + window // 2 for entries in args.decode_memory]
    if lengths:  # refused in a line now, rather than failing inside torch (or killed) once timing has started
        generate.check_memory(model, [max(lengths)])
    if tokenizer is not None and args.prefill:  # a checkpoint's prefill reads passkey prompts
        shortest, _ = passkey.PromptBuilder(tokenizer).shortest_length()
        if min(args.prefill) < shortest:
            raise ValueError(f"--prefill {min(args.prefill)}: a checkpoint reads passkey prompts, the shortest of "
                             f"{shortest} tokens (its task, passkey and question lines and some filler)")
    flops, bandwidth = matmul_flops_per_second(device, dtype), copy_bytes_per_second(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {dtype}: matmul {flops / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s; "
          f"{shape_name(args, model)}, {model.config.num_parameters / 1e6:.0f}M parameters in "
          f"{weight_bytes(model) / 2**30:.2f} GiB, memory layers "
          f"{model.config.mem_layers}, memory in {model.config.mem_dtype}, {memory_reading(model.config)}")
    print(f"{'kernel':<9} {'work':<27} {'time':>10} {'rate':>14} {'of bound':>9} {'read':>10} {'peak':>10}")
    rows = []
    for kernel in args.kernel:
        model.attention_kernel = kernel
        for tokens in args.prefill:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds, found = measure_prefill(model, tokens, device, args.repeats, tokenizer)
            rows.append(dict(kernel=kernel, work="prefill", tokens=tokens, seconds=seconds,
                             tokens_per_s=tokens / seconds, of_bound=prefill_flops(model.config, tokens) / seconds / flops,
                             gbps=None,
                             peak_gib=peak_gib(device), passkey=found))
        for entries in args.decode_memory:
            rows.append(decode_row(model, kernel, entries, device, args.repeats, bandwidth))
    if args.compile and args.decode_memory:
        model.attention_kernel = "fused"
        model.compile_decode()
        rows += [decode_row(model, "compiled", entries, device, args.repeats, bandwidth) for entries in args.decode_memory]
    if args.llama_cpp:
        read_bytes = llama_cpp_decode_bytes(gguf, args.llama_cpp, window // 2)
        rows += llama_cpp_rows(args.llama_cpp, args.prefill, window // 2, read_bytes, args.repeats, bandwidth)
    for row in rows:
        work = (f"prefill {row['tokens']} tokens" if row["work"] == "prefill" else
                f"decode after {row['context']} tokens" if "context" in row else f"decode, {row['memory']} in memory")
        time_text = f"{row['seconds']:.3f} s" if row["work"] == "prefill" else f"{row['seconds'] * 1e3:.2f} ms/tok"
        found = {True: "  passkey found", False: "  passkey missed"}.get(row.get("passkey"), "")
        of_bound = "" if row["of_bound"] is None else f"{row['of_bound']:.1%}"
        read = "" if row["gbps"] is None else f"{row['gbps']:.1f} GB/s"
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
        print(f"{row['kernel']:<9} {work:<27} {time_text:>10} {row['tokens_per_s']:>10.1f} tok/s {of_bound:>8} "
              f"{read:>10} {peak:>11}{found}")
    summary = dict(device=name, dtype=str(dtype), shape=shape_name(args, model), memory=memory_reading(model.config),
                   weight_bytes=weight_bytes(model),
                   matmul_tflops=flops / 1e12, copy_gbps=bandwidth / 1e9, rows=rows)
    if "plain" in args.kernel and len({row["kernel"] for row in rows}) > 1:
        summary["speedup"] = speedups(rows)
        print("speed against plain: " + ", ".join(f"{work} {ratio:.2f}x" for work, ratio in summary["speedup"].items()))
    if args.small:
        first, second = peak_of_reading(32768), peak_of_reading(65536)
        growth, allowed = second["peak"] - first["peak"], 1.3 * (second["memory"] - first["memory"]) + 50e6
        summary["peak_32k_64k"] = dict(first=first, second=second, growth=growth, allowed=allowed)
        print(f"tiny shape, fresh processes: reading 32k tokens peaks at {first['peak'] / 1e6:.0f} MB RSS, 64k at "
              f"{second['peak'] / 1e6:.0f} MB: +{growth / 1e6:.0f} MB for +{(second['memory'] - first['memory']) / 1e6:.0f} "
              f"MB of memory keys/values (bound: 1.3x that + 50 MB = {allowed / 1e6:.0f} MB)")
    print(json.dumps(summary))


def weight_bytes(model) -> int:
    """Bytes the weights take, quantized ones as stored (a tied lm_head once)."""
    tied = getattr(model.lm_head, "weight", None) is model.embed.weight
    return sum(t.nbytes for name, t in named_weights(model, values=False)
               if not (tied and name == "lm_head.weight"))


def shape_name(args, model) -> str:
    name = f"checkpoint {args.ckpt}" if args.ckpt else f"{'small' if args.small else args.preset} shape"
    layers = f", {args.layers} layers" if args.layers and not args.ckpt else ""
    quantization = model.config.quantization
    return f"{name}{layers}{f', {quantization} weights' if quantization else ''}"


def memory_reading(config: longllama.LongLlamaConfig) -> str:
    if config.mem_topk is None:
        return "all of memory attended"
    blocks = f", blocks of {config.mem_block_size}" if config.mem_retrieval == "blocks" else ""
    return f"top {config.mem_topk} ({config.mem_retrieval}{blocks})"


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # RSS high-water mark of the whole run


def decode_row(model, kernel: str, entries: int, device, repeats: int, bandwidth: float) -> dict:
    seconds, read = measure_decode(model, entries, device, repeats)
    return dict(kernel=kernel, work="decode", memory=entries, seconds=seconds, tokens_per_s=1 / seconds,
                of_bound=read / seconds / bandwidth, gbps=read / seconds / 1e9, peak_gib=peak_gib(device))


def speedups(rows) -> dict:
    """Speed against the plain kernel of every other way each piece of work was measured: "decode 4096, compiled"."""
    by_work = {}
    for row in rows:
        key = f"prefill {row['tokens']}" if row["work"] == "prefill" else f"decode {row['memory']}"
        by_work.setdefault(key, {})[row["kernel"]] = row["seconds"]
    return {f"{work}, {kernel}": s["plain"] / seconds for work, s in by_work.items() if "plain" in s
            for kernel, seconds in s.items() if kernel != "plain"}


if __name__ == "__main__":
    main()
