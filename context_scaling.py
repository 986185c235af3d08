"""FoT's context-scaling experiment, end to end: train three models, then measure how far their memory reaches.

    python context_scaling.py --size cpu --out runs/scaling          # 2 CPU cores, see README for the wall time
    python context_scaling.py --size cpu-long --out runs/long        # the same models trained 11x longer
    python context_scaling.py --size gpu --out runs/scaling          # one GPU: a larger model, longer training

Three models are trained with the same steps, data and seed, differing only in cross-batch attention:
- `fot`: d = 3 with packing 4: a row's memory layer sees the three rows before it: its document's earlier rows
  (the positives) and, for the first rows of a pack, the rows of the pack before, another document read beside
  it (the negatives);
- `d1`: d = 1: only the row just before;
- `d0`: d = 0: no cross-batch attention, so memory layers never see memory while training.
The data is the embedded Python standard library corpus plus synthetic passkey documents (`train.py
--passkey-docs`), in which the answer sits at least one training row after the passkey.

Then, for each model: passkey retrieval at prompt lengths far beyond the training rows (passkey.py), and the
held-out perplexity of standard-library code with 0 .. 16 earlier windows in memory (train.py's eval, run here).
Training and passkey trials run as their own processes, each command printed first, so any step can be rerun
alone; a size may train in stages, each from the last one's checkpoint. The results go to OUT/results.json, and
OUT/passkey.png, OUT/perplexity.png and OUT/heatmap_fot.png draw them.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import generate
import longllama
import passkey
import train as training
from tokenizer import open_tokenizer, tokenizer_file

SETUPS = {"fot": 3, "d1": 1, "d0": 0}  # name: cross-batch range d

# Lower than train.py's default: at 3e-3 these models never learn to copy, which retrieval needs first.
LEARNING_RATE = ["--lr", "1e-3", "--min-lr", "1e-4"]
ROWS = ["--seq-len", "256", "--batch-size", "8", "--packing", "4"]  # the tiny preset's window, 2,048 tokens a step
TINY_ROWS = ["--preset", "tiny", *ROWS]
# Training flags per size and stage (a later stage starts from the last one's weights, with a new optimizer and
# schedule): rows as long as the model's window, which is how it reads at inference. The curriculum of distances
# lives in each passkey document (passkey.py).
SIZES = {
    "cpu": dict(stages=[[*TINY_ROWS, *LEARNING_RATE, "--max-steps", "1500", "--passkey-docs", "3000"]],
                lengths="1k,4k,16k,64k", depths="0.1,0.5,0.9", trials=4, eval_spans=8),
    # copying from memory appears after about 10,000 steps (README); a constant rate after the cosine gets there
    "cpu-long": dict(stages=[[*TINY_ROWS, *LEARNING_RATE, "--max-steps", "8000", "--passkey-docs", "20000"],
                             [*ROWS, "--lr", "1e-3", "--min-lr", "1e-3", "--warmup-steps", "50", "--max-steps",
                              "9000", "--passkey-docs", "20000"]],
                     lengths="1k,4k,16k,64k", depths="0.1,0.5,0.9", trials=4, eval_spans=8),
    "gpu": dict(stages=[["--preset", "small", "--seq-len", "1024", "--batch-size", "16", "--packing", "4",
                         *LEARNING_RATE, "--max-steps", "6000", "--passkey-docs", "20000"]],
                lengths="1k,4k,16k,64k,256k", depths="0,0.25,0.5,0.75,1", trials=10, eval_spans=32),
}
EVAL_MEMORY = [0, 1, 2, 4, 8, 16]


def run(command: list[str]):
    print("$ " + shlex.join(command), flush=True)
    if subprocess.run(command).returncode:
        raise ValueError("the step above failed: rerun this command to go on from the last finished step")


def stage_dirs(out: Path, name: str, size: dict) -> list[Path]:
    """Where each training stage of a setup writes: the last one is OUT/NAME, the model that is evaluated."""
    count = len(size["stages"])
    return [out / name if i == count - 1 else out / f"{name}_stage{i + 1}" for i in range(count)]


def train(out: Path, name: str, d: int, size: dict):
    """One model, stage by stage. The first setup trains the tokenizer and the others reuse it, so that all read
    the same tokens; a later stage starts from the stage before. A finished stage is skipped and an unfinished one
    resumed, so the experiment goes on where it stopped."""
    first = stage_dirs(out, next(iter(SETUPS)), size)[0]
    previous = None
    for flags, run_dir in zip(size["stages"], stage_dirs(out, name, size)):
        if previous is not None:
            start = ["--init", str(previous)]
        else:
            start = [] if run_dir == first else ["--tokenizer", str(tokenizer_file(first))]
        previous, state = run_dir, run_dir / "train_state.json"
        steps = int(flags[flags.index("--max-steps") + 1])
        if state.is_file() and json.loads(state.read_text()).get("step", 0) >= steps:
            print(f"# {run_dir}: trained ({steps} steps)", flush=True)
            continue
        resume = ["--resume"] if state.is_file() else []
        run([sys.executable, "train.py", *flags, "--cross-batch-range", str(d), "--eval-every", "0",
             "--out", str(run_dir), *start, *resume])


def memory_perplexity(run_dir: Path, spans: int) -> dict:
    """Held-out perplexity of standard-library code with 0 .. 16 earlier windows in memory: train.py's eval, on
    the documents its --holdout keeps out of training, {windows in memory: perplexity}."""
    print(f"# perplexity vs memory: {run_dir}", flush=True)
    device = longllama.resolve_device()
    model = longllama.load(run_dir, device=device)
    tokenizer = open_tokenizer(tokenizer_file(run_dir))
    settings = json.loads((run_dir / "train_state.json").read_text()).get("settings", {})
    holdout = settings.get("holdout", training.Settings().holdout)
    _, held_out = training.split_held_out(training.stdlib_documents(), holdout)
    window = model.config.max_position_embeddings
    eval_spans = training.eval_spans(held_out, tokenizer, window, EVAL_MEMORY, spans)
    return training.evaluate(model, eval_spans, window, EVAL_MEMORY, 8, device, training.autocast_for(device))


def evaluate_passkey(out: Path, name: str, size: dict):
    run([sys.executable, "passkey.py", "--ckpt", str(out / name), "--lengths", size["lengths"], "--depths",
         size["depths"], "--trials", str(size["trials"]), "--out", str(out / f"passkey_{name}.json")])


def plot_lines(series: dict, path, xlabel: str, ylabel: str, title: str, log_x: bool = True, percent: bool = False):
    """One line per setup: series = {label: {x: y}}."""
    plt = passkey.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # markers and dashes differ, so that setups with equal figures (all at 0%) still show as separate lines
    for (label, points), marker, style, size in zip(series.items(), "os^D", ["-", "--", ":", "-."], [7, 6, 5, 4]):
        xs = [float(x) for x in points]
        ax.plot(xs, list(points.values()), marker=marker, linestyle=style, markersize=size, label=label)
    if log_x:  # powers of two, 0 included (symlog is linear below 1)
        ax.set_xscale("symlog" if min(xs) == 0 else "log", base=2)
        ax.set_xticks(xs, [f"{int(x):,}" for x in xs])
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


LABELS = {"fot": "FoT (d = 3)", "d1": "d = 1", "d0": "d = 0 (no cross-batch)"}


def draw(results: dict, out: Path):
    """The experiment's plots from its results.json content."""
    plot_lines({LABELS.get(n, n): r["passkey"]["accuracy"] for n, r in results["setups"].items()},
               out / "passkey.png", "prompt length (tokens)", "passkey accuracy",
               f"Passkey retrieval, trained on rows of {results['train_tokens']} tokens", percent=True)
    plot_lines({LABELS.get(n, n): r["perplexity"] for n, r in results["setups"].items()},
               out / "perplexity.png", f"earlier windows of {results['window']} tokens in memory",
               "held-out perplexity", "Perplexity of standard-library code vs memory")
    first = next(iter(results["setups"]))
    passkey.plot_heatmap(results["setups"][first]["passkey"], out / f"heatmap_{first}.png",
                         f"passkey retrieval: {LABELS.get(first, first)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = generate.fail
    p.add_argument("--size", choices=list(SIZES), default="cpu")
    p.add_argument("--out", default="runs/scaling", help="directory for the three runs, results.json and plots")
    p.add_argument("--only-draw", action="store_true", help="redraw the plots from OUT/results.json")
    return p.parse_args(argv)


def main(argv=None):
    generate.as_command(lambda: experiment(parse_args(argv)))


def experiment(args):
    out, size = Path(args.out), SIZES[args.size]
    if args.only_draw:
        results = out / "results.json"
        if not results.is_file():
            raise ValueError(f"no {results} to draw: run the experiment first")
        draw(json.loads(results.read_text()), out)
        return
    started = time.time()
    for name, d in SETUPS.items():
        train(out, name, d, size)
    for name in SETUPS:
        evaluate_passkey(out, name, size)
    config = longllama.LongLlamaConfig.from_json(out / next(iter(SETUPS)) / "config.json")
    results = dict(size=args.size, window=config.max_position_embeddings,
                   train_tokens=int(size["stages"][0][size["stages"][0].index("--seq-len") + 1]),
                   setups={name: dict(cross_batch_range=d,
                                      passkey=json.loads((out / f"passkey_{name}.json").read_text()),
                                      perplexity=memory_perplexity(out / name, size["eval_spans"]))
                           for name, d in SETUPS.items()})
    for setup in results["setups"].values():
        del setup["passkey"]["results"]  # every trial stays in passkey_NAME.json
    results["wall_seconds"] = round(time.time() - started)
    longllama.write_atomically({out / "results.json": lambda tmp: tmp.write_text(json.dumps(results, indent=1))})
    draw(results, out)
    print(f"done in {results['wall_seconds']} s: {out / 'results.json'}")


if __name__ == "__main__":
    main()
