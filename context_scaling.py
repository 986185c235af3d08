"""FoT's two claims, end to end: memory reaches far beyond the training context, and cross-batch training keeps
retrieval working as unrelated material fills the memory (the distraction issue).

    python context_scaling.py --size cpu --out runs/scaling          # 2 CPU cores, about an hour (see README)
    python context_scaling.py --size gpu --out runs/scaling          # one GPU: a larger model, longer training

The recipe follows LongLLaMA's own path. One base model is trained first, without memory (d = 0), on the embedded
Python standard library corpus plus synthetic passkey documents in which every answer sits within half a window
of its passkey: it learns to copy by content inside its local window. Then each setup continues from that same
base with FoT's continued pretraining, on passkey documents whose answers sit one to three training rows after
the passkey (`train.py --passkey-layout`), differing only in cross-batch attention:
- `fot7`, `fot3`: d = 7 and d = 3 with packing 4: a row's memory layer sees the d rows before it: its own
  document's earlier rows (the positives) and rows of other documents (the negatives);
- `d1`: d = 1: only the row just before;
- `d0`: d = 0: no cross-batch attention, so memory layers never see memory while training.

Then, for each model:
- passkey retrieval at prompt lengths far beyond the 256-token training rows (passkey.py), in LongLLaMA's filler
  and in held-out standard-library code;
- the distraction experiment: a one-window passkey prompt read into memory after 0 .. 256k tokens of other
  documents (held-out standard-library code, then training code in four random orders: passkey.py --task
  documents) or of decoys (other keys said as the pass key is, under similar names, --task decoys): accuracy, and
  the memory layer's attention on the passkey's document;
- held-out perplexity of standard-library code with 0 .. 16 earlier windows in memory (train.py's eval).
Training and trials run as their own processes, each command printed first, so any step can be rerun alone; a
finished step is skipped and an unfinished training run resumed. On CPU two processes run side by side with one
thread each, which gets more out of two cores than one process with two. Results go to OUT/results.json, plots
to OUT/*.png.
"""

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import longllama
import passkey
import train as training
from checkpoint import load, resolve_device, write_atomically
from checks import MEM_RETRIEVALS
from cli import as_command, fail, parse_length, removed_on_failure
from documents import eval_spans, read_document, split_held_out, stdlib_documents
from tokenizer import open_tokenizer, tokenizer_file

SETUPS = {"fot7": 7, "fot3": 3, "d1": 1, "d0": 0}  # name: cross-batch range d of the FoT stage
LABELS = {"fot7": "FoT (d = 7)", "fot3": "FoT (d = 3)", "d1": "d = 1", "d0": "d = 0 (no cross-batch)"}
FOT = [name for name, d in SETUPS.items() if d > 1]

ROWS = ["--seq-len", "256", "--batch-size", "16", "--packing", "4"]  # the tiny presets' window, 4,096 tokens a step
GPU_ROWS = ["--seq-len", "1024", "--batch-size", "16", "--packing", "4"]
SIZES = {
    "cpu": dict(
        # the preset's memory layer is layer 4, the last that the base's copying circuit needs (docs/exploration.md)
        base=["--preset", "tiny6", "--vocab-size", "1024", *ROWS, "--passkey-docs", "6000",
              "--passkey-layout", "near", "--lr", "2e-3", "--min-lr", "1e-4", "--warmup-steps", "100",
              "--lr-decay-steps", "3000", "--max-steps", "1500"],
        fot=[*ROWS, "--passkey-docs", "6000", "--passkey-layout", "far,decoy,near", "--lr", "1e-3", "--min-lr",
             "1e-4", "--warmup-steps", "50", "--max-steps", "1000"],
        lengths="1k,4k,16k,64k,256k", code_lengths="1k,4k,16k,64k", depths="0.1,0.37,0.63,0.9", trials=5,
        documents="0,4k,8k,16k,32k,64k,256k", decoys="0,4k,16k,64k,256k", distraction_trials=20,
        document_orders=4, eval_spans=8, side_by_side=2),
    "gpu": dict(
        base=["--preset", "small", *GPU_ROWS, "--passkey-docs", "20000", "--passkey-layout", "near", "--lr", "1e-3",
              "--min-lr", "1e-4", "--max-steps", "4000"],
        fot=[*GPU_ROWS, "--passkey-docs", "20000", "--passkey-layout", "far,decoy,near", "--lr", "5e-4", "--min-lr",
             "5e-5", "--max-steps", "3000"],
        lengths="1k,4k,16k,64k,256k", code_lengths="1k,4k,16k,64k,256k", depths="0,0.25,0.5,0.75,1", trials=10,
        documents="0,16k,64k,256k,1m", decoys="0,16k,64k,256k,1m", distraction_trials=50,
        document_orders=4, eval_spans=32, side_by_side=1),
}
EVAL_MEMORY = [0, 1, 2, 4, 8, 16]
DISTRACTIONS = ["documents", "decoys"]  # passkey.py --task: what fills the memory before the passkey


def run(commands: list, side_by_side: int = 1):
    """Run commands, up to `side_by_side` at a time (one thread each when more than one), each printed as it
    starts. Stops at the first failure, once the others running have finished."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if side_by_side > 1 else None
    waiting, running, failed = list(commands), [], False
    while (waiting and not failed) or running:
        while waiting and not failed and len(running) < side_by_side:
            command = waiting.pop(0)
            print("$ " + shlex.join(command), flush=True)
            running.append(subprocess.Popen(command, env=env))
        finished = next((p for p in running if p.poll() is not None), None)
        if finished is None:
            time.sleep(1)
            continue
        running.remove(finished)
        failed = failed or finished.returncode != 0
    if failed:
        raise ValueError("a step above failed: rerun the experiment to go on from the last finished step")


def flag(flags: list, name: str) -> str:
    """The value a command line's flags give `name` (e.g. "--max-steps")."""
    return flags[flags.index(name) + 1]


def trained(run_dir: Path, flags: list) -> bool:
    state = run_dir / "train_state.json"
    steps = int(flag(flags, "--max-steps"))
    return state.is_file() and json.loads(state.read_text()).get("step", 0) >= steps


def train_command(run_dir: Path, flags: list, start: list) -> list:
    """train.py for one run; an unfinished run is resumed."""
    resume = ["--resume"] if (run_dir / "train_state.json").is_file() else []
    return [sys.executable, "train.py", *flags, "--eval-every", "0", "--out", str(run_dir), *(resume or start)]


def train_all(out: Path, size: dict):
    """The shared base, then every setup's FoT stage from it. A finished run is skipped."""
    base = out / "base"
    if not trained(base, size["base"]):
        run([train_command(base, [*size["base"], "--cross-batch-range", "0"], [])])
    fot_runs = [train_command(out / name, [*size["fot"], "--cross-batch-range", str(d)], ["--init", str(base)])
                for name, d in SETUPS.items() if not trained(out / name, size["fot"])]
    run(fot_runs, size["side_by_side"])


def held_out_code(out: Path) -> Path:
    """The held-out standard-library documents as one file: a haystack no model was trained on."""
    return code_file(out / "haystack_held_out.py", lambda: stdlib_split()[1])


def training_code(out: Path, order: int, tokens: int) -> Path:
    """Standard-library training documents in a random order (seed `order`) as one file of `tokens` tokens or more:
    other documents of the kind the models trained on, never the same text twice."""
    def shuffled():
        documents = stdlib_split()[0]
        random.Random(order).shuffle(documents)
        return documents
    characters = 4 * tokens  # a token of code is about 2.5 characters: 4 leave a margin
    path = code_file(out / f"documents_order{order}_{size_label(tokens)}.py", shuffled, characters)
    if len(path.read_text()) < characters:
        raise ValueError(f"the standard library has less than {tokens} tokens of training documents")
    return path


def stdlib_split() -> tuple[list, list]:
    """(training, held-out) standard-library documents, as train.py's default --holdout splits them."""
    return split_held_out(stdlib_documents(), training.Settings().holdout)


def code_file(path: Path, documents: Callable[[], list], characters: float = math.inf) -> Path:
    """The text of documents() as one file, the documents in turn until `characters` are there. Written once: an
    existing file is the answer, and the standard library is not walked again."""
    if not path.is_file():
        texts, length = [], 0
        for doc in documents():
            if length >= characters:
                break
            texts.append(read_document(doc)[1])
            length += len(texts[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically({path: lambda tmp: tmp.write_text("\n".join(texts))})
    return path


def distraction_flags(task: str, out: Path, size: dict, haystack: Optional[Path] = None) -> list:
    """passkey.py's flags for the distraction experiment with other documents (held-out code unless `haystack` is
    given) or with decoys in memory."""
    haystack = ["--haystack", str(haystack or held_out_code(out))] if task == "documents" else []
    return ["--task", task, *haystack, "--lengths", size[task], "--trials", str(size["distraction_trials"])]


def trial_commands(out: Path, size: dict) -> list:
    """passkey.py runs whose results file is missing: passkey in the filler, passkey in held-out code, other
    documents (held-out code, then training code in each order) and decoys in memory."""
    most = max(parse_length(n, 0) for n in size["documents"].split(","))
    orders = [training_code(out, order, most) for order in range(size["document_orders"])]
    commands = []
    for name in SETUPS:
        ckpt = ["--ckpt", str(out / name)]
        passkey_flags = ["--depths", size["depths"], "--trials", str(size["trials"])]
        runs = {f"passkey_{name}.json": [*ckpt, "--lengths", size["lengths"], *passkey_flags],
                f"passkey_code_{name}.json": [*ckpt, "--lengths", size["code_lengths"], *passkey_flags,
                                              "--haystack", str(held_out_code(out))],
                **{f"{task}_{name}.json": [*ckpt, *distraction_flags(task, out, size)] for task in DISTRACTIONS}}
        runs |= {f"documents_{name}_order{order}.json": [*ckpt, *distraction_flags("documents", out, size, code)]
                 for order, code in enumerate(orders)}
        commands += [[sys.executable, "passkey.py", *flags, "--out", str(out / file)]
                     for file, flags in runs.items() if not (out / file).is_file()]
    return commands


def memory_perplexity(run_dir: Path, spans: int, **overrides) -> dict:
    """Held-out perplexity of standard-library code with 0 .. 16 earlier windows in memory: train.py's eval, on
    the documents its --holdout keeps out of training (the default where the run's state is not at hand, as for
    models/), {windows in memory: perplexity}. overrides: load()'s, e.g. mem_topk."""
    print(f"# perplexity vs memory: {run_dir} {overrides or ''}", flush=True)
    device = resolve_device()
    model = load(run_dir, device=device, **overrides)
    tokenizer = open_tokenizer(tokenizer_file(run_dir))
    state = run_dir / "train_state.json"
    settings = json.loads(state.read_text()).get("settings", {}) if state.is_file() else {}
    holdout = settings.get("holdout", training.Settings().holdout)
    _, held_out = split_held_out(stdlib_documents(), holdout)
    window = model.config.max_position_embeddings
    held_out_spans = eval_spans(held_out, tokenizer, window, EVAL_MEMORY, spans)
    return training.evaluate(model, held_out_spans, window, EVAL_MEMORY, 8, device, training.autocast_for(device))


# ----------------------------------------------------------------------------------------------------------------------
# Top-k memory against attention to all of memory, on the trained FoT models (--topk)

TOPK = [32, 128, 512]  # memory entries each query attends to
TOPK_LENGTHS, TOPK_CODE = "16k,64k,256k", "64k"


def topk_settings() -> dict:
    """{name: passkey.py flags}: all of memory, then each retrieval at each K."""
    settings = {"all": []}
    for k in TOPK:
        for retrieval in MEM_RETRIEVALS:
            settings[f"{retrieval}{k}"] = ["--mem-topk", str(k), "--mem-retrieval", retrieval]
    return settings


def topk_commands(models: Path, out: Path, size: dict) -> list:
    """passkey.py runs of the top-k comparison whose results file is missing: passkey in the filler for every
    setting of the FoT models, and for all of memory and K = 128 (blocks) of the others; in held-out code for the
    FoT models, and after other documents and decoys for every model, with all of memory and K = 128."""
    commands, flags = [], ["--depths", size["depths"], "--trials", str(size["trials"])]
    for name in SETUPS:
        ckpt = ["--ckpt", str(models / name)]
        for setting, topk in topk_settings().items():
            runs = {}
            if name in FOT or setting in ("all", "blocks128"):
                runs[f"passkey_{name}_{setting}.json"] = [*ckpt, "--lengths", TOPK_LENGTHS, *flags, *topk]
            if name in FOT and setting in ("all", "blocks128", "exact128"):
                runs[f"passkey_code_{name}_{setting}.json"] = [*ckpt, "--lengths", TOPK_CODE, *flags, "--haystack",
                                                               str(held_out_code(out)), *topk]
            if setting in ("all", "blocks128"):
                runs |= {f"{task}_{name}_{setting}.json": [*ckpt, *distraction_flags(task, out, size), *topk]
                         for task in DISTRACTIONS}
            commands += [[sys.executable, "passkey.py", *run_flags, "--out", str(out / file)]
                         for file, run_flags in runs.items() if not (out / file).is_file()]
    return commands


def topk_experiment(models: Path, out: Path, size: dict) -> dict:
    """Every top-k run (skipping finished ones) and held-out perplexity with each K (blocks), as OUT/topk.json."""
    missing = [str(models / name) for name in SETUPS if not (models / name / "config.json").is_file()]
    if missing:  # refused before anything is written or run
        raise ValueError(f"--topk compares trained models, and {', '.join(missing)} holds none (see --models)")
    out.mkdir(parents=True, exist_ok=True)
    run(topk_commands(models, out, size), size["side_by_side"])
    results = {}
    for name in SETUPS:
        setup = results[name] = {}
        for setting, flags in topk_settings().items():
            found = {key: summary(out / f"{key}_{name}_{setting}.json")
                     for key in ("passkey", "passkey_code", *DISTRACTIONS)
                     if (out / f"{key}_{name}_{setting}.json").is_file()}
            if name in FOT and setting in ("all", *(f"blocks{k}" for k in TOPK)):
                topk = {} if setting == "all" else dict(mem_topk=int(flags[1]), mem_retrieval=flags[3])
                found["perplexity"] = memory_perplexity(models / name, size["eval_spans"], **topk)
            if found:
                setup[setting] = found
    write_atomically({out / "topk.json": lambda tmp: tmp.write_text(json.dumps(results, indent=1))})
    return results


def topk_tables(results: dict) -> str:
    """The README's tables of the top-k comparison: passkey (filler and code) and perplexity for each setting
    measured, then other documents and decoys in memory for every setup with all of memory and with K = 128."""
    settings = topk_settings()
    label = lambda setting: (f"top {settings[setting][1]} ({settings[setting][3]})" if settings[setting]
                             else "all of memory")
    lengths = [parse_length(n) for n in TOPK_LENGTHS.split(",")]
    code = parse_length(TOPK_CODE)
    lines = [f"| model | memory attention | {' | '.join(f'passkey, {size_label(n)}' for n in lengths)} | "
             f"in code, {size_label(code)} | perplexity, 16 windows vs 0 |",
             "| --- | --- |" + " ---: |" * (len(lengths) + 2)]
    cell = lambda part, n: (passkey.with_interval(part["accuracy"][str(n)], part["interval"][str(n)])
                            if part and str(n) in part["accuracy"] else "-")
    for name in SETUPS:
        for setting, found in results[name].items():
            if "passkey" not in found:
                continue
            ppl = found.get("perplexity")
            change = f"{ppl['16'] / ppl['0'] - 1:+.1%}" if ppl else "-"
            cells = [cell(found.get("passkey"), n) for n in lengths] + [cell(found.get("passkey_code"), code), change]
            lines.append(f"| {LABELS[name]} | {label(setting)} | {' | '.join(cells)} |")
    for task in DISTRACTIONS:
        sizes = sorted({int(n) for setup in results.values() for found in setup.values() if task in found
                        for n in found[task]["accuracy"]})
        if not sizes:
            continue
        lines += ["", f"| setup | memory attention | {' | '.join(f'{task}: {size_label(n)}' for n in sizes)} |",
                  "| --- | --- |" + " ---: |" * len(sizes)]
        for name, setup in results.items():
            for setting, found in setup.items():
                if task in found:
                    lines.append(f"| {LABELS[name]} | {label(setting)} | "
                                 f"{' | '.join(cell(found[task], n) for n in sizes)} |")
    return "\n".join(lines)


def summary(path: Path) -> dict:
    """A passkey.py report without its trials (they stay in the file)."""
    report = json.loads(path.read_text())
    return {key: value for key, value in report.items() if key != "results"}


def plot_lines(series: dict, path, xlabel: str, ylabel: str, title: str, percent: bool = False, intervals=None):
    """One line per setup: series = {label: {x: y}}, intervals = {label: {x: [low, high]}} as error bars."""
    plt = passkey.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # markers and dashes differ, so that setups with equal figures (all at 0%) still show as separate lines
    for (label, points), marker, style, size in zip(series.items(), "os^Dv", ["-", "--", ":", "-.", "-"],
                                                    [7, 6, 5, 4, 4]):
        xs, ys = [float(x) for x in points], list(points.values())
        if intervals:
            low_high = [intervals[label][x] for x in points]
            errors = [[y - low for y, (low, _) in zip(ys, low_high)], [high - y for y, (_, high) in zip(ys, low_high)]]
            ax.errorbar(xs, ys, yerr=errors, marker=marker, linestyle=style, markersize=size, capsize=3,
                        label=label)
        else:
            ax.plot(xs, ys, marker=marker, linestyle=style, markersize=size, label=label)
    xs = sorted({float(x) for points in series.values() for x in points})  # every setup's, some have fewer
    if min(xs) == 0:  # 0 on a log axis: symlog, linear up to the smallest other value
        ax.set_xscale("symlog", base=2, linthresh=min(x for x in xs if x > 0))
    else:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [size_label(int(x)) for x in xs])
    ax.minorticks_off()
    if percent:
        ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    passkey.save_figure(fig, path)


def draw(results: dict, out: Path):
    """The experiment's plots from its results.json content."""
    setups = results["setups"]
    label = lambda name: LABELS.get(name, name)
    for key, file, haystack in [("passkey", "passkey.png", "LongLLaMA's filler"),
                                ("passkey_code", "passkey_code.png", "held-out standard-library code")]:
        plot_lines({label(n): s[key]["accuracy"] for n, s in setups.items()}, out / file, "prompt length (tokens)",
                   "passkey accuracy", f"Passkey in {haystack}, trained on rows of {results['train_tokens']} tokens",
                   percent=True, intervals={label(n): s[key]["interval"] for n, s in setups.items()})
    for task, prefix, material in [("documents", "", "other documents"), ("decoys", "decoys_", "decoy documents")]:
        if task not in measured_distractions(setups):
            continue
        plot_lines({label(n): s[task]["accuracy"] for n, s in setups.items()}, out / f"{prefix}distraction.png",
                   f"tokens of {material} in memory", "passkey accuracy",
                   f"The passkey after {material} (the distraction issue)", percent=True,
                   intervals={label(n): s[task]["interval"] for n, s in setups.items()})
        plot_lines({label(n): s[task]["relevant_attention"] for n, s in setups.items()},
                   out / f"{prefix}attention.png", f"tokens of {material} in memory",
                   "attention on the passkey's document", f"Memory-layer attention after {material}", percent=True)
    plot_lines({label(n): s["perplexity"] for n, s in setups.items()}, out / "perplexity.png",
               f"earlier windows of {results['window']} tokens in memory", "held-out perplexity",
               "Perplexity of standard-library code vs memory")
    first = next(iter(setups))
    passkey.plot_heatmap(setups[first]["passkey"], out / f"heatmap_{first}.png", f"passkey retrieval: {label(first)}")


def measured_distractions(setups: dict) -> list:
    """The distraction tasks a results file holds (one from before a task was added lacks it)."""
    return [task for task in DISTRACTIONS if task in next(iter(setups.values()))]


def tables(results: dict) -> str:
    """The README's tables of an experiment: passkey accuracy in the filler and in held-out code, accuracy and
    attention after other documents and after decoys, perplexity against memory; '-' where a setup was not
    measured."""
    setups, label = results["setups"], lambda name: LABELS.get(name, name)

    def accuracy_table(key: str, header: str) -> list:
        columns = sorted({int(n) for s in setups.values() for n in s[key]["accuracy"]})
        lines = [f"| setup | {' | '.join(f'{header} {size_label(n)}' for n in columns)} |",
                 "| --- |" + " ---: |" * len(columns)]
        for name, setup in setups.items():
            cells = [passkey.with_interval(setup[key]["accuracy"][str(n)], setup[key]["interval"][str(n)])
                     if str(n) in setup[key]["accuracy"] else "-" for n in columns]
            lines.append(f"| {label(name)} | {' | '.join(cells)} |")
        return lines + [""]

    lines = accuracy_table("passkey", "passkey,") + accuracy_table("passkey_code", "in code,")
    for task in measured_distractions(setups):
        lines += accuracy_table(task, f"{task}:")
        sizes = list(next(iter(setups.values()))[task]["relevant_attention"])
        lines += [f"| setup | {' | '.join(f'attention, {size_label(int(n))}' for n in sizes)} |",
                  "| --- |" + " ---: |" * len(sizes)]
        for name, setup in setups.items():
            shares = [f"{setup[task]['relevant_attention'][n]:.1%}" for n in sizes]
            lines.append(f"| {label(name)} | {' | '.join(shares)} |")
        lines.append("")
        if task == "documents":
            lines += orders_table(setups)
    memory = list(next(iter(setups.values()))["perplexity"])
    lines += [f"| setup | perplexity with {' / '.join(memory)} windows in memory | {memory[-1]} vs 0 |",
              "| --- | --- | ---: |"]
    for name, setup in setups.items():
        ppl = setup["perplexity"]
        lines.append(f"| {label(name)} | {' / '.join(f'{p:.2f}' for p in ppl.values())} | "
                     f"{ppl[memory[-1]] / ppl['0'] - 1:+.1%} |")
    return "\n".join(lines)


def orders_table(setups: dict) -> list:
    """Accuracy after other documents for each text in memory (held-out code, then training code in each order)
    and each setup, at every size measured but 0."""
    texts = {"held-out code": lambda setup: setup["documents"]}
    texts |= {f"training code, order {k}": lambda setup, k=k: setup["documents_orders"][k]
              for k in next(iter(setups.values())).get("documents_orders", {})}
    sizes = [n for n in next(iter(setups.values()))["documents"]["accuracy"] if n != "0"]
    lines = [f"| other documents | setup | {' | '.join(size_label(int(n)) for n in sizes)} |",
             "| --- | --- |" + " ---: |" * len(sizes)]
    for text, part in texts.items():
        for name, setup in setups.items():
            cells = [passkey.percent(part(setup)["accuracy"].get(n)) for n in sizes]
            lines.append(f"| {text} | {LABELS.get(name, name)} | {' | '.join(cells)} |")
    return lines + [""]


def size_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = fail
    p.add_argument("--size", choices=list(SIZES), default="cpu")
    p.add_argument("--out", default="runs/scaling", help="directory for the runs, results.json and plots")
    p.add_argument("--only-draw", action="store_true", help="redraw the plots from OUT/results.json")
    p.add_argument("--topk", action="store_true",
                   help="instead: top-k memory against all of memory on the trained models (passkey, code, other "
                        "documents, decoys, perplexity), runs and OUT/topk.json in OUT/topk")
    p.add_argument("--models", default=None,
                   help="with --topk: where the trained models are (default OUT; models/ holds the shipped ones)")
    return p.parse_args(argv)


def main(argv=None):
    as_command(lambda: experiment(parse_args(argv)))


def experiment(args):
    """The experiment (or --topk's, in OUT/topk). A failure leaves no directory it made as long as nothing is in it:
    a training run or results files that are there are steps a rerun goes on from."""
    made = Path(args.out) / "topk" if args.topk else Path(args.out)
    with removed_on_failure(made, keep=lambda: made.is_dir() and any(made.iterdir())):
        run_experiment(args)


def run_experiment(args):
    out, size = Path(args.out), SIZES[args.size]
    if args.topk:
        started = time.time()
        print(topk_tables(topk_experiment(Path(args.models or out), out / "topk", size)))
        print(f"done in {time.time() - started:.0f} s: {out / 'topk' / 'topk.json'}")
        return
    if args.only_draw:
        results = out / "results.json"
        if not results.is_file():
            raise ValueError(f"no {results} to draw: run the experiment first")
        draw(json.loads(results.read_text()), out)
        print(tables(json.loads(results.read_text())))
        return
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train_all(out, size)
    trained_at = time.time()
    run(trial_commands(out, size), size["side_by_side"])
    config = longllama.LongLlamaConfig.from_json(out / "base" / "config.json")
    results = dict(size=args.size, window=config.max_position_embeddings,
                   train_tokens=int(flag(size["base"], "--seq-len")),
                   setups={name: dict(cross_batch_range=d, passkey=summary(out / f"passkey_{name}.json"),
                                      passkey_code=summary(out / f"passkey_code_{name}.json"),
                                      **{task: summary(out / f"{task}_{name}.json") for task in DISTRACTIONS},
                                      documents_orders={str(k): summary(out / f"documents_{name}_order{k}.json")
                                                        for k in range(size["document_orders"])},
                                      perplexity=memory_perplexity(out / name, size["eval_spans"]))
                           for name, d in SETUPS.items()})
    results["seconds"] = dict(training=round(trained_at - started), total=round(time.time() - started))
    write_atomically({out / "results.json": lambda tmp: tmp.write_text(json.dumps(results, indent=1))})
    draw(results, out)
    print(tables(results))
    print(f"done in {results['seconds']['total']} s ({results['seconds']['training']} s of training): "
          f"{out / 'results.json'}")


if __name__ == "__main__":
    main()
