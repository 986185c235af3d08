"""FoT continued pretraining of LongLLaMA: cross-batch training of the memory layers on a document-aware stream.

    python train.py                                     # the default run: `tiny` preset on the embedded corpus, CPU
    python train.py --max-steps 50 --out runs/quick     # shorter, elsewhere
    python train.py --data corpus.jsonl --preset small --batch-size 16 --seq-len 1024 --grad-accum 4
    python train.py --init ckpt/ --data code/ --mem-layers 6,12,18 --lr 3e-5   # continued pretraining
    python train.py --resume --out runs/quick           # continue the run saved in runs/quick
    torchrun --standalone --nproc_per_node 8 train.py --init ckpt/ --data corpus.jsonl          # DDP, one node
    torchrun --standalone --nproc_per_node 8 train.py --init code-7b/ --data corpus.jsonl --fsdp  # 7B: FSDP
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...

Where FoT lives:
- the batches come from documents.py's document-aware pipeline (`Batches`): each batch slot reads one document at a
  time, and with packing k a document's earlier pieces sit in the rows just before it: the positives of cross-batch
  attention, while the other documents of the batch are its negatives.
- the training step calls `model(inputs, cross_batch_range=d, stepping=..., packing=k)`: cross-batch attention
  (`longllama.cross_batch_attention`).
- `evaluate`: perplexity of a held-out window when 0, 1, 3, 7 ... earlier windows are in memory.

Data (--data): JSONL files of {"text": ...} or {"prompt": ..., "completion": ...} records (prompt tokens get no
loss), plain text files (one document each), or directories of them; without --data, the Python standard library
this interpreter runs on (documents.py says which files). Documents are shuffled (seeded) anew every epoch, each
rank reads its own share, and --resume sees exactly the batches an uninterrupted run would. Documents whose stable
name hash falls in the --holdout percent are the eval set, unless --eval-data is given. --passkey-docs N adds N
synthetic passkey documents (documents.py: the answer a training row or more after the passkey, so that cross-batch
attention is what learns it), generated when read.

OUT holds a checkpoint generate.py and longllama.load read as is (config.json, model.safetensors,
tokenizer.model or tokenizer.json) plus optimizer.pt, train_state.json (step, pipeline state, settings) and log.jsonl.
Settings are the fields of `Settings` below; each is a flag (`batch_size` is --batch-size).
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from tqdm import tqdm

import longllama
from checkpoint import (available_bytes, load, read_train_state, resolve_device, restore_optimizer_state,
                        save_checkpoint, write_atomically)
from checks import check_values, is_int, is_number
from cli import default_dtype, removed_on_failure, same_path, stay_quiet, warn
from documents import LAYOUTS, Batches, ChatFrame, eval_spans, find_documents, passkey_documents, read_document
from generate import chat_format
from tokenizer import MIN_VOCAB_SIZE, TOKENIZER_CONFIG, open_tokenizer, tokenizer_file, train_tokenizer


# --trainable: which parameters continued pretraining updates. Fewer train faster, change less of what the model
# knew, and make a smaller difference to ship; layers below the lowest memory layer see no memory at all.
TRAINABLE = {
    "all": "every parameter",
    "upper": "the blocks from the lowest memory layer up, the final norm and an untied lm_head",
    "memory-layers": "the memory layers' blocks",
    "memory-attention": "the memory layers' attention projections",
}


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
                                         "within half a window), decoy (far, among keys said the same way), chat "
                                         "(far, asked and answered in the model's chat template)")
    tokenizer: str = setting("", "tokenizer.model or tokenizer.json (default: the --init checkpoint's, else one trained into OUT)")
    vocab_size: int = setting(4096, "vocabulary of a tokenizer trained here")
    # model
    preset: str = setting("tiny", "model shape when training from scratch: " + ", ".join(longllama.PRESETS))
    init: str = setting("", "start from this checkpoint directory instead (continued pretraining)")
    mem_layers: str = setting("", "memory layers, e.g. 6,12,18 (default: the preset's / checkpoint's)")
    window: int = setting(0, "the window W for the preset or --init model, in place of its own (0: keep it): memory "
                          "layers reach beyond it, so a plain model's native context can become a FoT window; the "
                          "tokens kept local at the end of a prompt are then the default for W (min(1024, W / 2))")
    trainable: str = setting("all", "the parameters trained, the rest frozen: " + ", ".join(
        f"{name} ({what})" for name, what in TRAINABLE.items()))
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
    autocast: bool = setting(True, "bfloat16 autocast where bfloat16 is native: a GPU, or a CPU with AVX512-BF16 or "
                             "AMX (weights stay float32)")
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


# What each setting must be (for checks.check_values). Flags arrive typed by argparse, but a resumed run's settings
# come from train_state.json, so types are checked too. Counts stay below 2**63: torch holds them in int64.
SETTING_RULES = [
    (["batch_size", "seq_len", "packing", "grad_accum", "save_every", "log_every", "eval_spans", "eval_batch_size"],
     lambda v: is_int(v) and 1 <= v < 2**63, "an integer in [1, 2**63)"),
    (["max_steps", "warmup_steps", "lr_decay_steps", "cross_batch_range", "eval_every", "window"],
     lambda v: is_int(v) and 0 <= v < 2**63, "an integer in [0, 2**63)"),
    (["seed"], lambda v: is_int(v) and 0 <= v < 2**64, "an integer in [0, 2**64)"),
    (["passkey_docs"], lambda v: is_int(v) and 0 <= v <= 10**7, "an integer in [0, 10**7]"),  # a list entry each
    (["vocab_size"], lambda v: is_int(v) and MIN_VOCAB_SIZE <= v < 2**31, f"an integer in [{MIN_VOCAB_SIZE}, 2**31)"),
    (["lr", "min_lr", "weight_decay", "grad_clip"], lambda v: is_number(v) and v >= 0, "a finite number >= 0"),
    (["beta1", "beta2"], lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    (["holdout"], lambda v: is_number(v) and 0 <= v <= 100, "a percentage in [0, 100]"),
    (["stepping", "activation_checkpointing", "compile", "autocast", "fsdp", "resume"], lambda v: isinstance(v, bool),
     "true or false"),
    (["tokenizer", "init", "mem_layers", "device", "out", "eval_memory"], lambda v: isinstance(v, str), "a string"),
    (["data", "eval_data"], lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of paths"),
    (["preset"], lambda v: v in longllama.PRESETS, f"one of {', '.join(longllama.PRESETS)}"),
    (["trainable"], lambda v: v in TRAINABLE, f"one of {', '.join(TRAINABLE)}"),
    (["passkey_layout"], lambda v: isinstance(v, str) and set(v.split(",")) <= set(LAYOUTS),
     f"comma-separated layouts among {', '.join(LAYOUTS)}"),
]

# Settings a resumed run may change; any other would make it a different run.
CHANGEABLE_ON_RESUME = {"max_steps", "save_every", "log_every", "eval_every", "eval_batch_size", "device",
                        "activation_checkpointing", "compile", "autocast", "out", "resume"}


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
    check_values(values, SETTING_RULES, label)


def int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None



# ----------------------------------------------------------------------------------------------------------------------
# The step: loss, learning rate, precision


def masked_cross_entropy(logits, targets, mask):
    """Mean next-token loss over the targets whose mask is 1 (prompt tokens have 0)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * mask.flatten()).sum() / mask.sum().clamp(min=1)


def learning_rate(step: int, s: Settings) -> float:
    """nanoGPT's schedule: linear warmup to lr, cosine decay to min_lr at lr_decay_steps, then min_lr."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    if step >= s.lr_decay_steps:
        return s.min_lr
    progress = (step - s.warmup_steps) / max(s.lr_decay_steps - s.warmup_steps, 1)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def autocast_for(device, enabled: bool = True):
    """bfloat16 autocast where bfloat16 is native, as generate.py chooses its dtype: on a GPU, and on a CPU with
    bfloat16 instructions (AVX512-BF16 or AMX), where a step runs 1.6x as fast as in float32 (docs/performance.md).
    Weights, gradients and the optimizer state stay float32; elsewhere, and with --no-autocast, all is float32."""
    if enabled and default_dtype(device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------------
# Eval: perplexity with memory


@torch.no_grad()
def evaluate(model, spans, window: int, memory_sizes, batch_size: int, device, autocast) -> dict:
    """For each m, the perplexity of every span's last window when the m windows before it were read into memory.

    The model reads the (m + 1) * W inputs with last_context_length=W: m windows into memory, then the last
    window, whose W next-token predictions are the only ones counted, so every m scores the same tokens. A model
    without memory layers has no memory to read into: it holds as much of the inputs as its own window takes.
    """
    was_training = model.training
    model.eval()
    perplexities = {}
    for m in memory_sizes:
        nll = 0.0
        local = window if model.config.mem_layers else min((m + 1) * window, model.config.max_position_embeddings)
        for batch in spans.split(batch_size):
            inputs = batch[:, -(m + 1) * window - 1:-1].to(device)  # [b, (m+1)W]
            targets = batch[:, -window:].to(device)  # [b, W]
            with autocast:
                logits, _ = model(inputs, last_context_length=local)
            nll += F.cross_entropy(logits[:, -window:].float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        perplexities[str(m)] = math.exp(nll / (len(spans) * window))
    model.train(was_training)
    return perplexities


def held_out_spans(s: Settings, documents: list, tokenizer, window: int, memory_sizes) -> Optional[torch.Tensor]:
    """The eval's spans (eval_spans); None when there is no eval."""
    if not s.eval_every:
        return None
    spans = eval_spans(documents, tokenizer, window, memory_sizes, s.eval_spans)
    if len(spans) == 0:
        warn(f"no eval: no held-out document has {(max(memory_sizes) + 1) * window + 1} tokens")
        return None
    return spans


# ----------------------------------------------------------------------------------------------------------------------
# The run


def resolve_settings(argv) -> tuple[Settings, Optional[dict], Path, list[int]]:
    """The run's settings, checked: the command line's, or for --resume the saved run's with the changes it allows.
    Also the saved train_state.json (None for a new run), OUT, and the eval's memory sizes."""
    s, explicit = parse_settings(argv)
    out = Path(s.out)
    check_out(out)
    if explicit.get("init") and "preset" in explicit and not s.resume:
        # refused, not warned: two shapes asked for, and the preset's would be silently dropped for the checkpoint's
        raise ValueError(f"--preset {s.preset} and --init {s.init}: a run starts from the checkpoint, in its own "
                         "shape, or from a new model of the preset's shape: give one of them")
    state = None
    if s.resume:
        state = read_train_state(out, {f.name for f in fields(Settings)}, SETTING_RULES)
        saved = Settings(**state["settings"])
        for name, value in explicit.items():
            if name not in CHANGEABLE_ON_RESUME and value != getattr(saved, name):
                raise ValueError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                                 f"{getattr(saved, name)} ({out / 'train_state.json'})")
        s = Settings(**{**asdict(saved), **{k: v for k, v in explicit.items() if k in CHANGEABLE_ON_RESUME}})
    check_settings(asdict(s))
    check_out_is_no_input(s, out)
    if s.batch_size % s.packing:
        raise ValueError(f"--batch-size {s.batch_size} must be divisible by --packing {s.packing}")
    memory_sizes = sorted(set(int_list(s.eval_memory, "eval-memory")))
    if not memory_sizes or min(memory_sizes) < 0:
        raise ValueError("--eval-memory: expected non-negative numbers of windows, e.g. 0,1,3,7")
    s.lr_decay_steps = s.lr_decay_steps or s.max_steps  # resolved once, so that a resumed run keeps the schedule
    return s, state, out, memory_sizes


def check_out(out: Path):
    """OUT is a directory, or can become one: found now rather than after a tokenizer has been trained."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def check_out_is_no_input(s: Settings, out: Path):
    """OUT is written (model.safetensors, config.json, the tokenizer, log.jsonl): it must not be the --init
    checkpoint, nor a --data or --eval-data path or a directory under one, whose files are all read as documents."""
    for flag, paths in [("--init", [s.init] if s.init else []), ("--data", s.data), ("--eval-data", s.eval_data)]:
        for path in paths:
            if same_path(out, path) or (Path(path).is_dir() and out.resolve().is_relative_to(Path(path).resolve())):
                raise ValueError(f"--out {out} is {'' if same_path(out, path) else 'inside '}the {flag} path {path}: "
                                 "the run would write over what it reads (choose another --out)")


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
    distributed = "RANK" in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    elif s.fsdp:
        raise ValueError("--fsdp shards over processes: run under torchrun")
    device = resolve_device(s.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", local_rank)
    stay_quiet(rank != 0)
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
    if s.window:  # last_context_length None: its default for the new window
        overrides |= dict(max_position_embeddings=s.window, last_context_length=None)
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
    if s.trainable != "all" and not config.mem_layers:
        raise ValueError(f"--trainable {s.trainable} needs memory layers: the model has none (pass --mem-layers)")
    window = config.max_position_embeddings
    if s.seq_len > window:
        raise ValueError(f"--seq-len {s.seq_len} is longer than the model window {window}")
    must_train_tokenizer = not (s.resume or s.tokenizer or s.init or tokenizer_path.is_file())
    if not must_train_tokenizer and not tokenizer_path.is_file():
        raise ValueError(f"tokenizer {tokenizer_path} does not exist (pass --tokenizer)")
    # refused now rather than killed later; a preset's vocabulary comes from a tokenizer not read yet: the smallest
    vocab_size = config.vocab_size if s.resume or s.init else MIN_VOCAB_SIZE
    needed = training_bytes(replace(config, vocab_size=vocab_size), s, cluster.world_size if s.fsdp else 1)
    available = available_bytes(cluster.device)
    if needed > available:
        raise ValueError(f"this run needs at least {needed / 2**30:.1f} GiB on {cluster.device} (weights, gradients, "
                         f"optimizer state, logits and cross-batch keys of {s.batch_size} x {s.seq_len} tokens); "
                         f"{available / 2**30:.1f} GiB are free")
    return ModelPlan(config, checkpoint, overrides, tokenizer_path, must_train_tokenizer)


def training_bytes(config, s: Settings, shards: int) -> int:
    """A lower bound on one process's memory: float32 weights, and the gradients and AdamW's two moments of the
    trained ones (FSDP shards them over processes), and of one micro batch, in at least 2 bytes each: the logits,
    and the keys and values that cross-batch attention gathers from d other rows in each memory layer. Other
    activations come on top."""
    tokens, kv_width = s.batch_size * s.seq_len, config.num_key_value_heads * config.head_dim
    cross_batch = 2 * tokens * s.cross_batch_range * kv_width * len(config.mem_layers)
    with torch.device("meta"):  # shapes only
        names = dict(longllama.LongLlama(config).named_parameters())
    trained = sum(p.numel() for name, p in names.items() if is_trainable(name, config.mem_layers, s.trainable))
    weights = 4 * config.num_parameters + 12 * trained
    return weights // shards + 2 * tokens * config.vocab_size + 2 * cross_batch


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


def chat_frame(tokenizer_dir: Path, tokenizer) -> ChatFrame:
    """The chat template of the tokenizer's tokenizer_config.json, for --passkey-layout chat."""
    if not (tokenizer_dir / TOKENIZER_CONFIG).is_file():
        raise ValueError(f"--passkey-layout chat: {tokenizer_dir} has no {TOKENIZER_CONFIG} with a chat template")
    try:
        chat = chat_format(tokenizer_dir, tokenizer)
    except ValueError as e:
        raise ValueError(f"--passkey-layout chat: {e}") from None
    end = next((text for text, token in chat.specials if token == tokenizer.eos_id), None)
    if end is None:
        raise ValueError(f"--passkey-layout chat: the chat template in {tokenizer_dir} names no eos_token")
    return ChatFrame(chat.head, chat.middle, chat.tail, end, chat.specials)


def build_model(s: Settings, plan: ModelPlan, tokenizer, cluster: Cluster) -> tuple[torch.nn.Module,
                                                                                 longllama.LongLlama]:
    """(the model to call, the LongLlama whose parameters the optimizer holds): fp32 weights on the device (bf16
    autocast where native: autocast_for); the first is the second wrapped for DDP, or the second itself, sharded in
    place by FSDP."""
    torch.manual_seed(s.seed)  # a new model's weights are the seed's
    if plan.checkpoint is not None:
        model = load(plan.checkpoint, **plan.overrides)
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
    freeze(model, s.trainable)
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


def is_trainable(name: str, mem_layers: list, trainable: str) -> bool:
    """Whether --trainable trains the parameter `name` (as named_parameters names it: a tied lm_head is `embed`)."""
    layer = int(name.split(".")[1]) if name.startswith("layers.") else None
    if trainable == "upper":
        return name.startswith(("norm.", "lm_head.")) or (layer is not None and layer >= min(mem_layers))
    if trainable == "memory-layers":
        return layer in mem_layers
    if trainable == "memory-attention":
        return layer in mem_layers and ".attention." in name
    return True


def freeze(model: longllama.LongLlama, trainable: str):
    """Switch off the gradients of the parameters --trainable leaves as they are (before DDP or FSDP wraps them)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(name, model.config.mem_layers, trainable))


def build_optimizer(s: Settings, raw_model, device) -> torch.optim.AdamW:
    """AdamW over the trained parameters the model holds (FSDP: this rank's shards); fused on GPU."""
    trained = [p for p in raw_model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]  # weight decay on matrices only
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=s.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=device.type == "cuda")


def restore(out: Path, state: Optional[dict], raw_model, optimizer, batches: Batches, rank: int) -> tuple[int, int]:
    """(step, tokens seen) of a resumed run, its optimizer state and pipeline restored; (0, 0) for a new run."""
    if state is None:
        return 0, 0
    restore_optimizer_state(out, raw_model, optimizer, state)
    batches.load_state_dict(state["pipeline"][rank])
    return state["step"], state["tokens"]


def save_run(s: Settings, out: Path, raw_model, optimizer, batches: Batches, tokenizer, cluster: Cluster, step: int,
             tokens_seen: int, run_id: str):
    """Checkpoint the run into OUT. Every rank calls it: the full model and optimizer state and each rank's pipeline
    state are gathered on rank 0, which writes them (checkpoint.save_checkpoint), stamped with run_id."""
    full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(raw_model, options=full_state)  # gathered on rank 0 (a collective)
    optimizer_state = get_optimizer_state_dict(raw_model, optimizer, options=full_state)
    pipeline = [None] * cluster.world_size
    if cluster.distributed:
        dist.all_gather_object(pipeline, batches.state_dict())
    else:
        pipeline = [batches.state_dict()]
    if cluster.master:
        train_state = dict(step=step, tokens=tokens_seen, world_size=cluster.world_size, pipeline=pipeline,
                           settings=asdict(s))
        save_checkpoint(out, raw_model.config, model_state, optimizer_state, train_state, tokenizer, run_id)


def logged_step(line: str) -> float:
    """The step of a log.jsonl line; infinity for a line that is no entry, such as one cut short by a kill."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return math.inf
    return entry["step"] if isinstance(entry, dict) and is_int(entry.get("step")) else math.inf


def start_log(path: Path, resume: bool, step: int):
    """A resumed run continues the log from its checkpoint: lines an interrupted run wrote later are dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text(errors="replace").splitlines() if resume and path.exists() else []
    kept = "".join(line + "\n" for line in lines if logged_step(line) <= step)
    write_atomically({path: lambda p: p.write_text(kept)})


def append_log(path: Path, **entry):
    """One line of log.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def start_line(s: Settings, raw_model, documents: int, step: int, cluster: Cluster) -> str:
    """The run's first line: what is trained, on what, how."""
    n_params = sum(p.numel() for p in raw_model.parameters())
    n_trained = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    trained = "" if n_trained == n_params else f" ({n_trained / 1e6:.2f}M trained: {s.trainable})"
    start = f"resuming at step {step}" if s.resume else "training"
    return (f"{start}: {n_params / 1e6:.2f}M parameters{trained}, "
            f"mem_layers {raw_model.config.mem_layers}, {documents} training documents, "
            f"batch {s.batch_size}x{s.seq_len} x{s.grad_accum} accum x{cluster.world_size} processes, "
            f"d={s.cross_batch_range} k={s.packing}{' stepping' if s.stepping else ''}, device {cluster.device}")


def done_line(step: int, tokens_seen: int, first_loss: Optional[float], loss: float, ppl: Optional[dict],
              elapsed: float, new_tokens: int, out: Path) -> str:
    """The run's last line: steps, tokens, loss at the first and last step, the last eval, speed, the checkpoint."""
    summary = [f"done: {step} steps", f"{tokens_seen / 1e6:.2f}M tokens",
               f"loss {first_loss if first_loss is not None else float('nan'):.3f} -> {loss:.3f}"]
    if ppl:
        summary.append("eval ppl with " + " / ".join(ppl) + " windows in memory: "
                       + " / ".join(f"{p:.2f}" for p in ppl.values()))
    summary += [f"{elapsed:.0f} s ({new_tokens / elapsed:.0f} tokens/s overall)", f"checkpoint {out}"]
    return ", ".join(summary)


def main(argv=None):
    s, state, out, memory_sizes = resolve_settings(argv)
    cluster = setup_distributed(s, state)
    saved = []  # the steps this command checkpointed: from the first, OUT holds a run that --resume continues
    # a run that fails before its first checkpoint leaves no OUT it made, nor files it added to one (rank 0 writes)
    with removed_on_failure(out, keep=lambda: bool(saved) or not cluster.master):
        run(s, state, out, memory_sizes, cluster, saved)


def run(s: Settings, state: Optional[dict], out: Path, memory_sizes: list, cluster: Cluster, saved: list):
    """The run: data, tokenizer, model, optimizer, then the training loop, with eval and checkpoints."""
    plan = plan_model(s, out, cluster)
    train_documents, eval_documents = find_documents(s.data, s.eval_data, s.holdout, cluster.world_size)
    join_process_group(cluster)
    tokenizer = prepare_tokenizer(s, plan, train_documents, cluster)
    # added after the tokenizer is trained (their filler would only crowd its sample) and never held out: they
    # teach the use of memory, the eval measures it on real text
    if s.passkey_docs:
        chat = chat_frame(plan.tokenizer_path.parent, tokenizer) if "chat" in s.passkey_layout.split(",") else None
        train_documents += passkey_documents(s.passkey_docs, s.seed, s.seq_len, tokenizer, s.passkey_layout,
                                             tuple(train_documents), chat)
    model, raw_model = build_model(s, plan, tokenizer, cluster)
    device, master, window = cluster.device, cluster.master, raw_model.config.max_position_embeddings
    optimizer = build_optimizer(s, raw_model, device)
    batches = Batches(train_documents, tokenizer, s.batch_size, s.seq_len, s.packing, s.seed, cluster.rank,
                      cluster.world_size)
    step, tokens_seen = restore(out, state, raw_model, optimizer, batches, cluster.rank)
    if s.compile:
        model = torch.compile(model)
    autocast = autocast_for(device, s.autocast)
    spans = held_out_spans(s, eval_documents, tokenizer, window, memory_sizes)
    log_path = out / "log.jsonl"
    if master:
        start_log(log_path, s.resume, step)
        print(start_line(s, raw_model, len(train_documents), step, cluster))

    # what ties the files of each checkpoint to this run (only rank 0's is written); a resumed run keeps its id
    stamp = state["stamp"] if state else None  # None too for a checkpoint saved before stamps
    run_id = stamp["run"] if stamp else uuid.uuid4().hex

    def checkpoint():  # on every rank
        save_run(s, out, raw_model, optimizer, batches, tokenizer, cluster, step, tokens_seen, run_id)
        saved.append(step)

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
        print(done_line(step, tokens_seen, first_loss, loss, ppl, time.time() - started, tokens_seen - start_tokens,
                        out))


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
