"""Helpers the command-line scripts share: bad input ends with one line on stderr and a status, never a traceback
(`fail`, `as_command`); warnings are one plain line each (`warn`); the flags that choose how a checkpoint loads
(--quantize, --mem-topk and its retrieval settings); the compute dtype; a checkpoint and its tokenizer
(`load_checkpoint`); lengths in tokens such as 4k (`parse_length`). Nothing here is FoT.
"""

import sys
import warnings
from pathlib import Path

import torch

from checkpoint import load
from checks import MEM_RETRIEVALS
from quantize import QUANTIZATIONS
from tokenizer import checkpoint_tokenizer

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


def add_topk_arguments(p):
    """--mem-topk and how it retrieves, for every command that reads into memory."""
    p.add_argument("--mem-topk", type=int, default=None, metavar="K",
                   help="memory-layer queries attend to K memory entries, not all of memory: reading and answering "
                        "then cost far less than quadratic time, and memory is held in --mem-dtype (default: all)")
    p.add_argument("--mem-retrieval", default=None, choices=MEM_RETRIEVALS,
                   help="how --mem-topk chooses: blocks (scalable: the best blocks of --mem-block-size entries, by "
                        "bounds on their keys) or exact (the K best entries of each query: as slow as all of memory)")
    p.add_argument("--mem-block-size", type=int, default=None, metavar="N", help="entries per block (default: 64)")


def topk_overrides(args) -> dict:
    """The config overrides of add_topk_arguments' flags; retrieval settings without --mem-topk are refused."""
    given = {key: value for key in ("mem_topk", "mem_retrieval", "mem_block_size")
             if (value := getattr(args, key)) is not None}
    if given and "mem_topk" not in given:
        raise ValueError("--mem-retrieval and --mem-block-size choose how --mem-topk retrieves: add --mem-topk K")
    return given


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU and on a CPU that multiplies bfloat16 natively (AVX512-BF16 or AMX): measured at LongLLaMA-3B's
    width on an AVX512-BF16 CPU, it prefills 3-4x and decodes 1.8x as fast as float32. float32 on other CPUs, where
    bfloat16 matrix products are emulated: the same CPU limited to AVX2 prefills 3x slower in bfloat16."""
    if device.type == "cuda":
        return torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def load_checkpoint(ckpt, tokenizer_override, device, dtype, **overrides):
    """(model, tokenizer) of a checkpoint directory, refused with one line when missing or mismatched; overrides:
    load()'s (config keys, quantize)."""
    if not Path(ckpt).is_dir():
        raise ValueError(f"checkpoint directory {ckpt} does not exist")
    tokenizer = checkpoint_tokenizer(ckpt, tokenizer_override)
    model = load(ckpt, device=device, dtype=dtype, **overrides)
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
    return value
