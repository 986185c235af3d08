"""Training documents: where they are, synthetic passkey documents, and the document-aware pipeline that cuts
them into FoT's batches.

FoT's part is `Batches`, the document-aware pipeline. Every batch slot reads one document at a time (documents
joined by EOS BOS when a slot moves on to its next one); with packing k a slot is k consecutive rows, so a
document's earlier pieces sit in the rows just before it: the positives that cross-batch attention
(longllama.cross_batch_attention) shows the memory layers, while the other documents of the batch are the
negatives. Documents are shuffled (seeded) anew every epoch, each rank reads its own share, and the pipeline state
is a few numbers per slot, so a resumed run sees exactly the batches an uninterrupted run would.

Documents (`find_documents`): JSONL files of {"text": ...} or {"prompt": ..., "completion": ...} records (prompt
tokens get no loss), plain text files (one document each), or directories of them, read when needed. Documents
whose stable name hash falls in the holdout percent are the eval set. Without data files the corpus is the Python
standard library this interpreter runs on (sysconfig "stdlib"): every .py file except test suites (test/, tests/,
idle_test/, test_*.py), site-packages, and trees that are applications, bundles or generated tables rather than
library code (idlelib, turtledemo, lib2to3, ensurepip, pydoc_data, encodings, lib-dynload, config-*). The files of
one top-level package form one document, each file after a "# file: PATH" line (a module outside a package is a
document of its own): on CPython 3.11, 193 documents of 451 files, 8.8 MB; a holdout of 5 percent holds out
_markupbase, ast, hashlib, hmac and sre_compile.

Passkey documents (`passkey_documents`): synthetic, generated when read, made of the sentences of passkey.py's
prompts, with the answer a training row or more after the passkey, so that cross-batch attention is what learns it.
The "chat" layout asks and answers in a chat model's own template, so that the model keeps following it.
"""

import hashlib
import json
import os
import random
import sysconfig
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from cli import warn
from tokenizer import encode_with_specials, utf8_text


# ----------------------------------------------------------------------------------------------------------------------
# Documents: where each one is (read on demand, so a large corpus costs no memory)


class Document(NamedTuple):
    name: str  # "notes.txt", "data.jsonl:12" or a stdlib package: for messages and the held-out hash
    files: tuple  # the file it is read from, or the files of a stdlib package (concatenated)
    offset: int = -1  # JSONL: byte offset of its line in files[0]
    root: str = ""  # stdlib packages: each file is preceded by "# file: PATH" relative to this
    passkey: tuple = ()  # a synthetic passkey document: (seed, training window, layout, haystacks, ChatFrame or None)


def read_document(doc: Document) -> tuple[str, str]:
    """(prompt, text): prompt is "" except for {"prompt", "completion"} records."""
    if doc.passkey:
        seed, window, layout, haystacks, chat = doc.passkey
        return "", training_document(random.Random(seed), window, haystacks, layout, chat)
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


def is_held_out(doc: Document, percent: float) -> bool:
    """A stable choice (the same on every machine and Python): a hash of the document's name."""
    return int(hashlib.sha1(doc.name.encode()).hexdigest(), 16) % 10000 < percent * 100


def split_held_out(documents, percent: float) -> tuple[list, list]:
    """(training documents, held-out documents), by is_held_out."""
    held_out = [is_held_out(doc, percent) for doc in documents]
    return ([doc for doc, out in zip(documents, held_out) if not out],
            [doc for doc, out in zip(documents, held_out) if out])


def find_documents(data: list, eval_data: list, holdout: float, processes: int = 1) -> tuple[list, list]:
    """(training documents, eval documents): those under `data` (default: the stdlib corpus), and those under
    `eval_data` or else the `holdout` percent of them; refused when there are fewer than the processes sharing them."""
    documents = scan_paths(data) if data else stdlib_documents()
    if eval_data:
        train_documents, eval_documents = documents, scan_paths(eval_data)
    else:
        train_documents, eval_documents = split_held_out(documents, holdout)
        if not train_documents:
            warn("every document is held out: training on all, no eval")
            train_documents, eval_documents = documents, []
    if len(train_documents) < processes:
        raise ValueError(f"{len(train_documents)} training documents cannot be shared by {processes} processes")
    return train_documents, eval_documents


def tokenize(doc: Document, tokenizer) -> tuple[list, list]:
    """BOS + tokens + EOS and the loss mask of each token as a target (0 for a prompt); ([], []) when empty."""
    prompt, text = read_document(doc)
    if doc.passkey and doc.passkey[2] == "chat":  # the chat template writes its own BOS and EOS
        tokens = encode_with_specials(tokenizer, text, doc.passkey[4].specials)
        mask = [1] * len(tokens)
    elif prompt:
        prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
        text_ids = tokenizer.encode(text, bos=False, eos=True)
        tokens, mask = prompt_ids + text_ids, [0] * len(prompt_ids) + [1] * len(text_ids)
    else:
        tokens = tokenizer.encode(text, bos=True, eos=True)
        mask = [1] * len(tokens)
    return (tokens, mask) if len(tokens) > 2 else ([], [])  # nothing but BOS and EOS: shorter than one token


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic passkey documents: the sentences of passkey.py's prompts, with the answers a training row or more away


TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ASK, REPLY = "What is the pass key?", "The pass key is"
QUESTION = f"{ASK} {REPLY}"
MAX_PASSKEY = 50000
LAYOUTS = ("far", "near", "decoy", "chat")  # training documents (training_document)
TRAINING_QUESTIONS = 4  # per "far" or "decoy" training document
TRAINING_GAP_WINDOWS = 3  # longest haystack gap before a question of a "far" training document, in training windows

# Decoys: keys said exactly as the pass key is, under names that share its words. Only the name tells a decoy
# line from the passkey line, so retrieving the passkey among many decoys needs keys that stay distinguishable.
DECOYS = ("pass code", "door key", "pass word", "car key", "key code", "gate key", "pass card", "house key",
          "bus pass", "safe code", "lock code", "room key", "key card", "pass phrase", "desk key", "box code")


class ChatFrame(NamedTuple):
    """A chat template around one exchange: head + the user's message + middle + question + tail + the reply + end.
    specials: (text, id) pairs of the special tokens the template writes as text."""
    head: str
    middle: str
    tail: str
    end: str
    specials: tuple


def passkey_line(passkey: int) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def decoy_line(decoy: str, number: int) -> str:
    return passkey_line(number).replace("pass key", decoy)


class Haystack:
    """The text a passkey hides in: units (LongLLaMA's filler block, or the lines of a file) taken in turn, from
    any unit on and round again, as many as a length in tokens needs. A unit's cost in tokens is measured the
    first time it is used."""

    def __init__(self, tokenizer, units: list[str], separator: str, name: str):
        if not units:
            raise ValueError(f"haystack {name} has no text")
        self.tokenizer, self.units, self.separator, self.name = tokenizer, units, separator, name
        self._costs = {}

    @classmethod
    def filler(cls, tokenizer) -> "Haystack":
        return cls(tokenizer, [FILLER], " ", "filler")

    @classmethod
    def from_text(cls, tokenizer, text: str, name: str) -> "Haystack":
        """A haystack of the text's non-blank lines (numbers in it stay: they are distractors the filler lacks)."""
        return cls(tokenizer, [line for line in text.splitlines() if line.strip()], "\n", name)

    def cost(self, unit: int) -> int:
        """Tokens the unit adds after another one (as it does inside a prompt, where tokens may merge across the
        separator)."""
        if unit not in self._costs:
            text, encode = self.units[unit], lambda s: len(self.tokenizer.encode(s, bos=False))
            self._costs[unit] = encode(text + self.separator + text) - encode(text)
        return self._costs[unit]

    def take(self, tokens: int, start: int = 0) -> list[int]:
        """Unit indices from `start` on whose costs add up to the nearest total to `tokens`."""
        taken, total = [], 0
        while True:
            unit = (start + len(taken)) % len(self.units)
            if total + self.cost(unit) / 2 > tokens:
                return taken
            taken.append(unit)
            total += self.cost(unit)

    def text(self, units: list[int]) -> str:
        return self.separator.join(self.units[i] for i in units)

    def piece(self, rng: random.Random, tokens: int) -> str:
        """About `tokens` tokens of haystack from a random place (training documents)."""
        return self.text(self.take(tokens, rng.randrange(len(self.units))))


def training_document(rng: random.Random, window: int, haystacks: list, layout: str = "far",
                      chat: Optional[ChatFrame] = None) -> str:
    """A passkey document for training, its haystack drawn from `haystacks`, in one of four layouts:

    - "near": 3-8 passkeys, each asked for once or twice after at most half a window of haystack: the copy itself,
      learned inside the local window (a base model's lesson, no memory needed);
    - "far": one passkey, then TRAINING_QUESTIONS questions, each after a gap of 0 to TRAINING_GAP_WINDOWS windows
      of haystack, the last at least one window long. Short gaps keep the copy practised inside the local window;
      gaps of a window or more put the passkey's last mention in an earlier training row, where only cross-batch
      attention reaches it: a curriculum of distances in every document;
    - "decoy": as "far", with 2-6 decoy lines (DECOYS: other keys said the same way) around the passkey line, so
      that the copy must tell the pass key from keys that look like it;
    - "chat": one exchange in the chat template `chat`: the user's message is the task, haystack, the passkey line
      and one to TRAINING_GAP_WINDOWS windows of haystack, then the question; the reply gives the pass key.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"a training document's layout is one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "chat" and chat is None:
        raise ValueError("a chat training document needs a chat template: the model's tokenizer_config.json has none")
    haystack = rng.choice(haystacks)
    lines = [TASK]
    if layout == "near":
        for _ in range(rng.randint(3, 8)):
            passkey = rng.randint(1, MAX_PASSKEY)
            lines += [haystack.piece(rng, rng.randint(0, window // 4)), passkey_line(passkey)]
            for _ in range(rng.randint(1, 2)):
                lines += [haystack.piece(rng, rng.randint(0, window // 2)), f"{QUESTION} {passkey}."]
        return "\n".join(lines)
    passkey = rng.randint(1, MAX_PASSKEY)
    if layout == "chat":
        lines += [haystack.piece(rng, rng.randint(0, window)), passkey_line(passkey),
                  haystack.piece(rng, rng.randint(window, TRAINING_GAP_WINDOWS * window))]
        return chat.head + "\n".join(lines) + chat.middle + ASK + chat.tail + f"{REPLY} {passkey}." + chat.end
    said = [passkey_line(passkey)]
    if layout == "decoy":
        said += decoy_lines(rng, rng.randint(2, 6))
        rng.shuffle(said)
    for line in said:
        lines += [haystack.piece(rng, rng.randint(0, window // len(said))), line]
    for i in range(TRAINING_QUESTIONS):
        shortest = window if i == TRAINING_QUESTIONS - 1 else 0
        lines += [haystack.piece(rng, rng.randint(shortest, TRAINING_GAP_WINDOWS * window)), f"{QUESTION} {passkey}."]
    return "\n".join(lines)


def decoy_lines(rng: random.Random, count: int) -> list[str]:
    return [decoy_line(decoy, rng.randint(1, MAX_PASSKEY)) for decoy in rng.sample(DECOYS, count)]


HAYSTACK_DOCUMENTS = 32  # corpus documents whose lines passkey documents may hide their passkeys in


def passkey_documents(count: int, seed: int, window: int, tokenizer, layout: str = "far",
                      corpus: tuple = (), chat: Optional[ChatFrame] = None) -> list[Document]:
    """Synthetic passkey documents, each generated from its own seed when read (they cost no disk), in the
    comma-separated layouts taken in turn.

    Each draws its haystack at random: LongLLaMA's filler or (when corpus documents are given) the lines of up to
    HAYSTACK_DOCUMENTS of them, so that retrieval does not hang on one filler sentence."""
    haystacks = [Haystack.filler(tokenizer)]
    if corpus:
        sample = random.Random(seed).sample(list(corpus), min(HAYSTACK_DOCUMENTS, len(corpus)))
        haystacks.append(Haystack.from_text(tokenizer, "\n".join(read_document(d)[1] for d in sample), "corpus"))
    layouts = layout.split(",")
    return [Document(f"passkey {i}", (), passkey=(f"passkey {seed} {i}", window, layouts[i % len(layouts)],
                                                  tuple(haystacks), chat))
            for i in range(count)]


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
