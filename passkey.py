"""Passkey retrieval: can a model find one number hidden in a long text? FoT's headline test, and its distraction
experiment.

    python passkey.py --ckpt models/fot7 --lengths 1k,4k,16k,64k --depths 0.1,0.5,0.9 --trials 5 --out runs/pk.json
    python passkey.py --ckpt models/fot7 --lengths 4k,64k --trials 20 --haystack some_code.py
    python passkey.py --ckpt models/fot7 --task documents --haystack some_code.py --lengths 0,16k,64k --trials 20
    python passkey.py --ckpt models/fot7 --task decoys --lengths 0,4k,64k,256k --trials 20
    python passkey.py --ckpt ckpt/long_llama_3b_v1_1 --lengths 32k,100k,256k --trials 20 --out 3b.json

The prompt is the one LongLLaMA's evaluation uses (after Landmark Attention): a task line, filler sentences (or a
file's lines, --haystack), the passkey line at a chosen depth, more filler, and the question. The model reads the
prompt as generate.py does (everything but the last `last_context_length` tokens into memory, window by window;
the whole windows that a cell's prompts share, the filler before the passkey, are read once and copied for each),
then decodes greedily as many tokens as the answer has; an answer is correct when its tokens are exactly the
passkey's. Only memory can carry the passkey once the prompt is longer than the local window, so accuracy against
prompt length shows how far the memory layers reach.

Two tasks show FoT's distraction issue: a one-window passkey prompt goes into memory after a growing amount of
other material, and the question follows in the local window.
- --task documents: other documents (the --haystack file's text, from its start): the memory of a long session.
  The answer is in one document among many, as in FoT's training, where other documents are the negatives.
- --task decoys: decoy documents, keys said exactly as the pass key is under similar names ("The door key is N.").
A memory whose keys do not stay distinguishable retrieves some other number; `relevant_attention` measures the
share of the memory layer's attention that stays on the passkey's own document.

The training documents of `train.py --passkey-docs N` are made of the same sentences (documents.py). The
results go to stdout (a table, with Wilson 95% intervals), a JSON file (every trial) and, with --plot, a PNG
heatmap of accuracy per prompt length x depth.
"""

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

import generate
import longllama
from checkpoint import resolve_device, write_atomically
from cli import (add_memory_arguments, add_quantize_argument, as_command, check_can_create, checkpoint_inputs, fail,
                 int_flag, load_checkpoint, memory_overrides, parse_length, refuse_writing_over, same_path)
from documents import MAX_PASSKEY, QUESTION, TASK, Haystack, decoy_lines, passkey_line
from tokenizer import utf8_text

TASKS = ["passkey", "documents", "decoys"]  # --task


def prompt_text(before: str, after: str, passkey: int) -> str:
    """The prompt as LongLLaMA's evaluation lays it out: task, haystack, passkey line, haystack, question, one per
    line."""
    return "\n".join([TASK, before, passkey_line(passkey), after, QUESTION])


class PromptBuilder:
    """Prompts of a given length in tokens, with the passkey at a given depth (0: first, 1: last), for a tokenizer
    and a haystack (default: LongLLaMA's filler).

    The prompt takes as many haystack units as come nearest the requested length, and the passkey goes between
    the units nearest its depth (the exact count of tokens is in every result)."""

    def __init__(self, tokenizer, haystack: Optional[Haystack] = None):
        self.tokenizer = tokenizer
        self.haystack = haystack or Haystack.filler(tokenizer)
        self.fixed_tokens = len(tokenizer.encode(prompt_text("", "", MAX_PASSKEY)))

    def shortest_length(self) -> tuple[int, int]:
        """(the fewest tokens at which every prompt holds some haystack, the unit that needs them): the fixed lines
        and the unit a trial starts at, which take() includes once half of it fits, for the costliest unit."""
        unit = max(range(len(self.haystack.units)), key=self.haystack.cost)
        return self.fixed_tokens + -(-self.haystack.cost(unit) // 2), unit

    def build(self, length: int, depth: float, passkey: int, start: int = 0) -> "Prompt":
        """The prompt whose haystack starts at unit `start` (a file haystack: a different text for each trial)."""
        units = self.haystack.take(length - self.fixed_tokens, start)
        cumulative = list(itertools.accumulate((self.haystack.cost(u) for u in units), initial=0))
        split = min(range(len(cumulative)), key=lambda i: abs(cumulative[i] - depth * cumulative[-1]))
        text = prompt_text(self.haystack.text(units[:split]), self.haystack.text(units[split:]), passkey)
        ids = self.tokenizer.encode(text)
        full = self.tokenizer.encode(f"{text} {passkey}")
        if full[:len(ids)] != ids:  # tokenizers that merge across the boundary would make the answer ambiguous
            raise ValueError("the tokenizer merges the question's last token with the passkey")
        return Prompt(text, ids, full[len(ids):])


class Prompt(NamedTuple):
    text: str
    ids: list  # as the model reads it, BOS first
    answer: list  # the passkey's tokens as they follow the question


class SharedStart(NamedTuple):
    """The whole memory windows a prompt shares with others, read once (tokens: 0 and no cache when none)."""
    tokens: int
    cache: Optional[longllama.Cache]


def shared_starts(model, prompts: list) -> Iterator[tuple[int, SharedStart]]:
    """(index, SharedStart) for each of `prompts` (token ids), from the least shared to the most: the whole memory
    windows each shares with another prompt, read once. In the filler a cell's prompts are the same text up to
    their passkey lines, so one reading that grows along the prompt sharing the most serves them all: a cell of
    prompts at uniform depths then costs about half as much as reading each alone. A cache is valid until the next
    one is yielded, and is continued by a copy (`answer`).

    Alone, a prompt is read in windows of W tokens from its start, and a window sees only the memory before it. So
    a prompt that continues a copy of this cache is cut at the same places and reads the same memory: its answer is
    the same, bit for bit."""
    window, last_context_length = model.config.max_position_embeddings, model.config.last_context_length
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # a prompt shares the most with a neighbour
    common = [0] * len(prompts)
    for i, j in zip(order, order[1:]):
        shared = len(os.path.commonprefix([prompts[i], prompts[j]]))
        common[i], common[j] = max(common[i], shared), max(common[j], shared)
    source = prompts[max(range(len(prompts)), key=lambda i: common[i])] if prompts else []
    tokens = []
    for prompt, shared in zip(prompts, common):  # whole windows, shared, and not in the prompt's last context
        shared = min(shared, len(os.path.commonprefix([prompt, source])), len(prompt) - last_context_length)
        tokens.append(max(shared // window * window, 0))
    cache, read = None, 0
    for i in sorted(range(len(prompts)), key=lambda i: tokens[i]):
        if tokens[i] > read:  # the reading grows along `source`, whole windows into memory
            ids = torch.tensor([source[read:tokens[i]]], device=model.embed.weight.device)
            _, cache = generate.prefill(model, ids, cache, last_context_length=0)
            read = tokens[i]
        yield i, SharedStart(tokens[i], cache if tokens[i] else None)


def answer(model, tokenizer, prompt: Prompt, length: int, start: SharedStart = SharedStart(0, None)) -> list[int]:
    """Greedy decoding of `length` tokens after reading the prompt into memory, exactly as generate.py does; the
    reading continues a copy of `start`'s cache where the prompt shares its first windows with others."""
    if start.cache is None:
        documents = generate.read(model, tokenizer, prompt.text)
    else:
        generate.check_memory(model, [len(prompt.ids)])
        ids = torch.tensor([prompt.ids], device=model.embed.weight.device)  # [1, L]
        logits, cache = generate.prefill(model, ids[:, start.tokens:], start.cache.copy(),
                                         last_context_length=model.config.last_context_length)
        documents = generate.Documents(cache, logits, ids, torch.ones_like(ids, dtype=torch.bool),
                                       generate.PromptFormat())
    greedy = generate.Sampling(max_new_tokens=length, temperature=0, seed=0)
    return generate.answer(model, tokenizer, documents, sampling=greedy).tokens[0]


# ----------------------------------------------------------------------------------------------------------------------
# Other documents or decoys in memory: FoT's distraction issue


DECOYS_PER_WINDOW = 6  # decoy lines in each window of a distractor document


def decoy_document(rng: random.Random, window: int, haystack: Haystack) -> str:
    """About one window of haystack with DECOYS_PER_WINDOW decoy lines in it, and no pass key."""
    gap = window // (DECOYS_PER_WINDOW + 1)
    return "\n".join(line for decoy in decoy_lines(rng, DECOYS_PER_WINDOW) for line in (haystack.piece(rng, gap), decoy))


def distraction_trials(model, tokenizer, distractors: list, memory_sizes, trials: int, seed: int,
                       log=print) -> list[dict]:
    """The passkey after other material in memory, FoT's distraction experiment in this project's text.

    For each trial: a passkey prompt of one window (task line, filler, the passkey line at a random depth) is read
    into memory after the first `size` tokens of `distractors` (token ids, BOS first: decoy_stream or
    document_stream), then the question is read into the local window, with the space its answer starts with, and
    the passkey's digits are decoded greedily. The distractors are read once, growing from one size to the next, and
    every trial starts from a copy of their cache, as generate.py's questions do. Besides the answer, each trial
    records `relevant_attention`: the share of the memory layers' attention (mean over heads and memory layers) that
    the query which retrieves the passkey's first digit puts on its own document's entries, among everything it
    sees.
    """
    if len(distractors) < max(memory_sizes):
        raise ValueError(f"{len(distractors)} tokens of distractors, {max(memory_sizes)} asked for")
    window = model.config.max_position_embeddings
    builder = PromptBuilder(tokenizer)
    rng = random.Random(f"{seed} decoys")  # the same passkey prompts for both kinds of distractors
    question = tokenizer.encode("\n" + QUESTION, bos=False)
    cases = []
    for _ in range(trials):
        passkey = rng.randint(1, MAX_PASSKEY)
        prompt = builder.build(window + len(question), rng.random(), passkey)
        document = tokenizer.encode(prompt.text[:-len(QUESTION) - 1], bos=False)  # the prompt without its question
        lead = next(i for i in range(len(prompt.answer)) if tokenizer.decode(prompt.answer[:i + 1]).strip())
        cases.append((document, prompt.answer[:lead], prompt.answer, passkey))
    results, cache, read = [], None, 0
    device = model.embed.weight.device
    for size in sorted(memory_sizes):
        if size > read:  # the distractors grow: read the next ones into the same memory
            _, cache = model(torch.tensor([distractors[read:size]], device=device), cache=cache, last_logits_only=True)
            read = size
        for document, lead, answer, passkey in cases:
            start = time.perf_counter()
            got, share = answer_after(model, cache, document, question + lead, len(answer) - len(lead))
            got = lead + got
            results.append(dict(length=size, depth=0.0, column="all", passkey=passkey,
                                answer=tokenizer.decode(got).strip(), correct=got == answer,
                                relevant_attention=share, seconds=round(time.perf_counter() - start, 3)))
        log(f"{size} tokens of distractors: {sum(r['correct'] for r in results[-trials:])} of {trials} correct, "
            f"{sum(r['relevant_attention'] for r in results[-trials:]) / trials:.1%} of attention on the document")
    return results


def decoy_stream(tokenizer, window: int, tokens: int, seed: int) -> list:
    """`tokens` token ids of decoy documents in the filler, BOS first (none for 0)."""
    rng, haystack = random.Random(f"{seed} distractors"), Haystack.filler(tokenizer)
    ids = [tokenizer.bos_id]
    while len(ids) < tokens:
        ids += tokenizer.encode("\n" + decoy_document(rng, window, haystack), bos=False)
    return ids[:tokens]


def document_stream(haystack: Haystack, tokens: int) -> list:
    """`tokens` token ids of the haystack's text from its first line on, BOS first (none for 0): its non-blank lines,
    one after another, and the text again from its start when it is shorter, as a haystack is taken."""
    ids, asked = [haystack.tokenizer.bos_id], tokens
    while len(ids) < tokens:  # take() comes near its count from either side: ask for more until there is enough
        ids = [haystack.tokenizer.bos_id] + haystack.tokenizer.encode(haystack.text(haystack.take(asked)), bos=False)
        asked += tokens - len(ids) + 1
    return ids[:tokens]


def answer_after(model, distractor_cache, document: list, question: list, length: int) -> tuple[list, float]:
    """Read the document into memory (after a copy of the distractors' cache) and the question into the local
    window; returns the greedy answer of `length` tokens and the attention share on the document of the question's
    last token, the query that finds the answer's first token."""
    cache = distractor_cache.copy() if distractor_cache is not None else None
    first_entry = cache.memory_size if cache is not None else 0
    inputs = {}  # memory layer: the input of its attention while the question is read
    hooks = [model.layers[i].attention.register_forward_pre_hook(
        lambda module, args, i=i: inputs.__setitem__(i, args[0])) for i in model.config.mem_layers]
    try:
        ids = torch.tensor([document + question], device=model.embed.weight.device)
        logits, cache = model(ids, cache=cache, use_cache=True, last_context_length=len(question),
                              last_logits_only=True)
    finally:
        for hook in hooks:
            hook.remove()
    share = sum(relevant_share(model, i, inputs[i][:, -1:], cache, first_entry, len(question))
                for i in model.config.mem_layers) / len(model.config.mem_layers)
    tokens = [int(logits[0, -1].argmax())]
    while len(tokens) < length:
        logits, cache = generate.decode_one_token(model, tokens[-1:], cache)
        tokens.append(int(logits[0].argmax()))
    return tokens, share


@torch.no_grad()
def attention_weights(model, layer: int, x, cache, local_length: int):
    """The softmax weights [1, H, S + M] of memory layer `layer`'s query of x [1, 1, hidden], the last of
    local_length local tokens, over the local window (S = local_length) and then the memory (M entries; with
    mem_topk only the entries the layer chooses get weight): the plain formula of memory-layer attention, with its
    weights kept."""
    attention = model.layers[layer].attention
    q, _, _ = attention.project(x)  # [1, H, 1, D]
    if attention.rotary:
        slot = slice(local_length - 1, local_length)
        q = longllama.apply_rope(q, model.rope_cos[slot], model.rope_sin[slot])
    mem_keys = cache.memory[layer].view()[0].to(q.device)
    local_keys = cache.local[layer].keys[:, :, :local_length]
    keys = torch.cat([local_keys, mem_keys.to(q.dtype)], dim=2).float()  # [1, Hkv, S+M, D]
    keys = keys.repeat_interleave(attention.heads // attention.kv_heads, dim=1)  # [1, H, S+M, D]
    scores = (q.float() @ keys.transpose(-1, -2)).squeeze(2) / math.sqrt(attention.head_dim)  # [1, H, S+M]
    scale = model.mem_query_scale(torch.tensor([local_length - 1]), cache)  # log-n scaling, when it is on
    scores = scores if scale is None else scores * scale[0]
    seen = cache.memory[layer].entries_seen(q)[:, :, 0]  # [1, H, M]
    local_valid = cache.local_valid[:, None, :local_length].expand(-1, seen.shape[1], -1)
    visible = torch.cat([local_valid, seen], dim=-1)  # [1, H, S+M]
    return scores.masked_fill(~visible, -math.inf).softmax(-1)


def relevant_share(model, layer: int, x, cache, first_entry: int, local_length: int) -> float:
    """The share of attention_weights, mean over heads, on the memory entries from first_entry on."""
    weights = attention_weights(model, layer, x, cache, local_length)
    return float(weights[..., local_length + first_entry:].sum(-1).mean())


def run_trials(model, builder: PromptBuilder, lengths, depths, trials: int, seed: int, log=print) -> list[dict]:
    """`trials` prompts per length and depth (depths None: each at a uniform depth), one result dict each.

    Every (length, depth) cell draws from its own seeded stream, so adding a length changes no other cell. A
    result's seconds are its own reading and answering: its shared_tokens were read once for the cell, before it."""
    results = []
    for length in lengths:
        for depth in depths or [None]:
            rng = random.Random(f"{seed} {length} {depth}")
            cell = []
            for _ in range(trials):
                at = rng.random() if depth is None else depth
                passkey = rng.randint(1, MAX_PASSKEY)
                first_unit = rng.randrange(len(builder.haystack.units))  # the filler has one unit: always 0
                cell.append((at, passkey, builder.build(length, at, passkey, first_unit)))
            done = {}
            for i, shared in shared_starts(model, [prompt.ids for _, _, prompt in cell]):
                at, passkey, prompt = cell[i]
                start = time.perf_counter()
                got = answer(model, builder.tokenizer, prompt, len(prompt.answer), shared)
                done[i] = dict(length=length, depth=at, column=depth_column(at, depths),
                               prompt_tokens=len(prompt.ids), shared_tokens=shared.tokens, passkey=passkey,
                               answer=builder.tokenizer.decode(got).strip(), correct=got == prompt.answer,
                               seconds=round(time.perf_counter() - start, 3))
            results += [done[i] for i in range(trials)]
            log(f"{length} tokens, depth {'uniform' if depth is None else depth}: "
                f"{sum(r['correct'] for r in results[-trials:])} of {trials} correct")
    return results


def depth_column(depth: float, depths) -> str:
    """The column a trial counts in: its given depth, or the quarter of the prompt a uniform depth fell in."""
    if depths:
        return f"{depth:.4g}"
    quarter = min(int(depth * 4), 3)
    return f"{quarter * 25}-{quarter * 25 + 25}%"


def accuracy(results) -> Optional[float]:
    """The share of correct answers; None when there are no trials (an empty cell, not a 0%)."""
    return sum(r["correct"] for r in results) / len(results) if results else None


def wilson_interval(correct: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share correct / trials (95% for z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and is honest at 0 or all correct, where small samples usually are."""
    share = correct / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return max(centre - half, 0.0), min(centre + half, 1.0)


def summarize(results) -> dict:
    """{"accuracy": {length: over all depths}, "interval": {length: Wilson 95% [low, high]}, "trials":
    {length: count}, "by_depth": {length: {column: accuracy or None}}}, lengths as strings (JSON keys), columns
    from the shallowest depth to the deepest."""
    by_length = {n: [r for r in results if r["length"] == n] for n in sorted({r["length"] for r in results})}
    columns = list(dict.fromkeys(r["column"] for r in sorted(results, key=lambda r: r["depth"])))
    summary = {}
    if all("relevant_attention" in r for r in results):  # documents or decoys
        summary["relevant_attention"] = {str(n): sum(r["relevant_attention"] for r in cell) / len(cell)
                                         for n, cell in by_length.items()}
    return dict(**summary, accuracy={str(n): accuracy(cell) for n, cell in by_length.items()},
                interval={str(n): list(wilson_interval(sum(r["correct"] for r in cell), len(cell)))
                          for n, cell in by_length.items()},
                trials={str(n): len(cell) for n, cell in by_length.items()},
                by_depth={str(n): {c: accuracy([r for r in cell if r["column"] == c]) for c in columns}
                          for n, cell in by_length.items()})


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def with_interval(value: float, interval) -> str:
    """'95% (84-99%)': a share and its 95% interval."""
    return f"{value:.0%} ({interval[0] * 100:.0f}-{interval[1]:.0%})"


def table(summary: dict) -> str:
    columns = list(next(iter(summary["by_depth"].values())))
    lines = ["| prompt tokens | " + " | ".join(f"depth {c}" for c in columns) + " | all (95% interval) | trials |",
             "| ---: |" + " ---: |" * (len(columns) + 2)]
    for length, by_depth in summary["by_depth"].items():
        cells = [percent(by_depth[c]) for c in columns]
        cells += [with_interval(summary["accuracy"][length], summary["interval"][length]),
                  str(summary["trials"][length])]
        lines.append(f"| {int(length):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distraction_table(summary: dict) -> str:
    lines = ["| distractors in memory (tokens) | accuracy (95% interval) | attention on the document | trials |",
             "| ---: | ---: | ---: | ---: |"]
    for size, share in summary["relevant_attention"].items():
        lines.append(f"| {int(size):,} | {with_interval(summary['accuracy'][size], summary['interval'][size])} | "
                     f"{share:.1%} | {summary['trials'][size]} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed); imported only where a plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(summary: dict, path, title: str):
    """Accuracy per prompt length (rows) and depth (columns) as a PNG; cells without trials stay blank."""
    plt = pyplot()
    lengths = list(summary["by_depth"])
    columns = list(summary["by_depth"][lengths[0]])
    grid = [[summary["by_depth"][n][c] for c in columns] for n in lengths]
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2.5, 0.6 * len(lengths) + 1.8))
    image = ax.imshow([[math.nan if v is None else v for v in row] for row in grid], vmin=0, vmax=1,
                      cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, percent(value), ha="center", va="center")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(lengths)), [f"{int(n):,}" for n in lengths])
    ax.set_xlabel("depth of the passkey in the prompt")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    save_figure(fig, path)


def save_figure(fig, path):
    """A PNG written atomically (never a half-drawn file), then the figure freed."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically({Path(path): lambda tmp: fig.savefig(tmp, dpi=120, format="png")})
    pyplot().close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = fail
    p.add_argument("--ckpt", required=True, help="checkpoint directory or .gguf file, as generate.py takes it")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--task", choices=TASKS, default="passkey",
                   help="passkey: one passkey in a haystack; documents: a one-window passkey prompt read into "
                        "memory after --lengths tokens of other documents (the --haystack file's text); decoys: "
                        "the same after decoy documents (the distraction experiment, both)")
    p.add_argument("--lengths", default="1k,4k,16k,64k",
                   help="prompt lengths in tokens, e.g. 1k,4k,16k,64k (documents, decoys: tokens of them in memory, "
                        "0 allowed)")
    p.add_argument("--depths", default=None,
                   help="passkey depths in [0, 1] (0: right after the task line, 1: just before the question); "
                        "default: uniform, reported by quarter")
    p.add_argument("--haystack", default=None,
                   help="a UTF-8 text file whose lines (taken in turn, from a different line for each trial) hide "
                        "the passkey (default: LongLLaMA's filler sentences); --task documents: the other documents, "
                        "read from the file's first line on")
    p.add_argument("--trials", type=int_flag, default=5, help="prompts per length and depth")
    p.add_argument("--seed", type=int, default=0, help="passkeys and depths")
    p.add_argument("--out", default=None, help="JSON file of every trial and the summary")
    p.add_argument("--plot", default=None, help="PNG heatmap of accuracy per length and depth")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (default: bfloat16 on cuda; float32 on cpu, so that results are the same on "
                        "every CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    add_memory_arguments(p)
    add_quantize_argument(p)
    args = p.parse_args(argv)
    if args.task != "passkey" and args.depths:  # the passkey prompt is one window, at a random depth
        fail(f"--task {args.task} takes no --depths")
    if args.task == "decoys" and args.haystack:  # decoy documents are in the filler
        fail("--task decoys takes no --haystack")
    if args.task == "documents" and not args.haystack:
        fail("--task documents reads its other documents from --haystack FILE")
    minimum = 1 if args.task == "passkey" else 0
    args.lengths = list(dict.fromkeys(parse_length(n, minimum) for n in args.lengths.split(",")))  # each once
    if args.depths is not None:
        try:
            args.depths = [float(d) for d in args.depths.split(",")]
        except ValueError:
            fail(f"--depths takes numbers in [0, 1], got {args.depths!r}")
        if not all(0 <= d <= 1 for d in args.depths):
            fail(f"--depths takes numbers in [0, 1], got {args.depths!r}")
    if args.trials < 1:
        fail(f"--trials must be at least 1, got {args.trials}")
    return args


def read_haystack(path) -> str:
    """The text of a --haystack file, read before the checkpoint is loaded so that a bad file is refused first. A
    byte-order mark is no text: a file of one and blank lines has no line to hide a passkey between."""
    try:
        text = utf8_text(Path(path).read_bytes()).removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--haystack {path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    if not any(line.strip() for line in text.splitlines()):
        raise ValueError(f"--haystack {path}: the file has no text (only blank lines)")
    return text


def check_lengths(builder: PromptBuilder, lengths: list, haystack_path=None, haystack_text: str = ""):
    """Refuse a length at which a prompt cannot hold its task, passkey and question lines and some haystack, wherever
    a trial starts in it: its results would be of another prompt than the length it is reported under."""
    hay = builder.haystack
    if not any(map(hay.cost, range(len(hay.units)))):  # take() would never reach any count
        raise ValueError(f"--haystack {haystack_path}: no line of it is any token of this tokenizer")
    shortest, unit = builder.shortest_length()
    if min(lengths) >= shortest:
        return
    if haystack_path is None:
        what = f"a prompt holds at least one block of filler ({hay.cost(unit)} tokens, taken once half of it fits)"
    else:
        line = [n for n, text in enumerate(haystack_text.splitlines(), 1) if text.strip()][unit]
        what = (f"a prompt holds at least one line of --haystack {haystack_path}, taken once half of it fits, and "
                f"line {line} is {hay.cost(unit)} tokens (ask for longer prompts, or use a haystack of shorter lines)")
    raise ValueError(f"--lengths {min(lengths)}: the shortest passkey prompt here is {shortest} tokens: its task, "
                     f"passkey and question lines take {builder.fixed_tokens}, and {what}")


def run(args):
    outputs = {flag: path for flag, path in [("--out", args.out), ("--plot", args.plot)] if path}
    inputs = checkpoint_inputs(args.ckpt) | {path: what for path, what in [(args.haystack, "the --haystack"),
                                                                           (args.tokenizer, "the --tokenizer")] if path}
    for flag, path in outputs.items():  # refused now, not after hours of trials; their directories are made then
        check_can_create(path, flag)
        refuse_writing_over(path, flag, inputs)
    if len(outputs) == 2 and same_path(args.out, args.plot):
        raise ValueError(f"--out and --plot are the same file {args.out}: the heatmap would overwrite the results")
    if args.plot:
        pyplot()
    haystack_text = read_haystack(args.haystack) if args.haystack else None
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_checkpoint(args.ckpt, args.tokenizer, device, dtype, quantize=args.quantize,
                                       **memory_overrides(args))
    # refused now, not when the longest prompt comes; a distraction trial copies the distractors' memory
    generate.check_memory(model, [max(args.lengths)] * (1 if args.task == "passkey" else 2))
    log = lambda line: print(line, file=sys.stderr)
    haystack = Haystack.from_text(tokenizer, haystack_text, Path(args.haystack).name) if haystack_text else None
    if args.task == "passkey":
        builder = PromptBuilder(tokenizer, haystack)
        check_lengths(builder, args.lengths, args.haystack, haystack_text)
        results = run_trials(model, builder, args.lengths, args.depths, args.trials, args.seed, log)
    else:
        tokens, window = max(args.lengths), model.config.max_position_embeddings
        distractors = (document_stream(haystack, tokens) if args.task == "documents"
                       else decoy_stream(tokenizer, window, tokens, args.seed))
        results = distraction_trials(model, tokenizer, distractors, args.lengths, args.trials, args.seed, log)
    summary = summarize(results)
    print(table(summary) if args.task == "passkey" else distraction_table(summary))
    if args.out:
        config = model.config
        memory = dict(quantize=config.quantization, mem_topk=config.mem_topk,
                      mem_attention_logn=config.mem_attention_logn)
        if config.mem_topk:
            memory |= dict(mem_retrieval=config.mem_retrieval, mem_block_size=config.mem_block_size)
        report = dict(checkpoint=str(args.ckpt), task=args.task, haystack=args.haystack or "filler", seed=args.seed,
                      trials_per_cell=args.trials, **memory, **summary, results=results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically({Path(args.out): lambda tmp: tmp.write_text(json.dumps(report, indent=1))})
    if args.plot:
        plot_heatmap(summary, args.plot, f"passkey retrieval: {Path(args.ckpt).name}")


def main(argv=None):
    as_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
