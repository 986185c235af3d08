"""Continue a (long) prompt with a LongLLaMA checkpoint, streaming the text to stdout.

    python generate.py --ckpt DIR --prompt-file long.txt --max-new-tokens 200
    python generate.py --ckpt DIR --prompt "def fibonacci(n):" --temperature 0      # greedy
    cat notes.txt | python generate.py --ckpt DIR --prompt-file - --mem-attention-grouping 4,512

How FoT shows up here: `prefill` reads the prompt. All but its last `last_context_length` tokens are read window by
window (W = max_position_embeddings tokens each) into the memory of the memory layers, with a progress bar on
stderr; the last tokens stay in every layer's local cache. `decode_one_token` then runs one token at a time: it
attends to the local cache and, in memory layers, to the whole memory. When the local cache is full, it moves into
memory as a whole (longllama.LongLlama._evict). One stats line goes to stderr at the end.
"""

import argparse
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import longllama
from longllama import available_bytes
from tokenizer import checkpoint_tokenizer, utf8_text


# ----------------------------------------------------------------------------------------------------------------------
# Sampling and the generation loop


def sample(logits, temperature: float, top_k: int = 0, top_p: float = 1.0, generator=None) -> int:
    """Pick the next token from logits [V]: greedy at temperature 0, else from the top-k / nucleus (top-p) set."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth_largest = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_probs, order = torch.sort(logits.softmax(-1), descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the more likely tokens already reach top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def prefill(model, prompt_ids, last_context_length: Optional[int] = None, progress: bool = False):
    """Read the prompt [1, L] into memory and local cache; returns the last token's logits [V] and the cache."""
    logits, cache = model(prompt_ids, use_cache=True, last_context_length=last_context_length,
                          last_logits_only=True, progress=progress)
    return logits[0, -1], cache


def decode_one_token(model, token: int, cache):
    device = model.embed.weight.device
    logits, cache = model(torch.tensor([[token]], device=device), cache=cache, use_cache=True)
    return logits[0, -1], cache


@dataclass
class Stats:
    prompt_tokens: int = 0
    memory_size: int = 0  # entries in each memory layer's memory after the prompt
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0

    def line(self, peak_memory: str) -> str:
        prefill_rate = self.prompt_tokens / max(self.prefill_seconds, 1e-9)
        # the first new token comes from the prefill's logits: a rate needs at least one decode step
        decode = f"{self.decode_steps / max(self.decode_seconds, 1e-9):.1f} tok/s" if self.decode_steps else "-"
        return (f"prompt {self.prompt_tokens} tokens | memory {self.memory_size} | prefill {prefill_rate:.1f} tok/s | "
                f"decode {decode} | {peak_memory}")


@torch.inference_mode()
def generate(model, prompt_ids: list, max_new_tokens: int, temperature: float = 0.8, top_k: int = 0,
             top_p: float = 1.0, eos_id: Optional[int] = None, seed: Optional[int] = None,
             last_context_length: Optional[int] = None, on_token: Optional[Callable[[int], None]] = None,
             progress: bool = False):
    """Sample up to max_new_tokens after prompt_ids, stopping after EOS. Returns (new token ids, Stats).

    on_token is called with each new token as soon as it is chosen (for streaming).
    """
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    stats = Stats(prompt_tokens=len(prompt_ids))

    start = _now(device)
    logits, cache = prefill(model, torch.tensor([prompt_ids], device=device), last_context_length, progress)
    stats.prefill_seconds, stats.memory_size = _now(device) - start, cache.memory_size

    new_tokens = []
    start = _now(device)
    while len(new_tokens) < max_new_tokens:
        token = sample(logits, temperature, top_k, top_p, generator)
        new_tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id or len(new_tokens) == max_new_tokens:
            break
        logits, cache = decode_one_token(model, token, cache)
        stats.decode_steps += 1
    stats.decode_seconds = _now(device) - start
    return new_tokens, stats


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------------
# Memory planning: refuse a prompt that cannot fit instead of being killed halfway through reading it


def prompt_memory_bytes(config: longllama.LongLlamaConfig, prompt_tokens: int, dtype: torch.dtype) -> int:
    """Rough peak bytes that reading a prompt adds to the weights: memory, local caches and one window's work.

    Memory (keys and values of every memory layer, kept in the compute dtype) is the only part that grows with
    the prompt: attention runs through fused kernels, so its workspace is bounded by the window.
    """
    last_context = min(prompt_tokens, config.last_context_length)
    kv_width = 2 * config.num_key_value_heads * config.head_dim  # key and value of one token
    memory = len(config.mem_layers) * (prompt_tokens - last_context) * kv_width * dtype.itemsize
    local = config.num_hidden_layers * config.max_position_embeddings * kv_width * dtype.itemsize
    window = min(prompt_tokens, config.max_position_embeddings)
    # a window's activations: residual, q/k/v/out, the MLP's gate|up and its product, float32 norms and merges
    activations = window * (8 * config.hidden_size + 3 * config.intermediate_size) * 4
    return memory + local + activations + 4 * config.vocab_size


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Continue a long prompt with a LongLLaMA checkpoint.")
    p.error = fail  # a bad flag is bad input like any other: one line, status 1
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.model or .json)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt ('-' reads stdin)")
    p.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--last-context-length", type=int, default=None,
                   help="prompt tokens kept in the local window rather than memory (default: the checkpoint's)")
    p.add_argument("--mem-attention-grouping", default=None, metavar="H,Q",
                   help="memory attention over at most H heads x Q queries at a time (bounds peak memory)")
    p.add_argument("--mem-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="precision of memory keys/values: rounded to it, kept in the compute dtype (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    args = p.parse_args(argv)
    # comparisons with NaN are false, so NaN fails every rule; sizes the checkpoint bounds are checked by its config
    longllama.check_values(vars(args), [
        (["max_new_tokens", "top_k"], lambda v: v >= 0, ">= 0"),
        (["temperature"], lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 is greedy)"),
        (["top_p"], lambda v: 0 < v <= 1, "in (0, 1]"),
        (["seed"], lambda v: v is None or 0 <= v < 2**64, "in [0, 2**64)"),
    ], label=lambda key: "--" + key.replace("_", "-"))
    return args


def read_prompt(args) -> str:
    """The prompt text, from --prompt, a file or stdin; refused unless it is UTF-8 text (a NUL byte means binary)."""
    if args.prompt is not None:
        data, source = os.fsencode(args.prompt), "--prompt"  # argv arrives decoded leniently: back to its bytes
    else:
        source = "stdin" if args.prompt_file == "-" else f"prompt file {args.prompt_file}"
        try:
            data = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e}") from None
    try:
        text = utf8_text(data)
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {source}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def config_overrides(args) -> dict:
    overrides = {}
    if args.mem_attention_grouping:
        try:
            overrides["mem_attention_grouping"] = [int(n) for n in args.mem_attention_grouping.split(",")]
        except ValueError:
            raise ValueError(f"--mem-attention-grouping takes H,Q, got {args.mem_attention_grouping!r}") from None
    if args.mem_dtype:
        overrides["mem_dtype"] = args.mem_dtype
    if args.last_context_length is not None:
        overrides["last_context_length"] = args.last_context_length
    return overrides


def load_checkpoint(ckpt, tokenizer_override, device, dtype, **overrides):
    """(model, tokenizer) of a checkpoint directory, refused with one line when missing or mismatched."""
    if not Path(ckpt).is_dir():
        raise ValueError(f"checkpoint directory {ckpt} does not exist")
    tokenizer = checkpoint_tokenizer(ckpt, tokenizer_override)
    model = longllama.load(ckpt, device=device, dtype=dtype, **overrides)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    return model, tokenizer


def check_prompt_fits(config, prompt_tokens: int, dtype, device):
    """Refuse a prompt whose memory would not fit, before reading it rather than halfway through."""
    needed, available = prompt_memory_bytes(config, prompt_tokens, dtype), available_bytes(device)
    if needed > 0.9 * available:
        raise ValueError(f"a prompt of {prompt_tokens} tokens needs about {needed / 2**30:.1f} GiB more, "
                         f"{available / 2**30:.1f} GiB are free: try --dtype bfloat16 (memory is kept in the compute "
                         "dtype) or a shorter prompt")


def run(args):
    device = longllama.resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    text = read_prompt(args)
    model, tokenizer = load_checkpoint(args.ckpt, args.tokenizer, device, dtype, **config_overrides(args))
    prompt_ids = tokenizer.encode(text)
    check_prompt_fits(model.config, len(prompt_ids), dtype, device)

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.echo:  # the prompt as the model reads it: with the continuation, exactly the decoded token sequence
        write(tokenizer.decode(prompt_ids))
    decoder = tokenizer.decoder(prompt_ids)
    new_tokens, stats = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                 tokenizer.eos_id, args.seed, on_token=lambda t: write(decoder.push(t)), progress=True)
    if args.echo or new_tokens:  # no new tokens and no echo: nothing was printed, so no line to end
        write(decoder.flush() + "\n")
    print(stats.line(peak_memory(device)), file=sys.stderr)


def main(argv=None):
    as_command(lambda: run(parse_args(argv)))


def as_command(job):
    """Run a command's job: bad input, lack of memory and Ctrl-C end with one line on stderr, never a traceback."""
    with warnings.catch_warnings():  # warnings as one plain line each, like errors
        warnings.showwarning = lambda warning, *_: print(f"warning: {warning}", file=sys.stderr)
        try:
            job()
        except KeyboardInterrupt:
            sys.exit(130)
        except torch.OutOfMemoryError:
            fail("out of memory while generating: try --dtype bfloat16 or a shorter prompt")
        except (ValueError, OSError) as e:
            fail(str(e))


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
