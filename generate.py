"""Read long documents into memory once, then continue them or answer questions about them, streaming to stdout.

    python generate.py --ckpt DIR --prompt-file long.txt --max-new-tokens 200                  # continue a text
    python generate.py --ckpt DIR --prompt-file paper.txt --template instruct \\
        --question "What is the paper about?" --question "Who wrote it?"     # read once, answer each question
    python generate.py --ckpt DIR --prompt-file paper.txt --save-memory paper.mem --interactive   # questions on stdin
    python generate.py --ckpt DIR --load-memory paper.mem --question "..."     # a later run: no reading again
    python generate.py --ckpt DIR --prompt-file a.txt --prompt-file b.txt --question "..."     # a batch

How FoT shows up here: `prefill` reads a document. All but its last `last_context_length` tokens are read window by
window (W = max_position_embeddings tokens each) into the memory of the memory layers, with a progress bar on
stderr; the last tokens stay in every layer's local cache. Each question starts from a copy of that cache
(`Cache.copy`), so answers never see each other; `decode_one_token` then runs one token at a time: it attends to
the local cache and, in memory layers, to the whole memory. When the local cache is full, it moves into memory as a
whole (longllama.LongLlama._evict). A memory file is the cache after the document, in safetensors, with a
fingerprint of everything that shaped it. Stats lines go to stderr.
"""

import argparse
import hashlib
import importlib
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import checkpoint
import checks
import longllama
from checkpoint import available_bytes
from cli import (add_memory_arguments, add_quantize_argument, as_command, checkpoint_directory, checkpoint_inputs,
                 default_dtype, fail, int_flag, load_checkpoint, memory_overrides, refuse_writing_over)
from quantize import named_weights
from tokenizer import encode_with_specials, read_chat_template, render_chat, utf8_text


# ----------------------------------------------------------------------------------------------------------------------
# Prompt formats: the text the model reads for a document, and for each question about it


@dataclass(frozen=True)
class PromptFormat:
    """`head + document` is read once; `middle + question + tail` is read for each question, after it.

    A chat template writes special tokens as text (its bos_token, eos_token): `specials` maps those texts to ids.
    """

    name: str = "none"
    head: str = ""
    middle: str = ""
    tail: str = ""
    bos: bool = True  # BOS in front of the document (a chat template writes its own)
    specials: tuple = ()  # (text, token id) pairs

    def document_ids(self, tokenizer, document: str) -> list[int]:
        return [tokenizer.bos_id] * self.bos + self._encode(tokenizer, self.head + document)

    def question_ids(self, tokenizer, question: str) -> list[int]:
        return self._encode(tokenizer, self.middle + question + self.tail)

    def _encode(self, tokenizer, text: str) -> list[int]:
        return encode_with_specials(tokenizer, text, self.specials)


# LongLLaMA-Instruct's question answering prompt: the system line of its OpenOrca tuning, then the document, then
# the question.
INSTRUCT = PromptFormat(
    "instruct",
    head="You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as "
         "you can.\n",
    middle="\nAnswer the following question briefly using information from the text above.\nQuestion: ",
    tail="\nAnswer: ")

# Placeholders the chat template is rendered around: NUL characters, which no template writes.
DOCUMENT_SLOT, QUESTION_SLOT = "\0document\0", "\0question\0"


def chat_format(ckpt_dir, tokenizer) -> PromptFormat:
    """The checkpoint's own chat template, for one user message: the document, a blank line, the question."""
    path = Path(ckpt_dir) / "tokenizer_config.json"
    if not path.is_file():
        raise ValueError(f"--template chat: {ckpt_dir} has no tokenizer_config.json with a chat_template")
    template, bos_token, eos_token = read_chat_template(path)
    message = {"role": "user", "content": f"{DOCUMENT_SLOT}\n\n{QUESTION_SLOT}"}
    rendered = render_chat(template, [message], bos_token, eos_token)
    parts = re.split(f"{DOCUMENT_SLOT}|{QUESTION_SLOT}", rendered)
    if len(parts) != 3 or rendered != parts[0] + DOCUMENT_SLOT + parts[1] + QUESTION_SLOT + parts[2]:
        raise ValueError(f"{path}: the chat template does not write the user's message as it is given")
    specials = tuple((text, token) for text, token in ((bos_token, tokenizer.bos_id), (eos_token, tokenizer.eos_id))
                     if text)
    return PromptFormat("chat", *parts, bos=False, specials=specials)


def prompt_format(name: str, ckpt_dir=None, tokenizer=None) -> PromptFormat:
    """"none" (the document, then the question), "instruct" (INSTRUCT) or "chat" (the checkpoint's chat template)."""
    return chat_format(ckpt_dir, tokenizer) if name == "chat" else {"none": PromptFormat(), "instruct": INSTRUCT}[name]


# ----------------------------------------------------------------------------------------------------------------------
# Reading documents once


@dataclass
class Documents:
    """Documents read once, side by side: the cache after their last token, the logits of the token after it, and
    the tokens themselves (the context of a continuation, and what --echo prints)."""

    cache: longllama.Cache
    logits: torch.Tensor  # [B, V]
    ids: torch.Tensor  # [B, L] as laid out side by side
    mask: torch.Tensor  # [B, L] bool: a real token (False: padding)
    template: PromptFormat

    def tokens(self, row: int) -> list[int]:
        return self.ids[row][self.mask[row]].tolist()

    def stats_line(self, seconds: float, how: str) -> str:
        batch_size, tokens = self.ids.shape[0], int(self.mask.sum())
        memory_bytes = sum(t.nbytes for memory in self.cache.memory.values() for t in memory.view()[:2])
        rate = f" ({tokens / max(seconds, 1e-9):.0f} tok/s)" if how == "read" else ""
        return (f"{'document' if batch_size == 1 else f'{batch_size} documents'} {tokens} tokens | memory "
                f"{self.cache.memory_size} entries, {memory_bytes / 2**20:.1f} MiB | {how} in {seconds:.2f} s{rate}")


def read(model, tokenizer, document, template: PromptFormat = PromptFormat(), progress: bool = False) -> Documents:
    """Read a document (str), or several side by side (a list of str), into memory and local cache, once.

    Refused up front when its memory would not fit in the free memory, rather than killed halfway through reading.
    """
    texts = [document] if isinstance(document, str) else list(document)
    if not texts:
        raise ValueError("no document to read")
    documents = [template.document_ids(tokenizer, text) for text in texts]
    check_memory(model, list(map(len, documents)))
    device = model.embed.weight.device
    ids, mask, last_context_length = side_by_side(documents, model.config.max_position_embeddings,
                                                  model.config.last_context_length)
    ids, mask = ids.to(device), mask.to(device)
    logits, cache = prefill(model, ids, attention_mask=mask, last_context_length=last_context_length,
                            progress=progress)
    return Documents(cache, logits, ids, mask, template)


def side_by_side(documents: list, window: int, last_context_length: int):
    """Token ids and attention mask [B, L] that read each document exactly as it is read alone, and the batch's
    last context length.

    Alone, a document keeps its last last_context_length tokens (all of them, when shorter) in the local window and
    reads the rest into memory in windows of W tokens from its start, the last one possibly shorter. A batch is cut
    at the same places in every row, so each document is padded to be cut at its own: whole windows of padding in
    front, so that its last memory window is the batch's last; padding after that window where it is shorter than
    the batch's; its last context left-padded to the batch's. Padding only adds masked entries no query sees.
    """
    memory_parts = [max(len(ids) - last_context_length, 0) for ids in documents]
    windows = [-(-part // window) for part in memory_parts]  # ceil: the memory windows of each document
    most_windows = max(windows)
    last_window = max((part - (count - 1) * window for part, count in zip(memory_parts, windows) if count), default=0)
    memory_length = (most_windows - 1) * window + last_window if most_windows else 0
    last_context = max(len(ids) - part for ids, part in zip(documents, memory_parts))
    rows, masks = [], []  # each [memory_length + last_context]
    for ids, part, count in zip(documents, memory_parts, windows):
        front = (most_windows - count) * window if count else memory_length  # whole windows of padding
        after = memory_length - front - part  # after a last memory window shorter than the batch's
        before_last_context = last_context - (len(ids) - part)
        padding = after + before_last_context
        rows.append([0] * front + ids[:part] + [0] * padding + ids[part:])  # any id pads: padding is masked
        masks.append([False] * front + [True] * part + [False] * padding + [True] * (len(ids) - part))
    return torch.tensor(rows), torch.tensor(masks), last_context


def prefill(model, ids, cache=None, attention_mask=None, last_context_length=None, progress: bool = False):
    """Read ids [B, L] into memory and local cache; returns the last token's logits [B, V] and the cache."""
    logits, cache = model(ids, cache=cache, use_cache=True, attention_mask=attention_mask,
                          last_context_length=last_context_length, last_logits_only=True, progress=progress)
    return logits[:, -1], cache


# ----------------------------------------------------------------------------------------------------------------------
# Answering: sampling, stop strings and the generation loop


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


def decode_one_token(model, tokens: list, cache):
    """One new token per row; returns the logits [B, V] of the next and the cache."""
    logits, cache = model(torch.tensor(tokens, device=model.embed.weight.device)[:, None], cache=cache, use_cache=True)
    return logits[:, -1], cache


class StopStrings:
    """Text streamed up to the first stop string, of which no part is ever shown.

    Text ending in the beginning of a stop string ("\\nQ" of "\\nQ:") is held back until what follows tells: the
    stop string completes and the answer ends before it, or the held text is shown.
    """

    def __init__(self, stop=()):
        self.stop = list(stop)
        self.held = ""
        self.stopped = False

    def push(self, text: str, final: bool = False) -> str:
        """The text that can be shown now, of what was held and `text`; final: nothing more comes, hold nothing."""
        if self.stopped:
            return ""
        text = self.held + text
        starts = [start for start in (text.find(stop) for stop in self.stop) if start >= 0]
        if starts:
            self.stopped, self.held = True, ""
            return text[:min(starts)]
        keep = 0 if final else max((n for stop in self.stop for n in range(1, len(stop)) if text.endswith(stop[:n])),
                                   default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]


@dataclass
class Sampling:
    """How answers are sampled, and where they end."""

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None  # every answer starts its own generator from it: a question gets the same answer
    stop: tuple = ()  # an answer ends before the first of these strings


@dataclass
class Answer:
    """One question's answers, one per document, and how long they took."""

    tokens: list  # per document: the sampled ids, an EOS that ended the answer included
    texts: list  # per document: the answer's text, up to a stop string (left out)
    first_token_seconds: float = 0.0  # from the question to the first new token
    seconds: float = 0.0

    def stats_line(self, peak_memory: str) -> str:
        count = sum(map(len, self.tokens))
        after_first = count - sum(1 for tokens in self.tokens if tokens)  # the first comes from reading the question
        rate = after_first / max(self.seconds - self.first_token_seconds, 1e-9)
        return (f"answer {count} tokens | first token {f'{self.first_token_seconds:.3f} s' if count else '-'} | "
                f"{f'{rate:.1f}' if after_first else '-'} tok/s | {peak_memory}")


def answer(model, tokenizer, documents: Documents, question: Optional[str] = None, sampling: Sampling = Sampling(),
           on_text: Optional[Callable[[str], None]] = None) -> Answer:
    """Answer `question` about every document (None: continue them) from a copy of their cache: no answer sees another.

    Each document's answer ends after EOS, before a stop string or at max_new_tokens. on_text(piece) receives a
    single document's answer as it streams (a batch's answers come back whole).
    """
    batch_size, device = documents.ids.shape[0], documents.ids.device
    if on_text is not None and batch_size > 1:
        raise ValueError("only a single document's answer streams: no on_text for a batch")
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    start = _now(device)
    cache, logits = documents.cache.copy(), documents.logits
    if question is None:  # a continuation follows the document itself
        contexts = [documents.tokens(row) for row in range(batch_size)]
    else:
        contexts = [documents.template.question_ids(tokenizer, question)] * batch_size
        if contexts[0]:
            logits, cache = prefill(model, torch.tensor(contexts, device=device), cache)
    decoders = [tokenizer.decoder(context) for context in contexts]
    stops = [StopStrings(sampling.stop) for _ in contexts]
    result = Answer([[] for _ in contexts], [""] * batch_size)

    def show(row: int, text: str, final: bool = False):
        piece = stops[row].push(text, final)
        result.texts[row] += piece
        if on_text is not None and piece:
            on_text(piece)

    done = [sampling.max_new_tokens == 0] * batch_size
    while not all(done):
        tokens = [sample(row_logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
                  for row_logits in logits]
        if not any(result.tokens):
            result.first_token_seconds = _now(device) - start
        for row, token in enumerate(tokens):
            if done[row]:  # a finished row runs on with the others, and what it samples is dropped
                continue
            result.tokens[row].append(token)
            if token != tokenizer.eos_id:
                show(row, decoders[row].push(token))
            done[row] = (token == tokenizer.eos_id or stops[row].stopped
                         or len(result.tokens[row]) == sampling.max_new_tokens)
        if not all(done):
            logits, cache = decode_one_token(model, tokens, cache)
    for row in range(batch_size):
        show(row, decoders[row].flush(), final=True)  # text held back for a stop string that never came
    result.seconds = _now(device) - start
    return result


def generate(model, tokenizer, documents: Documents, questions=None, max_new_tokens: int = 256,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, stop=(),
             on_text: Optional[Callable[[str], None]] = None) -> list:
    """Answer each question about documents read once by `read` (questions None: one continuation of them).

    Returns one answer per question: its text, or for a batch the list of each document's text. stop: strings (or
    one) before which an answer ends; on_text(piece) receives a single document's answers as they stream.
    """
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop)
    answers = [answer(model, tokenizer, documents, question, sampling, on_text).texts
               for question in (questions if questions is not None else [None])]
    return [texts[0] for texts in answers] if documents.ids.shape[0] == 1 else answers


def _now(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------------
# Memory files: the cache after the documents, kept between runs


MEMORY_FORMAT = "longllama-memory/1"


def memory_fingerprint(model, tokenizer, template: PromptFormat) -> dict:
    """Everything that shapes a memory, so that a memory file is used only where it equals a fresh reading.

    weights: a hash of 4096 evenly spaced values of every weight tensor (any trained change reaches them; hashing
    all of a 7B model would take longer than loading the memory). config: every key but mem_attention_grouping, which
    changes no value (mem_layers, mem_dtype, last_context_length, positions, window, ...). The compute dtype, the
    hashes of the tokenizer's files (its tokenizer_config.json too), the prompt format.
    """
    weights = hashlib.sha256()
    for name, tensor in named_weights(model):
        values = tensor.flatten()
        weights.update(f"{name} {tuple(tensor.shape)}".encode())
        weights.update(values[::max(1, values.numel() // 4096)].float().cpu().numpy().tobytes())
    config = model.config.to_dict()
    del config["mem_attention_grouping"]
    return {"weights": weights.hexdigest(), "config": json.dumps(config, sort_keys=True),
            "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
            "tokenizer": json.dumps({name: hashlib.sha256(Path(path).read_bytes()).hexdigest()
                                     for name, path in sorted(tokenizer.files.items())}),
            "template": template.name, "prompt_format": json.dumps(asdict(template))}


def save_memory(path, documents: Documents, fingerprint: dict, names: list):
    """Write documents' cache, logits and tokens to a safetensors file, atomically, with the fingerprint."""
    path = check_writable(path)
    cache = documents.cache
    tensors = {f"cache.{name}": tensor for name, tensor in checkpoint.cache_tensors(cache).items()}
    tensors |= {"logits": documents.logits.contiguous(), "ids": documents.ids, "mask": documents.mask}
    metadata = {"format": MEMORY_FORMAT, **fingerprint, "position": str(cache.position),
                "padding": str(int(cache.padding)), "names": json.dumps(names)}
    try:
        checkpoint.write_atomically({path: lambda tmp: save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp),
                                                                 metadata=metadata)})
    except OSError as e:
        raise ValueError(f"cannot write memory file {path}: {e.strerror or e}") from None


def check_writable(path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write memory file {path}: no directory {path.parent}")
    return path


def input_files(args) -> dict:
    """{path: what it is} of every file a run reads: a memory file must go over none of them."""
    files = {path: "a prompt file" for path in args.prompt_file or [] if path != "-"}
    if args.tokenizer:
        files[args.tokenizer] = "the --tokenizer"
    return files | checkpoint_inputs(args.ckpt)


def load_memory(path, model, fingerprint: dict, template: PromptFormat) -> tuple[Documents, list]:
    """Documents and their names from a memory file, refused unless it was read as this run would read it."""
    try:
        with safe_open(str(path), framework="pt", device=str(model.embed.weight.device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != MEMORY_FORMAT:
                raise ValueError("not a memory file (save one with --save-memory)")
            refuse_other_settings(metadata, fingerprint)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        logits, ids, mask = (tensors.pop(name, None) for name in ("logits", "ids", "mask"))
        check_documents(logits, ids, mask, model.config.vocab_size)
        cache = checkpoint.cache_from_tensors(model, {name.removeprefix("cache."): t for name, t in tensors.items()},
                                         ids.shape[0], int(metadata["position"]), metadata["padding"] == "1")
        names = json.loads(metadata["names"])
    except (SafetensorError, OSError) as e:
        raise ValueError(f"memory file {path}: cannot read it ({e})") from None
    except (ValueError, KeyError) as e:  # a damaged or hostile file, or one read otherwise: one line naming it
        raise ValueError(f"memory file {path}: {e}") from None
    return Documents(cache, logits, ids, mask, template), names


def refuse_other_settings(saved: dict, current: dict):
    """ValueError naming the first setting a memory file was read with that differs from this run's."""
    if saved.get("dtype") != current["dtype"]:  # first: weights in another dtype hash differently
        raise ValueError(f"read in {saved.get('dtype')}, this run computes in {current['dtype']} (--dtype)")
    if saved.get("weights") != current["weights"]:
        raise ValueError("read by another model (its weights differ from this checkpoint's)")
    saved_config, config = json.loads(saved.get("config") or "{}"), json.loads(current["config"])
    if not isinstance(saved_config, dict):
        raise ValueError("its config is damaged")
    for key, value in config.items():
        if saved_config.get(key) != value:
            raise ValueError(f"read with {key}={saved_config.get(key)!r}, this run has {key}={value!r}")
    if saved.get("tokenizer") != current["tokenizer"]:
        raise ValueError("read with another tokenizer")
    if saved.get("template") != current["template"]:
        raise ValueError(f"read with --template {saved.get('template')}, this run has --template {current['template']}")
    if saved.get("prompt_format") != current["prompt_format"]:
        raise ValueError("read with another chat template")


def check_documents(logits, ids, mask, vocab_size: int):
    """The documents' part of a memory file: logits [B, V] floats, token ids [B, L] in the vocabulary, mask [B, L]."""
    if logits is None or ids is None or mask is None:
        raise ValueError("logits, ids or mask is missing")
    if (ids.dim() != 2 or ids.dtype != torch.int64 or mask.shape != ids.shape or mask.dtype != torch.bool
            or tuple(logits.shape) != (ids.shape[0], vocab_size) or not logits.is_floating_point()):
        raise ValueError(f"logits, ids or mask do not fit a batch of documents for a vocabulary of {vocab_size}")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
        raise ValueError(f"ids outside the vocabulary of {vocab_size}")


# ----------------------------------------------------------------------------------------------------------------------
# Memory planning: refuse a prompt that cannot fit instead of being killed halfway through reading it


def prompt_memory_bytes(config: longllama.LongLlamaConfig, prompt_tokens: int, dtype: torch.dtype,
                        parts: bool = False):
    """Rough peak bytes that reading a prompt adds to the weights: memory, local caches and one window's work
    (with parts, (memory, the rest)).

    Memory (keys and values of every memory layer, kept in the compute dtype, or in mem_dtype with mem_topk) is
    the only part that grows with the prompt: attention runs through fused kernels, so its workspace is bounded by
    the window.
    """
    last_context = min(prompt_tokens, config.last_context_length)
    kv_width = 2 * config.num_key_value_heads * config.head_dim  # key and value of one token
    stored = getattr(torch, config.mem_dtype) if config.mem_topk else dtype
    memory = len(config.mem_layers) * (prompt_tokens - last_context) * kv_width * stored.itemsize
    if config.mem_topk and config.mem_retrieval == "blocks":  # and the blocks' bounds, float32
        memory += len(config.mem_layers) * -(-prompt_tokens // config.mem_block_size) * kv_width * 4
    local = config.num_hidden_layers * config.max_position_embeddings * kv_width * dtype.itemsize
    window = min(prompt_tokens, config.max_position_embeddings)
    # a window's activations: residual, q/k/v/out, the MLP's gate|up and its product, float32 norms and merges
    activations = window * (8 * config.hidden_size + 3 * config.intermediate_size) * 4
    rest = local + activations + 4 * config.vocab_size
    return (memory, rest) if parts else memory + rest


def check_memory(model, lengths: list):
    """Refuse prompts of these lengths (tokens) that would not fit in free memory side by side, before reading.
    With mem_on_host on a GPU, memory is counted against host RAM and the rest against the GPU."""
    dtype, device, config = model.embed.weight.dtype, model.embed.weight.device, model.config
    longest = max(lengths)
    memory, rest = (len(lengths) * part for part in prompt_memory_bytes(config, longest, dtype, parts=True))
    host = config.mem_on_host and device.type != "cpu"
    if config.mem_topk is None:
        hint = "--dtype bfloat16 or --mem-topk K (either holds memory in 16 bits), or a shorter prompt"
    else:
        hint = "a shorter prompt" if getattr(torch, config.mem_dtype).itemsize == 2 else "--mem-dtype bfloat16"
    for where, needed in ([(torch.device("cpu"), memory), (device, rest)] if host else [(device, memory + rest)]):
        available = available_bytes(where)
        if needed > 0.9 * available:
            what = (f"a prompt of {longest} tokens needs" if len(lengths) == 1
                    else f"{len(lengths)} prompts of {longest} tokens need")
            of = " of host RAM" if host and where.type == "cpu" else ""
            raise ValueError(f"{what} about {needed / 2**30:.1f} GiB more{of}, {available / 2**30:.1f} GiB are "
                             f"free: try {hint}")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Read long documents into memory once; continue them or answer questions.")
    p.error = fail  # a bad flag is bad input like any other: one line, status 1
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory (config.json, model.safetensors, tokenizer.model or tokenizer.json), "
                        "or a llama.cpp .gguf file, converted in RAM as convert_weights.py converts it")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the document's text")
    source.add_argument("--prompt-file", action="append", metavar="PATH",
                        help="file holding a document ('-' reads stdin); repeated: documents read side by side")
    source.add_argument("--load-memory", metavar="FILE", help="a memory file from --save-memory: no reading again")
    p.add_argument("--question", action="append", default=[], help="a question about the document (repeatable)")
    p.add_argument("--interactive", action="store_true", help="questions from stdin, one per line, until EOF")
    p.add_argument("--template", default="none", choices=["none", "instruct", "chat"],
                   help="how document and question are put to the model (default: none, just concatenated)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="an answer ends before this string (repeatable)")
    p.add_argument("--save-memory", metavar="FILE", help="write the document's memory to FILE for --load-memory")
    p.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--max-new-tokens", type=int_flag, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int_flag, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--last-context-length", type=int_flag, default=None,
                   help="prompt tokens kept in the local window rather than memory (default: the checkpoint's)")
    p.add_argument("--mem-attention-grouping", default=None, metavar="H,Q",
                   help="memory attention over at most H heads x Q queries at a time (bounds peak memory)")
    p.add_argument("--mem-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="precision of memory keys/values: rounded to it, kept in the compute dtype (default: the checkpoint's)")
    add_memory_arguments(p)
    add_quantize_argument(p)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="compute dtype (default: bfloat16 on a GPU and on a CPU with bfloat16 instructions, "
                        "AVX512-BF16 or AMX; float32 on other CPUs)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: the second token of an answer waits for compilation "
                        "(seconds; needs a C++ compiler on CPU), the rest come faster (README, Performance)")
    args = p.parse_args(argv)
    # comparisons with NaN are false, so NaN fails every rule; sizes the checkpoint bounds are checked by its config
    checks.check_values(vars(args), [
        (["max_new_tokens", "top_k"], lambda v: v >= 0, ">= 0"),
        (["temperature"], lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 is greedy)"),
        (["top_p"], lambda v: 0 < v <= 1, "in (0, 1]"),
        (["seed"], lambda v: v is None or 0 <= v < 2**64, "in [0, 2**64)"),
        (["stop"], lambda v: all(v), "non-empty strings"),
        (["question"], lambda v: all(q.strip() for q in v), "non-empty questions"),
    ], label=lambda key: "--" + key.replace("_", "-"))
    prompt_files = args.prompt_file or []
    asks = bool(args.question or args.interactive)
    for wrong, message in [
        (args.prompt is None and not prompt_files and not args.load_memory,
         "one of --prompt, --prompt-file or --load-memory is required"),
        (args.save_memory and args.load_memory, "--save-memory and --load-memory together: the memory is in a file"),
        (prompt_files.count("-") > 1, "--prompt-file - reads stdin, which can be read once"),
        (args.interactive and "-" in prompt_files, "--interactive reads questions from stdin: no --prompt-file - then"),
        (args.template != "none" and not asks, f"--template {args.template} frames questions: add --question or "
                                               "--interactive"),
        (args.echo and (asks or len(prompt_files) > 1), "--echo prints one document before its continuation: not "
                                                        "with questions or several documents"),
    ]:
        if wrong:
            fail(message)
    return args


def read_prompts(args) -> list:
    """(name, text) of each document, from --prompt, files or stdin; refused unless UTF-8 text (NUL means binary)."""
    sources = [(None, "--prompt")] if args.prompt is not None else [
        (path, "stdin" if path == "-" else f"prompt file {path}") for path in args.prompt_file]
    prompts = []
    for path, source in sources:
        try:
            if path is None:
                data = os.fsencode(args.prompt)  # argv arrives decoded leniently: back to its bytes
            else:
                data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
            text = utf8_text(data)
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"cannot read {source}: not UTF-8 text: {e.reason} at byte {e.start}") from None
        if not text.strip():
            raise ValueError(f"the prompt is empty ({source})")
        prompts.append((path or source, text))
    return prompts


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
    return overrides | memory_overrides(args)


def questions(args) -> Iterator[str]:
    """--question ones, then with --interactive one a line of stdin until EOF. Each shows as "Q: ..." on stdout before
    its answer; at a terminal the prompt and the typing show it, with line editing (readline)."""
    for question in args.question:
        write(f"Q: {question}\n")
        yield question
    if not args.interactive:
        return
    at_terminal = sys.stdin.isatty()
    for line in typed_lines() if at_terminal else sys.stdin:
        question = line.strip()
        if question:
            if not at_terminal:
                write(f"Q: {question}\n")
            yield question


def typed_lines() -> Iterator[str]:
    importlib.import_module("readline")  # once loaded, input() has line editing and history
    while True:
        try:
            yield input("Q: ")
        except EOFError:  # Ctrl-D: end the line the prompt began
            write("\n")
            return


def write(text: str):
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args):
    device = checkpoint.resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    prompts = None if args.load_memory else read_prompts(args)
    if args.compile:
        checks.check_can_compile(device)
    if args.save_memory:
        check_writable(args.save_memory)  # before reading, which can take minutes
        refuse_writing_over(args.save_memory, "--save-memory", input_files(args))
    args.ckpt = checkpoint_directory(args.ckpt, dtype)  # a GGUF file: converted in RAM
    model, tokenizer = load_checkpoint(args.ckpt, args.tokenizer, device, dtype, quantize=args.quantize,
                                       **config_overrides(args))
    if args.compile:
        model.compile_decode()
    template = prompt_format(args.template, args.ckpt, tokenizer)
    fingerprint = memory_fingerprint(model, tokenizer, template) if args.save_memory or args.load_memory else None

    start = _now(device)
    if args.load_memory:
        documents, names = load_memory(args.load_memory, model, fingerprint, template)
    else:
        names = [name for name, _ in prompts]
        documents = read(model, tokenizer, [text for _, text in prompts], template, progress=True)
    print(documents.stats_line(_now(device) - start, "loaded" if args.load_memory else "read"), file=sys.stderr)
    if args.save_memory:
        save_memory(args.save_memory, documents, fingerprint, names)
    if args.echo and len(names) > 1:
        raise ValueError("--echo prints one document before its continuation: this memory file holds several")

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
    if not (args.question or args.interactive):
        if args.echo:  # the prompt as the model reads it: with the continuation, exactly the decoded token sequence
            write(tokenizer.decode(documents.tokens(0)))
        print_answer(model, tokenizer, documents, None, sampling, names, newline=args.echo)
    for question in questions(args):
        print_answer(model, tokenizer, documents, question, sampling, names)


def print_answer(model, tokenizer, documents, question, sampling, names, newline=False):
    """Answer (question None: continue) and print: a single document's answer streams, a batch's come whole, each
    under its document's name. newline: end the line even when the answer is empty."""
    single = len(names) == 1
    if question is not None and single:
        write("A: ")
    result = answer(model, tokenizer, documents, question, sampling, on_text=write if single else None)
    if not single:
        write("".join(f"==> {name} <==\n{text}\n" for name, text in zip(names, result.texts)))
    elif question is not None or newline or result.tokens[0]:  # nothing printed: no line to end
        write("\n")
    if question is not None:
        write("\n")
    print(result.stats_line(peak_memory(documents.ids.device)), file=sys.stderr)


def main(argv=None):
    as_command(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
