"""Checks of configuration values: what each key of a config.json may hold, and the helpers command lines share.

`LongLlamaConfig` (longllama.py) calls `validate_config` whenever a config is built, from a config.json, load()'s
overrides, a preset or a command line, so a value the model cannot run with is refused, naming its key, before any
tensor is allocated. `config_values` reads a Hugging Face config.json's keys; `check_can_compile` checks that
torch.compile can run here. Nothing here is FoT.
"""

import json
import math
import os
import warnings
from pathlib import Path

import torch

from quantize import QUANTIZATIONS, QUANTIZED_BYTES

# dtypes memory keys and values may be stored in: integer or bool storage would silently corrupt them
MEM_DTYPES = ("bfloat16", "float16", "float32", "float64")
# how mem_topk chooses the memory entries a query attends to (topk.py)
MEM_RETRIEVALS = ("blocks", "exact")
# No machine addresses more (x86-64 and arm64 use 48-bit virtual addresses): a config needing more is nonsense.
ADDRESSABLE_BYTES = 2**48
# Hugging Face config keys that change nothing here when they hold these values (and anything else is unsupported).
HF_REQUIRED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# Hugging Face config keys that carry no information for this model.
HF_BOOKKEEPING = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
                  "auto_map", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp", "head_dim"}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a number of layers


def is_number(value) -> bool:
    """A finite int or float: JSON and float() accept NaN and Infinity, which no setting can use."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int_list(value, low: int, high: float = math.inf) -> bool:
    """A list (or tuple) of integers in [low, high): a string such as "23" is not the list [2, 3]."""
    return isinstance(value, (list, tuple)) and all(is_int(v) and low <= v < high for v in value)


def is_llama3_scaling(value) -> bool:
    numbers = ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    return (isinstance(value, dict) and value.get("rope_type", value.get("type")) == "llama3"
            and all(is_number(value.get(key)) and value[key] > 0 for key in numbers)
            and value["low_freq_factor"] < value["high_freq_factor"])


def check_values(values: dict, rules, label=str):
    """Raise ValueError for the first value that breaks its rule, naming it with label(key).

    rules: (keys, test, what each must be), checked in order, so that a test may rely on the keys checked before it.
    """
    for keys, test, what in rules:
        for key in keys:
            if not test(values[key]):
                raise ValueError(f"{label(key)} must be {what}, got {values[key]!r}")


def validate_config(config):
    """Refuse, naming the key, any value of a LongLlamaConfig the model cannot run with."""
    heads, layers, vocab, window = (config.num_attention_heads, config.num_hidden_layers, config.vocab_size,
                                    config.max_position_embeddings)
    sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings"]
    check_values(vars(config), [
        (sizes, lambda v: is_int(v) and v > 0, "a positive integer"),
        (["num_key_value_heads"], lambda v: heads % v == 0, f"a divisor of num_attention_heads={heads}"),
        (["hidden_size"], lambda v: v % (2 * heads) == 0,
         f"divisible by num_attention_heads={heads} into an even head_dim (rotary embeddings turn pairs)"),
        (["rms_norm_eps", "rope_theta"], lambda v: is_number(v) and v > 0, "a positive finite number"),
        (["rope_scaling"], lambda v: v is None or is_llama3_scaling(v),
         'null or {"rope_type": "llama3", "factor", "low_freq_factor" < "high_freq_factor", '
         '"original_max_position_embeddings"} (positive numbers); other rope scalings are not supported'),
        (["tie_word_embeddings", "mem_positionals", "mem_on_host"], lambda v: isinstance(v, bool), "true or false"),
        (["bos_token_id", "eos_token_id"], lambda v: is_int(v) and 0 <= v < vocab,
         f"a token id in [0, vocab_size={vocab})"),
        # LLaMA configs write -1 or null for "no padding token"; the model itself never reads it
        (["pad_token_id"], lambda v: v is None or is_int(v), "null or an integer"),
        # duplicates are refused rather than merged: "6,12,12" is more likely a typo than a wish
        (["mem_layers"], lambda v: is_int_list(v, 0, layers) and len(set(v)) == len(v),
         f"a list of distinct layer indices in [0, num_hidden_layers={layers})"),
        (["mem_dtype"], lambda v: v in MEM_DTYPES, f"one of {', '.join(MEM_DTYPES)}"),
        (["mem_attention_grouping"], lambda v: v is None or (is_int_list(v, 1) and len(v) == 2),
         "null or two positive integers [heads, queries]"),
        # an entry count beyond int64 fails inside torch (OverflowError), not here
        (["mem_topk"], lambda v: v is None or (is_int(v) and 0 < v < 2**63), "null or a positive integer below 2**63"),
        (["mem_retrieval"], lambda v: v in MEM_RETRIEVALS, f"one of {', '.join(MEM_RETRIEVALS)}"),
        (["mem_block_size"], lambda v: is_int(v) and 0 < v < 2**63, "a positive integer below 2**63"),
        (["mem_attention_logn"], lambda v: v is None or (is_int(v) and 1 < v < 2**63),
         "null or an integer above 1 (the keys a memory-layer query attended to in training)"),
        (["mem_on_host"], lambda v: not v or config.mem_topk is not None,
         "false without mem_topk (memory attended whole is read whole at every call)"),
        (["last_context_length"], lambda v: v is None or (is_int(v) and 0 <= v <= window),
         f"null or an integer in [0, max_position_embeddings={window}]"),
        (["quantization"], lambda v: v is None or v in QUANTIZATIONS, f"null or one of {', '.join(QUANTIZATIONS)}"),
    ], label=lambda key: f"config: {key}")
    if model_bytes(config, torch.bfloat16) >= ADDRESSABLE_BYTES:
        raise ValueError(f"config: {config.num_parameters:.3g} weights and a window of {window} tokens are more "
                         f"than any machine can address (2**48 bytes)")


def model_bytes(config, dtype: torch.dtype) -> int:
    """Memory a loaded model takes: its weights in dtype and the float32 rotary tables (cos, sin: W x head_dim).
    Quantized, the linear layers (lm_head too, even when tied) take QUANTIZED_BYTES per weight: an estimate (low
    for an int4 checkpoint that holds some layers in int8, a kept GGUF Q4_K_M), which load() replaces by the
    stored checkpoint's own sizes (TensorFile.loaded_bytes)."""
    rope = config.rope_bytes
    if config.quantization is None:
        return config.num_parameters * dtype.itemsize + rope
    hidden, layers = config.hidden_size, config.num_hidden_layers
    floats = config.vocab_size * hidden + (2 * layers + 1) * hidden  # the embedding and the norms
    linear = config.num_parameters - floats + (config.vocab_size * hidden if config.tie_word_embeddings else 0)
    return int(floats * dtype.itemsize + linear * QUANTIZED_BYTES[config.quantization]) + rope


def config_values(values: dict, overrides: dict, known: set) -> dict:
    """The keys of a (Hugging Face) config dict that a LongLlamaConfig has (`known`), overrides applied: unknown
    keys are ignored with a warning, values this model does not support raise."""
    values = {**values, **overrides}
    if values.get("model_type", "llama") not in ("llama", "longllama"):
        raise ValueError(f"config: unsupported architecture model_type={values['model_type']!r} "
                         "(expected llama or longllama)")
    for key, supported in HF_REQUIRED_VALUES.items():
        if key in values and values[key] != supported:
            raise ValueError(f"config: {key}={values[key]!r} is not supported (only {supported!r})")
    if set(overrides) - known:  # a misspelt override is a mistake in the caller's code, not an old config file
        raise ValueError(f"config: unknown overrides {sorted(set(overrides) - known)}")
    unknown = sorted(set(values) - known - set(HF_REQUIRED_VALUES) - HF_BOOKKEEPING)
    if unknown:
        warnings.warn(f"config: ignoring unknown keys {unknown}")
    return {k: v for k, v in values.items() if k in known}


def read_config_json(path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # a hostile file nests deep
        raise ValueError(f"{path}: cannot read config ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: config must be a JSON object")
    return values


def check_can_compile(device: torch.device):
    """torch.compile's code for a CPU is C++, built by the compiler inductor looks for ($CXX, else g++): refuse in
    one line, before any work, where it is missing."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise ValueError(f"compiling on CPU needs a C++ compiler: {os.environ.get('CXX', 'g++')} does not run "
                         "(install g++ or set CXX)") from None
