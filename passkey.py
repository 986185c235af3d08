"""Passkey retrieval: can a model find one number hidden in a long text? FoT's headline test.

    python passkey.py --ckpt out --lengths 1k,4k,16k,64k --depths 0.1,0.5,0.9 --trials 4 --out runs/passkey.json
    python passkey.py --ckpt ckpt/long_llama_3b_v1_1 --lengths 32k,100k,256k --trials 20 --out 3b.json

The prompt is the one LongLLaMA's evaluation uses (after Landmark Attention): a task line, filler sentences, the
passkey line at a chosen depth, more filler, and the question. The model reads the prompt as generate.py does
(everything but the last `last_context_length` tokens into memory, window by window), then decodes greedily as
many tokens as the answer has; an answer is correct when its tokens are exactly the passkey's. Only memory can
carry the passkey once the prompt is longer than the local window, so accuracy against prompt length shows how
far the memory layers reach.

The training documents of `train.py --passkey-docs N` are made of the same sentences (`training_document`),
with the last answer at least one training window after the passkey was last said, so that only cross-batch
attention can teach it.

The results go to stdout (a table), a JSON file (every trial) and, with --plot, a PNG heatmap of accuracy per
prompt length x depth.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

import generate
import longllama
from generate import fail
from tokenizer import Tokenizer

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_PASSKEY = 50000
TRAINING_QUESTIONS = 4  # per training document
TRAINING_GAP_WINDOWS = 3  # longest filler gap before a question, in training windows


def passkey_line(passkey: int) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def filler(blocks: int) -> str:
    return " ".join([FILLER] * blocks)


def prompt_text(fillers_before: int, fillers_after: int, passkey: int) -> str:
    """The prompt as LongLLaMA's evaluation lays it out: task, filler, passkey line, filler, question, one per line."""
    return "\n".join([TASK, filler(fillers_before), passkey_line(passkey), filler(fillers_after), QUESTION])


class PromptBuilder:
    """Prompts of a given length in tokens, with the passkey at a given depth (0: first, 1: last), for a tokenizer.

    A filler block's cost in tokens is measured once; the number of blocks is then chosen so the prompt comes
    within one block of the requested length (the exact count is in every result)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.fixed_tokens = len(tokenizer.encode(prompt_text(0, 0, MAX_PASSKEY)))
        self.filler_tokens = (len(tokenizer.encode(prompt_text(0, 64, MAX_PASSKEY))) - self.fixed_tokens) / 64

    def fillers(self, length: int) -> int:
        return max(round((length - self.fixed_tokens) / self.filler_tokens), 0)

    def build(self, length: int, depth: float, passkey: int) -> "Prompt":
        blocks = self.fillers(length)
        before = round(depth * blocks)
        text = prompt_text(before, blocks - before, passkey)
        ids = self.tokenizer.encode(text)
        full = self.tokenizer.encode(f"{text} {passkey}")
        if full[:len(ids)] != ids:  # tokenizers that merge across the boundary would make the answer ambiguous
            raise ValueError("the tokenizer merges the question's last token with the passkey")
        return Prompt(text, ids, full[len(ids):])


class Prompt(NamedTuple):
    text: str
    ids: list  # as the model reads it, BOS first
    answer: list  # the passkey's tokens as they follow the question


def training_document(rng: random.Random, window: int, filler_tokens: float) -> str:
    """A passkey document for training: the passkey line, then TRAINING_QUESTIONS question-answer lines, each
    after a filler gap of 0 to TRAINING_GAP_WINDOWS windows of tokens, the last at least one window long.

    Short gaps teach the copy itself inside the local window; gaps of a window or more put the passkey's last
    mention in an earlier training row, where only cross-batch attention reaches it: a curriculum of distances in
    every document. filler_tokens is what one filler block costs in the training tokenizer (PromptBuilder).
    """
    passkey = rng.randint(1, MAX_PASSKEY)
    blocks_per_window = window / filler_tokens
    longest = math.floor(TRAINING_GAP_WINDOWS * blocks_per_window)
    lines = [TASK, filler(rng.randint(0, math.floor(blocks_per_window))), passkey_line(passkey)]
    for i in range(TRAINING_QUESTIONS):
        shortest = math.ceil(blocks_per_window) if i == TRAINING_QUESTIONS - 1 else 0
        lines += [filler(rng.randint(shortest, max(shortest, longest))), f"{QUESTION} {passkey}."]
    return "\n".join(lines)


def answer(model, tokenizer, prompt: str, length: int) -> list[int]:
    """Greedy decoding of `length` tokens after reading the prompt into memory, exactly as generate.py does."""
    documents = generate.read(model, tokenizer, prompt)
    greedy = generate.Sampling(max_new_tokens=length, temperature=0, seed=0)
    return generate.answer(model, tokenizer, documents, sampling=greedy).tokens[0]


def parse_length(text: str) -> int:
    """'4096', '4k' (4096) or '1m' (1048576) tokens."""
    scale = {"k": 2**10, "m": 2**20}.get(text[-1:].lower(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ValueError(f"a prompt length is a number of tokens like 4096, 4k or 1m, got {text!r}") from None
    if value < 1:
        raise ValueError(f"a prompt length must be positive, got {text!r}")
    return value


def run_trials(model, builder: PromptBuilder, lengths, depths, trials: int, seed: int, log=print) -> list[dict]:
    """`trials` prompts per length and depth (depths None: each at a uniform depth), one result dict each.

    Every (length, depth) cell draws from its own seeded stream, so adding a length changes no other cell."""
    results = []
    for length in lengths:
        for depth in depths or [None]:
            rng = random.Random(f"{seed} {length} {depth}")
            for _ in range(trials):
                at = rng.random() if depth is None else depth
                passkey = rng.randint(1, MAX_PASSKEY)
                prompt = builder.build(length, at, passkey)
                start = time.perf_counter()
                got = answer(model, builder.tokenizer, prompt.text, len(prompt.answer))
                results.append(dict(length=length, depth=at, column=depth_column(at, depths),
                                    prompt_tokens=len(prompt.ids), passkey=passkey,
                                    answer=builder.tokenizer.decode(got).strip(), correct=got == prompt.answer,
                                    seconds=round(time.perf_counter() - start, 3)))
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


def summarize(results) -> dict:
    """{"accuracy": {length: over all depths}, "by_depth": {length: {column: accuracy or None}}}, lengths as
    strings (JSON keys), columns from the shallowest depth to the deepest."""
    lengths = sorted({r["length"] for r in results})
    columns = list(dict.fromkeys(r["column"] for r in sorted(results, key=lambda r: r["depth"])))
    return dict(accuracy={str(n): accuracy([r for r in results if r["length"] == n]) for n in lengths},
                by_depth={str(n): {c: accuracy([r for r in results if r["length"] == n and r["column"] == c])
                                   for c in columns} for n in lengths})


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(summary: dict) -> str:
    columns = list(next(iter(summary["by_depth"].values())))
    lines = ["| prompt tokens | " + " | ".join(f"depth {c}" for c in columns) + " | all |",
             "| ---: |" + " ---: |" * (len(columns) + 1)]
    for length, by_depth in summary["by_depth"].items():
        cells = [percent(by_depth[c]) for c in columns] + [percent(summary["accuracy"][length])]
        lines.append(f"| {int(length):,} | " + " | ".join(cells) + " |")
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
    longllama.write_atomically({Path(path): lambda tmp: fig.savefig(tmp, dpi=120, format="png")})
    pyplot().close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = fail
    p.add_argument("--ckpt", required=True, help="checkpoint directory, as generate.py takes it")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--lengths", default="1k,4k,16k,64k", help="prompt lengths in tokens, e.g. 1k,4k,16k,64k")
    p.add_argument("--depths", default=None,
                   help="passkey depths in [0, 1] (0: right after the task line, 1: just before the question); "
                        "default: uniform, reported by quarter")
    p.add_argument("--trials", type=int, default=5, help="prompts per length and depth")
    p.add_argument("--seed", type=int, default=0, help="passkeys and depths")
    p.add_argument("--out", default=None, help="JSON file of every trial and the summary")
    p.add_argument("--plot", default=None, help="PNG heatmap of accuracy per length and depth")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    args = p.parse_args(argv)
    args.lengths = [parse_length(n) for n in args.lengths.split(",")]
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


def run(args):
    for path in filter(None, [args.out, args.plot]):  # refused now, not after hours of trials
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.plot:
        pyplot()
    device = longllama.resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = generate.load_checkpoint(args.ckpt, args.tokenizer, device, dtype)
    generate.check_memory(model, [max(args.lengths)])  # refused now, not when the longest prompt comes
    log = lambda line: print(line, file=sys.stderr)
    results = run_trials(model, PromptBuilder(tokenizer), args.lengths, args.depths, args.trials, args.seed, log)
    summary = summarize(results)
    print(table(summary))
    if args.out:
        report = dict(checkpoint=str(args.ckpt), seed=args.seed, trials=args.trials, **summary, results=results)
        longllama.write_atomically({Path(args.out): lambda tmp: tmp.write_text(json.dumps(report, indent=1))})
    if args.plot:
        plot_heatmap(summary, args.plot, f"passkey retrieval: {Path(args.ckpt).name}")


def main(argv=None):
    generate.as_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
