"""FoT continued pretraining of LongLLaMA: cross-batch training of the memory layers on a document-aware stream.

    python train.py                                     # the default run: `tiny` preset on the embedded corpus, CPU
    python train.py --max-steps 50 --out runs/quick     # shorter, elsewhere
    python train.py --data corpus.jsonl --preset small --batch-size 16 --seq-len 1024 --grad-accum 4
    python train.py --init ckpt/ --data code/ --mem-layers 6,12,18 --lr 3e-5   # continued pretraining
    python train.py --resume --out runs/quick           # continue the run saved in runs/quick
    torchrun --standalone --nproc_per_node 8 train.py --init ckpt/ --data corpus.jsonl          # DDP, one node
    torchrun --standalone --nproc_per_node 8 train.py --init code-7b/ --data corpus.jsonl --fsdp  # 7B: FSDP
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...

Where FoT lives in this file:
- `Batches`: the document-aware pipeline. Every batch slot reads one document at a time (documents joined by
  EOS BOS when a slot moves on to its next one); with packing k a slot is k consecutive rows, so a document's
  earlier pieces sit in the rows just before it: the positives that cross-batch attention shows the memory
  layers, while the other documents of the batch are the negatives.
- the training step calls `model(inputs, cross_batch_range=d, stepping=..., packing=k)`: cross-batch attention
  (`longllama.cross_batch_attention`).
- `evaluate`: perplexity of a held-out window when 0, 1, 3, 7 ... earlier windows are in memory.

Data (--data): JSONL files of {"text": ...} or {"prompt": ..., "completion": ...} records (prompt tokens get no
loss), plain text files (one document each), or directories of them. Documents are shuffled (seeded) anew every
epoch, each rank reads its own share, and the pipeline state is a few numbers per slot, so --resume sees exactly
the batches an uninterrupted run would. Documents whose stable name hash falls in the --holdout percent are the
eval set, unless --eval-data is given. --passkey-docs N adds N synthetic passkey documents (passkey.py: the answer a
training row or more after the passkey, so that cross-batch attention is what learns it), generated when read.
Without --data the corpus is the Python standard library this interpreter runs on (sysconfig "stdlib"): every
.py file except test suites (test/, tests/, idle_test/, test_*.py), site-packages, and trees that are
applications, bundles or generated tables rather than library code (idlelib, turtledemo, lib2to3, ensurepip,
pydoc_data, encodings, lib-dynload, config-*). The files of one top-level package form one document, each file
after a "# file: PATH" line (a module outside a package is a document of its own): on CPython 3.11, 193
documents of 451 files, 8.8 MB; --holdout 5 holds out _markupbase, ast, hashlib, hmac and sre_compile.

OUT holds a checkpoint generate.py and longllama.load read as is (config.json, model.safetensors,
tokenizer.model or tokenizer.json) plus optimizer.pt, train_state.json (step, pipeline state, settings) and log.jsonl.
Settings are the fields of `Settings` below; each is a flag (`batch_size` is --batch-size).
"""

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

import longllama
import passkey
from longllama import is_int, is_number
from tokenizer import MIN_VOCAB_SIZE, open_tokenizer, tokenizer_file, train_tokenizer, utf8_text


def setting(default, help):
    return field(default_factory=lambda: copy.copy(default), metadata={"help": help})


@dataclass
class Settings:
    """Every setting of a run, with its default. Batch sizes are per process (rank) and per micro step."""

    # data
    data: list = setting([], "JSONL / text files or directories (default: the embedded Python stdlib corpus)")
    eval_data: list = setting([], "held-out documents for eval (default: the --holdout share of the corpus)")
    holdout: float = setting(5.0, "percent of documents held out for eval, by a stable hash of their names")
    passkey_docs: int = setting(0, "synthetic passkey documents (passkey.py) added to the training documents")
    passkey_layout: str = setting("far", "passkey documents, in turn of these comma-separated layouts: far (answers "
                                         "a window or more away: memory), near (several passkeys, each answered "
                                         "within half a window), decoy (far, among keys said the same way)")
    tokenizer: str = setting("", "tokenizer.model or tokenizer.json (default: the --init checkpoint's, else one trained into OUT)")
    vocab_size: int = setting(4096, "vocabulary of a tokenizer trained here")
    # model
    preset: str = setting("tiny", "model shape when training from scratch: " + ", ".join(longllama.PRESETS))
    init: str = setting("", "start from this checkpoint directory instead (continued pretraining)")
    mem_layers: str = setting("", "memory layers, e.g. 6,12,18 (default: the preset's / checkpoint's)")
    # FoT
    batch_size: int = setting(16, "rows per micro batch (per process); cross-batch attention runs within it")
    seq_len: int = setting(256, "T, tokens per row; at most the model window")
    cross_batch_range: int = setting(3, "d: memory layers of row b also see all keys of rows b-1 .. b-d")
    packing: int = setting(4, "k: each document takes k consecutive rows (batch size must be divisible by k)")
    stepping: bool = setting(False, "cross-batch stepping: row i of a pack sees a memory growing with i")
    # optimization
    max_steps: int = setting(500, "optimizer steps")
    grad_accum: int = setting(1, "micro batches per optimizer step")
    lr: float = setting(3e-3, "peak learning rate")
    min_lr: float = setting(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = setting(30, "linear warmup steps")
    lr_decay_steps: int = setting(0, "steps of cosine decay (0: max_steps)")
    weight_decay: float = setting(0.1, "AdamW weight decay, matrices only")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: off)")
    seed: int = setting(1337, "model init and data order")
    # system
    device: str = setting("", "cpu, cuda, cuda:1 (default: cuda when available)")
    activation_checkpointing: bool = setting(False, "recompute each block in the backward pass")
    compile: bool = setting(False, "torch.compile the model")
    fsdp: bool = setting(False, "shard parameters, gradients and optimizer state with FSDP (under torchrun)")
    # output
    out: str = setting("out", "checkpoint directory")
    resume: bool = setting(False, "continue the run saved in OUT")
    save_every: int = setting(250, "checkpoint every N steps (and at the end)")
    log_every: int = setting(10, "log.jsonl line every N steps")
    eval_every: int = setting(125, "eval every N steps and at the end (0: no eval)")
    eval_memory: str = setting("0,1,3,7", "windows in memory before the evaluated window")
    eval_spans: int = setting(16, "held-out spans evaluated")
    eval_batch_size: int = setting(8, "spans per eval forward")


# What each setting must be (for longllama.check_values). Flags arrive typed by argparse, but a resumed run's settings
# come from train_state.json, so types are checked too. Counts stay below 2**63: torch holds them in int64.
SETTING_RULES = [
    (["batch_size", "seq_len", "packing", "grad_accum", "save_every", "log_every", "eval_spans", "eval_batch_size"],
     lambda v: is_int(v) and 1 <= v < 2**63, "an integer in [1, 2**63)"),
    (["max_steps", "warmup_steps", "lr_decay_steps", "cross_batch_range", "eval_every"],
     lambda v: is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    (["seed"], lambda v: is_int(v) and 0 <= v < 2**64, "an integer in [0, 2**64)"),
    (["passkey_docs"], lambda v: is_int(v) and 0 <= v <= 10**7, "an integer in [0, 10**7]"),  # a list entry each
    (["vocab_size"], lambda v: is_int(v) and MIN_VOCAB_SIZE <= v < 2**31, f"an integer in [{MIN_VOCAB_SIZE}, 2**31)"),
    (["lr", "min_lr", "weight_decay", "grad_clip"], lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    (["beta1", "beta2"], lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (["holdout"], lambda v: is_number(v) and 0 <= v <= 100, "a percentage in [0, 100]"),
    (["stepping", "activation_checkpointing", "compile", "fsdp", "resume"], lambda v: isinstance(v, bool),
     "true or false"),
    (["tokenizer", "init", "mem_layers", "device", "out", "eval_memory"], lambda v: isinstance(v, str), "a string"),
    (["data", "eval_data"], lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of paths"),
    (["preset"], lambda v: v in longllama.PRESETS, f"one of {', '.join(longllama.PRESETS)}"),
    (["passkey_layout"], lambda v: isinstance(v, str) and set(v.split(",")) <= set(passkey.LAYOUTS),
     f"comma-separated layouts among {', '.join(passkey.LAYOUTS)}"),
]

# Settings a resumed run may change; any other would make it a different run.
CHANGEABLE_ON_RESUME = {"max_steps", "save_every", "log_every", "eval_every", "eval_batch_size", "device",
                        "activation_checkpointing", "compile", "out", "resume"}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # bad flags are bad input like any other: one line, status 1
        raise ValueError(message)


def parse_settings(argv=None) -> tuple[Settings, dict]:
    """Settings from the command line, and the flags given explicitly (which a resumed run checks)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=__doc__.split("\n\n", 1)[1])
    for f in fields(Settings):
        default = f.default_factory()
        help = f.metadata["help"] if "default:" in f.metadata["help"] else f"{f.metadata['help']} (default: {default})"
        options = dict(default=argparse.SUPPRESS, help=help)
        if f.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif f.type is list:
            options["nargs"] = "+"
        else:
            options["type"] = f.type
        if f.name == "preset":
            options["choices"] = list(longllama.PRESETS)
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
    explicit = vars(parser.parse_args(argv))
    return Settings(**explicit), explicit


def check_settings(values: dict, label=lambda key: "--" + key.replace("_", "-")):
    longllama.check_values(values, SETTING_RULES, label)


def int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None


def warn(message):
    if not QUIET:
        print(f"warning: {message}", file=sys.stderr)


QUIET = False  # ranks other than 0 stay quiet


# ----------------------------------------------------------------------------------------------------------------------
# Documents: where each one is (read on demand, so a large corpus costs no memory)


class Document(NamedTuple):
    name: str  # "notes.txt", "data.jsonl:12" or a stdlib package: for messages and the held-out hash
    files: tuple  # the file it is read from, or the files of a stdlib package (concatenated)
    offset: int = -1  # JSONL: byte offset of its line in files[0]
    root: str = ""  # stdlib packages: each file is preceded by "# file: PATH" relative to this
    passkey: tuple = ()  # a synthetic passkey document: (seed, training window, layout, haystacks)


def read_document(doc: Document) -> tuple[str, str]:
    """(prompt, text): prompt is "" except for {"prompt", "completion"} records."""
    if doc.passkey:
        seed, window, layout, haystacks = doc.passkey
        return "", passkey.training_document(random.Random(seed), window, haystacks, layout)
    if doc.offset >= 0:
        with open(doc.files[0], "rb") as f:
            f.seek(doc.offset)
            return parse_record(f.readline(), doc.name)
    if doc.root:
        return "", "".join(f"# file: {Path(p).relative_to(doc.root)}\n{read_text(p)}" for p in doc.files)
    return "", read_text(doc.files[0])


def read_text(path) -> str:
    """A file's text; raises UnicodeDecodeError for files that are not UTF-8 text (NUL bytes count as binary)."""
    return utf8_text(Path(path).read_bytes())


def parse_record(line: bytes, name: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise ValueError(f"{name}: malformed JSON ({e})") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return "", record["text"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"], record["completion"]
    raise ValueError(f'{name}: expected {{"text": str}} or {{"prompt": str, "completion": str}}')


def scan_jsonl(path: Path) -> list[Document]:
    documents = []
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            name = f"{path}:{number}"
            if line.strip():
                prompt, text = parse_record(line, name)  # every line is checked now, not mid-run
                if prompt or text:
                    documents.append(Document(name, (str(path),), offset))
                else:
                    warn(f"{name}: empty document, skipped")
            offset += len(line)
    return documents


def scan_paths(paths) -> list[Document]:
    """Every document under paths: JSONL records, text files, files in directories (hidden ones skipped)."""
    documents = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"data path {path} does not exist")
        in_directory = path.is_dir()
        files = [path]
        if in_directory:  # every file below, in a stable order; hidden files and directories (.git) left out
            files = []
            for directory, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files += [Path(directory, name) for name in sorted(names) if not name.startswith(".")]
        for file in files:
            try:
                if file.suffix == ".jsonl":
                    documents += scan_jsonl(file)
                elif read_text(file):
                    documents.append(Document(str(file), (str(file),)))
                else:
                    warn(f"{file}: empty document, skipped")
            except UnicodeDecodeError:
                if not in_directory:
                    raise ValueError(f"{file}: not UTF-8 text") from None
                warn(f"{file}: not UTF-8 text, skipped")
    if not documents:
        raise ValueError(f"no documents in {' '.join(map(str, paths))}")
    return documents


# Not library code, or not worth learning from: test suites, installed packages, applications, bundled wheels,
# generated tables and build files.
STDLIB_LEFT_OUT = {"site-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3", "ensurepip",
                   "pydoc_data", "encodings", "lib-dynload", "__pycache__"}


def stdlib_documents() -> list[Document]:
    """The embedded corpus: the Python standard library's source, one document per top-level package."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_LEFT_OUT and not d.startswith("config-"))
        for name in sorted(names):
            if name.endswith(".py") and not name.startswith(("test_", "_sysconfigdata")):
                path = Path(directory, name)
                package = path.relative_to(root).parts[0].removesuffix(".py")
                packages.setdefault(package, []).append(str(path))
    if not packages:
        raise ValueError(f"no Python files in the standard library at {root}: pass --data")
    return [Document(name, tuple(files), root=str(root)) for name, files in sorted(packages.items())]


HAYSTACK_DOCUMENTS = 32  # corpus documents whose lines passkey documents may hide their passkeys in


def passkey_documents(count: int, seed: int, window: int, tokenizer, layout: str = "far",
                      corpus: tuple = ()) -> list[Document]:
    """Synthetic passkey documents, each generated from its own seed when read (they cost no disk), in the
    comma-separated layouts taken in turn.

    Each draws its haystack at random: LongLLaMA's filler or (when corpus documents are given) the lines of up to
    HAYSTACK_DOCUMENTS of them, so that retrieval does not hang on one filler sentence."""
    haystacks = [passkey.Haystack.filler(tokenizer)]
    if corpus:
        sample = random.Random(seed).sample(list(corpus), min(HAYSTACK_DOCUMENTS, len(corpus)))
        haystacks.append(passkey.Haystack.from_text(tokenizer, "\n".join(read_document(d)[1] for d in sample),
                                                    "corpus"))
    layouts = layout.split(",")
    return [Document(f"passkey {i}", (), passkey=(f"passkey {seed} {i}", window, layouts[i % len(layouts)],
                                                  tuple(haystacks)))
            for i in range(count)]


def is_held_out(doc: Document, percent: float) -> bool:
    """A stable choice (the same on every machine and Python): a hash of the document's name."""
    return int(hashlib.sha1(doc.name.encode()).hexdigest(), 16) % 10000 < percent * 100


def split_held_out(documents, percent: float) -> tuple[list, list]:
    """(training documents, held-out documents), by is_held_out."""
    held_out = [is_held_out(doc, percent) for doc in documents]
    return ([doc for doc, out in zip(documents, held_out) if not out],
            [doc for doc, out in zip(documents, held_out) if out])


def autocast_for(device):
    """bfloat16 autocast on GPU (weights stay float32); nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def tokenize(doc: Document, tokenizer) -> tuple[list, list]:
    """BOS + tokens + EOS and the loss mask of each token as a target (0 for a prompt); ([], []) when empty."""
    prompt, text = read_document(doc)
    if prompt:
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        text_ids = tokenizer.encode(text, bos=False, eos=True)
        tokens, mask = prompt_ids + text_ids, [0] * len(prompt_ids) + [1] * len(text_ids)
    else:
        tokens = tokenizer.encode(text, bos=True, eos=True)
        mask = [1] * len(tokens)
    return (tokens, mask) if len(tokens) > 2 else ([], [])  # nothing but BOS and EOS: shorter than one token


# ----------------------------------------------------------------------------------------------------------------------
# The document-aware pipeline


class DocumentStream:
    """One rank's share of the documents, shuffled anew every epoch (seeded); documents without tokens skipped."""

    def __init__(self, documents, tokenizer, indices, seed):
        self.documents, self.tokenizer, self.indices, self.seed = documents, tokenizer, list(indices), seed
        self.epoch, self.position = 0, 0  # the next document is order(epoch)[position]
        self.empty = set()
        self._order = (None, [])  # (epoch, its shuffled order): computed once per epoch
        if not self.indices:
            raise ValueError("no documents for this rank: fewer documents than processes")

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            order = list(self.indices)
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def tokens(self, index: int):
        return tokenize(self.documents[index], self.tokenizer)

    def next(self) -> tuple[int, list, list]:
        """(index, tokens, mask) of the next document that has tokens."""
        while len(self.empty) < len(self.indices):
            if self.position == len(self.indices):
                self.epoch, self.position = self.epoch + 1, 0
            index = self.order(self.epoch)[self.position]
            self.position += 1
            tokens, mask = self.tokens(index)
            if tokens:
                return index, tokens, mask
            if index not in self.empty:
                self.empty.add(index)
                warn(f"{self.documents[index].name}: shorter than one token, skipped")
        raise ValueError("no document has any tokens")


class Slot:
    """One stream of k*T tokens per batch: the documents it is reading, and how far it is into the first."""

    def __init__(self):
        self.pieces = []  # [(index, tokens, mask)]: documents whose tokens are still to be read
        self.offset = 0  # tokens of pieces[0] already read

    def read(self, length: int, stream: DocumentStream) -> tuple[list, list]:
        """The next length + 1 tokens (inputs and their next-token targets) and masks; moves on by length."""
        while sum(len(tokens) for _, tokens, _ in self.pieces) - self.offset < length + 1:
            self.pieces.append(stream.next())  # a slot runs dry: its next document follows (EOS BOS between)
        tokens, mask, start = [], [], self.offset
        for _, piece_tokens, piece_mask in self.pieces:
            end = start + length + 1 - len(tokens)
            tokens, mask, start = tokens + piece_tokens[start:end], mask + piece_mask[start:end], 0
        self.offset += length  # the last target is the first input of the next batch
        while self.offset >= len(self.pieces[0][1]):
            self.offset -= len(self.pieces.pop(0)[1])
        return tokens, mask


class Batches:
    """Document-aware batches [B, T] with k-packing: B/k slots, each a k*T stream cut into k consecutive rows.

    A document runs on across the k rows of its slot and into the same rows of the next batch, so rows before
    a row hold the earlier part of its document. next() returns inputs, targets (long) and the loss mask (float).
    """

    def __init__(self, documents, tokenizer, batch_size, seq_len, packing=1, seed=0, rank=0, world_size=1):
        if packing < 1 or batch_size % packing:
            raise ValueError(f"batch size {batch_size} must be divisible by packing {packing}")
        self.shape = dict(batch_size=batch_size, seq_len=seq_len, packing=packing, seed=seed, rank=rank,
                          world_size=world_size)
        self.seq_len, self.packing = seq_len, packing
        # each rank reads a disjoint share of the documents
        self.stream = DocumentStream(documents, tokenizer, range(rank, len(documents), world_size), seed)
        self.slots = [Slot() for _ in range(batch_size // packing)]

    def next(self):
        rows = []
        for slot in self.slots:
            tokens, mask = slot.read(self.packing * self.seq_len, self.stream)
            for j in range(self.packing):  # row j of the slot: tokens j*T .. (j+1)*T, targets one further
                piece = slice(j * self.seq_len, (j + 1) * self.seq_len + 1)
                rows.append((tokens[piece], mask[piece]))
        tokens = torch.tensor([t for t, _ in rows])  # [B, T + 1]
        mask = torch.tensor([m for _, m in rows], dtype=torch.float32)
        return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]  # a target's mask is its own token's

    def state_dict(self) -> dict:
        """Small: where the stream is, and for each slot the documents it holds and its offset (no tokens)."""
        return dict(**self.shape, epoch=self.stream.epoch, position=self.stream.position,
                    slots=[dict(documents=[index for index, _, _ in slot.pieces], offset=slot.offset)
                           for slot in self.slots])

    def load_state_dict(self, state: dict):
        for key, value in self.shape.items():
            if state.get(key) != value:
                raise ValueError(f"pipeline state has {key}={state.get(key)}, this run {value}")
        share = set(self.stream.indices)
        if len(state["slots"]) != len(self.slots) or not all(set(s["documents"]) <= share for s in state["slots"]):
            raise ValueError("pipeline state names documents this run does not have: has the data changed?")
        self.stream.epoch, self.stream.position = state["epoch"], state["position"]
        for slot, saved in zip(self.slots, state["slots"]):
            slot.pieces = [(index, *self.stream.tokens(index)) for index in saved["documents"]]  # re-tokenized
            slot.offset = saved["offset"]


# ----------------------------------------------------------------------------------------------------------------------
# Eval: perplexity with memory


def eval_spans(documents, tokenizer, window: int, memory_sizes, count: int) -> torch.Tensor:
    """Up to count spans of (max(memory_sizes) + 1) * window + 1 tokens, cut from the held-out documents in order."""
    span = (max(memory_sizes) + 1) * window + 1
    spans = []
    for doc in documents:
        tokens, _ = tokenize(doc, tokenizer)
        spans += [tokens[i:i + span] for i in range(0, len(tokens) - span + 1, span)][:count - len(spans)]
        if len(spans) == count:
            break
    return torch.tensor(spans, dtype=torch.long).view(len(spans), span)


@torch.no_grad()
def evaluate(model, spans, window: int, memory_sizes, batch_size: int, device, autocast) -> dict:
    """For each m, the perplexity of every span's last window when the m windows before it were read into memory.

    The model reads the (m + 1) * W inputs with last_context_length=W: m windows into memory, then the last
    window, whose W next-token predictions are the only ones counted, so every m scores the same tokens.
    """
    was_training = model.training
    model.eval()
    perplexities = {}
    for m in memory_sizes:
        nll = 0.0
        for batch in spans.split(batch_size):
            inputs = batch[:, -(m + 1) * window - 1:-1].to(device)  # [b, (m+1)W]
            targets = batch[:, -window:].to(device)  # [b, W]
            with autocast:
                logits, _ = model(inputs, last_context_length=window)
            nll += F.cross_entropy(logits[:, -window:].float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        perplexities[str(m)] = math.exp(nll / (len(spans) * window))
    model.train(was_training)
    return perplexities


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(out: Path, config, model_state: dict, optimizer_state: dict, train_state: dict, tokenizer):
    """Write every file to a temporary name, then rename them all: an interrupted save leaves the previous
    checkpoint as it was. train_state.json is renamed last, since it says which step the others hold."""
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        **longllama.checkpoint_writers(out, config, model_state),
        out / "optimizer.pt": lambda p: torch.save(optimizer_state, p),
        out / "train_state.json": lambda p: p.write_text(json.dumps(train_state) + "\n"),
    }
    for name, path in tokenizer.files.items():  # tokenizer.model or .json (and tokenizer_config.json), unless there
        if path.resolve() != (out / name).resolve():
            writers = {out / name: lambda p, path=path: shutil.copyfile(path, p), **writers}
    longllama.write_atomically(writers)


# What train_state.json holds: a type, a dict of shapes, or [shape] for a list. Its numbers are counts (>= 0).
TRAIN_STATE_SHAPE = dict(step=int, tokens=int, world_size=int, settings=dict, pipeline=[dict(
    batch_size=int, seq_len=int, packing=int, seed=int, rank=int, world_size=int, epoch=int, position=int,
    slots=[dict(documents=[int], offset=int)])])


def shape_problem(value, shape, where: str = "") -> Optional[str]:
    """Where value first departs from shape, or None."""
    if isinstance(shape, dict):
        if not isinstance(value, dict) or value.keys() != shape.keys():
            return f"{where or 'it'} must be an object with the keys {', '.join(shape)}"
        return next(filter(None, (shape_problem(value[key], shape[key], f"{where}.{key}".lstrip("."))
                                  for key in shape)), None)
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} must be a list"
        return next(filter(None, (shape_problem(v, shape[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if shape is int:
        return None if is_int(value) and value >= 0 else f"{where} must be an integer >= 0, got {value!r}"
    return None if isinstance(value, shape) else f"{where} must be a {shape.__name__}"


def read_train_state(out: Path) -> dict:
    """train_state.json of the run in out, checked through: a damaged or foreign file is one clear error."""
    path = out / "train_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"--resume: {out} holds no run to continue ({e})") from None
    problem = shape_problem(state, TRAIN_STATE_SHAPE)
    if problem is None and len(state["pipeline"]) != state["world_size"]:
        problem = f"it has {len(state['pipeline'])} pipeline states for {state['world_size']} processes"
    names = {f.name for f in fields(Settings)}
    if problem is None and state["settings"].keys() - names:
        problem = f"unknown settings {sorted(state['settings'].keys() - names)}"
    if problem is None and names - state["settings"].keys():
        problem = f"missing settings {sorted(names - state['settings'].keys())}"
    if problem is not None:
        raise ValueError(f"--resume: {path} is damaged: {problem}")
    check_settings(state["settings"], label=lambda key: f"--resume: {path} is damaged: settings.{key}")
    return state


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line that is no entry, such as one cut short by a kill."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return math.inf
    return entry["step"] if isinstance(entry, dict) and is_int(entry.get("step")) else math.inf


def learning_rate(step: int, s: Settings) -> float:
    """nanoGPT's schedule: linear warmup to lr, cosine decay to min_lr at lr_decay_steps, then min_lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    if step >= s.lr_decay_steps:
        return s.min_lr
    progress = (step - s.warmup_steps) / max(s.lr_decay_steps - s.warmup_steps, 1)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def training_bytes(config, s: Settings, shards: int) -> int:
    """A lower bound on one process's memory: float32 weights, gradients and AdamW's two moments (FSDP shards them
    over processes), and of one micro batch, in at least 2 bytes each: the logits, and the keys and values that
    cross-batch attention gathers from d other rows in each memory layer. Other activations come on top."""
    tokens, kv_width = s.batch_size * s.seq_len, config.num_key_value_heads * config.head_dim
    cross_batch = 2 * tokens * s.cross_batch_range * kv_width * len(config.mem_layers)
    return 16 * config.num_parameters // shards + 2 * tokens * config.vocab_size + 2 * cross_batch


def check_out(out: Path):
    """OUT is a directory, or can become one: found now rather than after a tokenizer has been trained."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def masked_cross_entropy(logits, targets, mask):
    """Mean next-token loss over the targets whose mask is 1 (prompt tokens have 0)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------------
# The run


def resolve_settings(argv) -> tuple[Settings, Optional[dict], Path, list[int]]:
    """The run's settings, checked: the command line's, or for --resume the saved run's with the changes it allows.
    Also the saved train_state.json (None for a new run), OUT, and the eval's memory sizes."""
    s, explicit = parse_settings(argv)
    out = Path(s.out)
    check_out(out)
    state = None
    if s.resume:
        state = read_train_state(out)
        saved = Settings(**state["settings"])
        for name, value in explicit.items():
            if name not in CHANGEABLE_ON_RESUME and value != getattr(saved, name):
                raise ValueError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                                 f"{getattr(saved, name)} ({out / 'train_state.json'})")
        s = Settings(**{**asdict(saved), **{k: v for k, v in explicit.items() if k in CHANGEABLE_ON_RESUME}})
    check_settings(asdict(s))
    if s.batch_size % s.packing:
        raise ValueError(f"--batch-size {s.batch_size} must be divisible by --packing {s.packing}")
    memory_sizes = sorted(set(int_list(s.eval_memory, "eval-memory")))
    if not memory_sizes or min(memory_sizes) < 0:
        raise ValueError("--eval-memory: expected non-negative numbers of windows, e.g. 0,1,3,7")
    s.lr_decay_steps = s.lr_decay_steps or s.max_steps  # resolved once, so that a resumed run keeps the schedule
    return s, state, out, memory_sizes


class Cluster(NamedTuple):
    """This process's place in the run: torchrun's rank and world size (0 and 1 without torchrun), its device."""
    distributed: bool
    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(s: Settings, state: Optional[dict]) -> Cluster:
    """torchrun sets RANK; each rank has its own batch slots, so cross-batch attention stays within a rank's batch.
    The process group is joined later (join_process_group), once the input has been checked."""
    global QUIET
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    elif s.fsdp:
        raise ValueError("--fsdp shards over processes: run under torchrun")
    device = longllama.resolve_device(s.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", local_rank)
    QUIET = rank != 0
    if state is not None and state["world_size"] != world_size:
        raise ValueError(f"--resume: the run used {state['world_size']} processes, this one {world_size}")
    return Cluster(distributed, rank, world_size, device)


def join_process_group(cluster: Cluster):
    """torchrun's process group: nccl on GPU, gloo on CPU; nothing without torchrun."""
    if cluster.distributed:
        dist.init_process_group("nccl" if cluster.device.type == "cuda" else "gloo")
        if cluster.device.type == "cuda":
            torch.cuda.set_device(cluster.device)


class ModelPlan(NamedTuple):
    """The model to build and its tokenizer, before either is read."""
    config: longllama.LongLlamaConfig
    checkpoint: Optional[Path]  # the model is loaded from here (OUT or --init), else built from config
    overrides: dict  # what changes the checkpoint's config (--mem-layers)
    tokenizer_path: Path
    train_tokenizer: bool  # there is none yet: train one into tokenizer_path


def plan_model(s: Settings, out: Path, cluster: Cluster) -> ModelPlan:
    """The model config and tokenizer of the run, checked (window, files, memory) before anything is written."""
    mem_layers = int_list(s.mem_layers, "mem-layers") if s.mem_layers else None
    overrides = {} if mem_layers is None else dict(mem_layers=mem_layers)
    if s.resume:
        checkpoint, overrides = out, {}  # the run's own config.json has its mem_layers already
        tokenizer_path = tokenizer_file(out) or out / "tokenizer.model"
    elif s.init:
        checkpoint = Path(s.init)
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"--init {s.init}: not a checkpoint directory (no config.json)")
        tokenizer_path = Path(s.tokenizer) if s.tokenizer else tokenizer_file(s.init) or checkpoint / "tokenizer.model"
    else:
        checkpoint = None
        tokenizer_path = Path(s.tokenizer) if s.tokenizer else out / "tokenizer.model"
    if checkpoint is not None:
        config = longllama.LongLlamaConfig.from_json(checkpoint / "config.json", **overrides)
        if config.quantization:  # the packed kernels have no backward, and a trained model is saved unquantized
            raise ValueError(f"--init {checkpoint} holds {config.quantization} weights: train from the unquantized "
                             "checkpoint")
    else:
        config = longllama.LongLlamaConfig(**{**longllama.PRESETS[s.preset], **overrides})
    window = config.max_position_embeddings
    if s.seq_len > window:
        raise ValueError(f"--seq-len {s.seq_len} is longer than the model window {window}")
    must_train_tokenizer = not (s.resume or s.tokenizer or s.init or tokenizer_path.is_file())
    if not must_train_tokenizer and not tokenizer_path.is_file():
        raise ValueError(f"tokenizer {tokenizer_path} does not exist (pass --tokenizer)")
    # refused now rather than killed later; a preset's vocabulary comes from a tokenizer not read yet: the smallest
    vocab_size = config.vocab_size if s.resume or s.init else MIN_VOCAB_SIZE
    needed = training_bytes(replace(config, vocab_size=vocab_size), s, cluster.world_size if s.fsdp else 1)
    available = longllama.available_bytes(cluster.device)
    if needed > available:
        raise ValueError(f"this run needs at least {needed / 2**30:.1f} GiB on {cluster.device} (weights, gradients, "
                         f"optimizer state, logits and cross-batch keys of {s.batch_size} x {s.seq_len} tokens); "
                         f"{available / 2**30:.1f} GiB are free")
    return ModelPlan(config, checkpoint, overrides, tokenizer_path, must_train_tokenizer)


def find_documents(s: Settings, world_size: int) -> tuple[list, list]:
    """(training documents, eval documents): --data or the stdlib corpus, split by --eval-data or --holdout."""
    documents = scan_paths(s.data) if s.data else stdlib_documents()
    if s.eval_data:
        train_documents, eval_documents = documents, scan_paths(s.eval_data)
    else:
        train_documents, eval_documents = split_held_out(documents, s.holdout)
        if not train_documents:
            warn("every document is held out: training on all, no eval")
            train_documents, eval_documents = documents, []
    if len(train_documents) < world_size:
        raise ValueError(f"{len(train_documents)} training documents cannot be shared by {world_size} processes")
    return train_documents, eval_documents


def prepare_tokenizer(s: Settings, plan: ModelPlan, train_documents: list, cluster: Cluster):
    """The run's tokenizer; when there is none yet, rank 0 trains it on the training documents first."""
    if plan.train_tokenizer:
        if cluster.master:
            print(f"training a {s.vocab_size}-piece tokenizer on {len(train_documents)} documents -> "
                  f"{plan.tokenizer_path}")
            trained = train_tokenizer((prompt + text for prompt, text in map(read_document, train_documents)),
                                      plan.tokenizer_path, vocab_size=s.vocab_size, seed=s.seed)
            if trained.vocab_size < s.vocab_size:
                warn(f"the tokenizer has {trained.vocab_size} pieces, not the {s.vocab_size} of --vocab-size: "
                     "the corpus is too small for more")
        if cluster.distributed:
            dist.barrier()
    elif cluster.master and not s.resume and not s.tokenizer and not s.init:
        print(f"using the tokenizer cached in {plan.tokenizer_path} (delete it to train a new one)")
    return open_tokenizer(plan.tokenizer_path)


def build_model(s: Settings, plan: ModelPlan, tokenizer, cluster: Cluster) -> tuple[torch.nn.Module,
                                                                                 longllama.LongLlama]:
    """(the model to call, the LongLlama whose parameters the optimizer holds): fp32 weights on the device (bf16
    autocast on GPU); the first is the second wrapped for DDP, or the second itself, sharded in place by FSDP."""
    torch.manual_seed(s.seed)  # a new model's weights are the seed's
    if plan.checkpoint is not None:
        model = longllama.load(plan.checkpoint, **plan.overrides)
    else:
        config = plan.config
        config.vocab_size = tokenizer.vocab_size
        config.bos_token_id, config.eos_token_id, config.pad_token_id = (
            tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        model = longllama.LongLlama(config)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {plan.tokenizer_path} has {tokenizer.vocab_size} pieces, the model "
                         f"only {model.config.vocab_size}")
    model.to(cluster.device).train()
    model.activation_checkpointing = s.activation_checkpointing
    raw_model = model
    if s.fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:  # one all-gather per block, freed after it
            fully_shard(block)
        fully_shard(model)
    elif cluster.distributed:
        device_ids = [cluster.device.index] if cluster.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, raw_model


def build_optimizer(s: Settings, raw_model, device) -> torch.optim.AdamW:
    """AdamW over the parameters the model holds (FSDP: this rank's shards); fused on GPU."""
    decay = [p for p in raw_model.parameters() if p.dim() >= 2]  # weight decay on matrices only
    no_decay = [p for p in raw_model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=s.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def optimizer_state_problem(saved, raw_model, optimizer) -> Optional[str]:
    """Why saved, a full optimizer state dict (keyed by parameter name), is not AdamW state for these parameters;
    None when it is. set_optimizer_state_dict takes an empty or partial state without a word and AdamW starts over."""
    if not isinstance(saved, dict):
        return "it is not an optimizer state dict"
    state, groups = saved.get("state"), saved.get("param_groups")
    if not state:
        return "it is empty: AdamW would start over"
    if not isinstance(state, dict) or not isinstance(groups, list):
        return "it is not an optimizer state dict"
    if len(groups) != len(optimizer.param_groups):
        return f"it has {len(groups)} parameter group(s), this run's optimizer {len(optimizer.param_groups)}"
    names = {p: name for name, p in raw_model.named_parameters()}
    shapes = {names[p]: p.shape for group in optimizer.param_groups for p in group["params"]}  # FSDP: full shapes
    if len(state) != len(shapes):
        return f"it belongs to another model: it holds the state of {len(state)} parameters, this model {len(shapes)}"
    stranger = next((name for name in state if name not in shapes), None)
    if stranger is not None:
        return f"it belongs to another model: this model has no parameter {stranger}"
    for name, shape in shapes.items():
        entry = state[name]
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), torch.Tensor) for key in ADAMW_STATE):
            return f"it has no {', '.join(ADAMW_STATE)} for {name}"
        for key in ("exp_avg", "exp_avg_sq"):
            if entry[key].shape != shape:
                return (f"it belongs to another model: {name}'s {key} is {list(entry[key].shape)}, "
                        f"the parameter {list(shape)}")
    return None


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")  # what AdamW keeps for each parameter


def restore(out: Path, state: Optional[dict], raw_model, optimizer, batches: Batches, rank: int) -> tuple[int, int]:
    """(step, tokens seen) of a resumed run, its optimizer state and pipeline restored; (0, 0) for a new run."""
    if state is None:
        return 0, 0
    path = out / "optimizer.pt"
    try:
        optimizer_state = torch.load(path, weights_only=True)  # builds tensors only, never runs pickled code
        problem = optimizer_state_problem(optimizer_state, raw_model, optimizer)
        if problem is None:
            set_optimizer_state_dict(raw_model, optimizer, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
    except pickle.UnpicklingError:  # damaged, or it would run code: weights_only refuses both
        raise ValueError(f"--resume: {path} is not a file of plain tensors") from None
    except Exception as e:  # a damaged or foreign file fails in many ways: EOFError, KeyError, RuntimeError, ...
        problem = (str(e).strip() or type(e).__name__).splitlines()[0]
    if problem is not None:
        raise ValueError(f"--resume: {path} does not hold this run's optimizer state ({problem})")
    batches.load_state_dict(state["pipeline"][rank])
    return state["step"], state["tokens"]


def held_out_spans(s: Settings, documents: list, tokenizer, window: int, memory_sizes) -> Optional[torch.Tensor]:
    """The eval's spans (eval_spans); None when there is no eval."""
    if not s.eval_every:
        return None
    spans = eval_spans(documents, tokenizer, window, memory_sizes, s.eval_spans)
    if len(spans) == 0:
        warn(f"no eval: no held-out document has {(max(memory_sizes) + 1) * window + 1} tokens")
        return None
    return spans


def start_log(path: Path, resume: bool, step: int):
    """A resumed run continues the log from its checkpoint: lines an interrupted run wrote later are dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text(errors="replace").splitlines() if resume and path.exists() else []
    kept = "".join(line + "\n" for line in lines if logged_step(line) <= step)
    longllama.write_atomically({path: lambda p: p.write_text(kept)})


def append_log(path: Path, **entry):
    """One line of log.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv=None):
    s, state, out, memory_sizes = resolve_settings(argv)
    cluster = setup_distributed(s, state)
    plan = plan_model(s, out, cluster)
    train_documents, eval_documents = find_documents(s, cluster.world_size)
    join_process_group(cluster)
    tokenizer = prepare_tokenizer(s, plan, train_documents, cluster)
    # added after the tokenizer is trained (their filler would only crowd its sample) and never held out: they
    # teach the use of memory, the eval measures it on real text
    if s.passkey_docs:
        train_documents += passkey_documents(s.passkey_docs, s.seed, s.seq_len, tokenizer, s.passkey_layout,
                                             tuple(train_documents))
    model, raw_model = build_model(s, plan, tokenizer, cluster)
    config, device, master = raw_model.config, cluster.device, cluster.master
    window = config.max_position_embeddings
    optimizer = build_optimizer(s, raw_model, device)
    batches = Batches(train_documents, tokenizer, s.batch_size, s.seq_len, s.packing, s.seed, cluster.rank,
                      cluster.world_size)
    step, tokens_seen = restore(out, state, raw_model, optimizer, batches, cluster.rank)
    if s.compile:
        model = torch.compile(model)
    autocast = autocast_for(device)
    spans = held_out_spans(s, eval_documents, tokenizer, window, memory_sizes)
    log_path = out / "log.jsonl"
    if master:
        start_log(log_path, s.resume, step)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{'resuming at step ' + str(step) if s.resume else 'training'}: {n_params / 1e6:.2f}M parameters, "
              f"mem_layers {config.mem_layers}, {len(train_documents)} training documents, "
              f"batch {s.batch_size}x{s.seq_len} x{s.grad_accum} accum x{cluster.world_size} processes, "
              f"d={s.cross_batch_range} k={s.packing}{' stepping' if s.stepping else ''}, device {device}")

    def checkpoint():
        full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(raw_model, options=full_state)  # gathered on rank 0 (a collective)
        optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=full_state)
        pipeline = [None] * cluster.world_size
        if cluster.distributed:
            dist.all_gather_object(pipeline, batches.state_dict())
        else:
            pipeline = [batches.state_dict()]
        if master:
            train_state = dict(step=step, tokens=tokens_seen, world_size=cluster.world_size, pipeline=pipeline,
                               settings=asdict(s))
            save_checkpoint(out, config, model_state, optimizer_state, train_state, tokenizer)

    def run_eval():
        ppl = evaluate(raw_model, spans, window, memory_sizes, s.eval_batch_size, device, autocast)
        if master:
            append_log(log_path, step=step, eval_ppl=ppl)
            tqdm.write(f"step {step}: held-out perplexity with " + ", ".join(f"{m}: {p:.2f}" for m, p in ppl.items())
                       + " windows in memory")
        return ppl

    # the loop: batch, forward, backward (accumulating), clip, step, log, eval, checkpoint
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * cluster.world_size
    bar = tqdm(total=s.max_steps, initial=step, desc="train", unit="step", disable=not master, dynamic_ncols=True)
    started, start_tokens, first_loss, loss, ppl = time.time(), tokens_seen, None, float("nan"), None
    interval_seconds, interval_tokens = 0.0, 0  # training time only: eval and checkpoints do not count
    while step < s.max_steps:
        step_started = time.time()
        lr = learning_rate(step, s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro_step in range(s.grad_accum):
            inputs, targets, mask = (t.to(device, non_blocking=True) for t in batches.next())
            last = micro_step == s.grad_accum - 1
            if s.fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if cluster.distributed and not s.fsdp and not last else contextlib.nullcontext()
            with sync:  # gradients are all-reduced once, at the last micro step
                with autocast:
                    logits, _ = model(inputs, cross_batch_range=s.cross_batch_range, stepping=s.stepping,
                                      packing=s.packing)
                    micro_loss = masked_cross_entropy(logits, targets, mask)
                (micro_loss / s.grad_accum).backward()
            step_loss += micro_loss.detach() / s.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), s.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval_tokens += tokens_per_step
        if cluster.distributed:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        loss = step_loss.item()
        first_loss = loss if first_loss is None else first_loss
        interval_seconds += time.time() - step_started
        tokens_per_s = interval_tokens / interval_seconds
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
        if master and (step % s.log_every == 0 or step == s.max_steps):
            append_log(log_path, step=step, loss=loss, lr=lr, tokens_per_s=tokens_per_s, grad_norm=float(grad_norm),
                       tokens=tokens_seen)
            interval_seconds, interval_tokens = 0.0, 0
        if spans is not None and (step % s.eval_every == 0 or step == s.max_steps):
            ppl = run_eval()
        if step % s.save_every == 0 or step == s.max_steps:
            checkpoint()
    bar.close()
    if step == 0:  # --max-steps 0: still leave a checkpoint
        checkpoint()
    if master and first_loss is None and s.resume:
        print(f"done: the run in {out} had already reached step {step} of {s.max_steps}")
    elif master:
        elapsed = time.time() - started
        summary = [f"done: {step} steps", f"{tokens_seen / 1e6:.2f}M tokens",
                   f"loss {first_loss if first_loss is not None else float('nan'):.3f} -> {loss:.3f}"]
        if ppl:
            summary.append("eval ppl with " + " / ".join(ppl) + " windows in memory: "
                           + " / ".join(f"{p:.2f}" for p in ppl.values()))
        summary += [f"{elapsed:.0f} s ({(tokens_seen - start_tokens) / elapsed:.0f} tokens/s overall)",
                    f"checkpoint {out}"]
        print(", ".join(summary))


def shut_down_distributed():
    """Leave the process group so that the process can exit without hanging.

    Gloo's worker threads release the tensors of a finished collective (all_gather_object's, say) after the
    caller has moved on, and releasing a tensor Python has dropped takes the GIL. The process group's own
    destructor joins those threads with the GIL released; DDP's Reducer, which holds the group too, destroys it
    with the GIL held, and if it holds the last reference the join waits for a thread that waits for the GIL.
    So the Reducer (the DDP model, and any traceback frame holding it) must be gone while the group is still
    registered, and the group is destroyed last.
    """
    if dist.is_initialized():
        gc.collect()  # the DDP model of a finished (or failed) main(), should a reference cycle still hold it
        dist.destroy_process_group()


def cli(argv=None) -> int:
    """Run main() as a command: bad input and interrupts end with one line on stderr, never a traceback."""
    status, message = 0, None
    with warnings.catch_warnings():  # warnings (unknown keys in a config.json, say) as one plain line each
        warnings.showwarning = lambda warning, *_: warn(warning)
        try:
            main(argv)
        except (ValueError, OSError) as e:  # bad input, or a disk that is full or not ours to write
            status, message = 1, f"error: {e}"
        except torch.OutOfMemoryError:
            status, message = 1, ("error: out of GPU memory: try a smaller --batch-size or --seq-len, or "
                                  "--activation-checkpointing")
        except KeyboardInterrupt:  # the last complete checkpoint in OUT stays as it was; --resume continues it
            status, message = 130, "interrupted"
    # after the except blocks, so that no traceback still holds main()'s DDP model, and its progress bar has closed
    shut_down_distributed()
    if message:
        print(message, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(cli())
