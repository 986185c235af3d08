"""Convert checkpoints: Hugging Face LongLLaMA / LLaMA / Llama-3 or GGUF in, this project's checkpoint out, and back out
to Hugging Face or GGUF.

    python convert_weights.py long_llama_3b_v1_1/ ckpt/    # HF directory: *.bin or *.safetensors, sharded or not
    python convert_weights.py open_llama_3b_v2/ ckpt/ --mem-layers 6,12,18    # plain LLaMA, given memory layers
    python convert_weights.py long_llama_3b_v1_1.Q4_0.gguf ckpt/   # GGUF alone: its vocabulary becomes the tokenizer
    python convert_weights.py ckpt/ ckpt-int8/ --quantize int8      # a quantized checkpoint (also from HF or GGUF)
    python convert_weights.py ckpt/ hf/ --to hf            # back to the Hugging Face layout
    python convert_weights.py ckpt/ model.gguf --to gguf --type q8_0    # a LLaMA GGUF for llama.cpp-compatible tools

Options: --dtype float32|float16|bfloat16 casts (default: keep the source's dtype; GGUF dequantizes to float32;
quantized checkpoints keep their embedding and norms in bfloat16), --quantize int8|int4 stores the linear layers
quantized (a quantized GGUF stays quantized unless --dtype asks for floats: 4-bit blocks as int4, other types as
int8), --type f16|q8_0|f32 stores GGUF matrices (int8 weights become Q8_0 as they are), --mem-layers /
--last-context-length override the memory settings (plain LLaMA has none), --tokenizer PATH uses that
tokenizer.model or tokenizer.json (default: SRC's, or the one a GGUF file holds), --force replaces a non-empty OUT.

Converting is renaming plus fusing, driven by one table (LAYER_NAMES, MODEL_NAMES): q/k/v become one `wqkv` matrix and
gate/up one `gate_up` matrix, as in gpt-fast. Hugging Face checkpoints already use the rotate-half RoPE layout; GGUF
files hold q/k rows permuted by llama.cpp's converter, which `unpermute_rope_rows` undoes (`permute_rope_rows` on the
way out). A GGUF file's vocabulary (tokenizer.ggml.*) is rebuilt into the file it came from, tokenizer.model or
tokenizer.json; memory layers, which GGUF has no keys for, travel as longllama.* metadata. Every tensor is checked
against the config as it is read, and OUT appears only once complete. Converting into our layout holds one tensor at
a time (written as it comes, quantized a few rows at a time), not the model.
"""

import argparse
import functools
import json
import os
import pickle
import shutil
import struct
import sys
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from checkpoint import available_bytes, write_atomically
from checks import model_bytes
from cli import fail
from longllama import LongLlamaConfig
from quantize import (INT4_GROUP, QUANTIZATIONS, QUANTIZED_CHUNK, QuantizedWeight, check_stored_weight, int4_fits,
                      pack_nibbles, quantize_rows)
from tokenizer import (NORMAL, TOKENIZER_CONFIG, TOKENIZER_FILES, UNUSED, BPETokenizer, Tokenizer, bpe_tokenizer_json,
                       bpe_vocabulary, open_tokenizer, read_tokenizer_config, sentencepiece_model,
                       sentencepiece_vocabulary, tokenizer_file)

# One row per tensor of a layer: our name, its Hugging Face name (under "model.layers.{i}."), its GGUF name (under
# "blk.{i}."), and its shape in config sizes. Rows that share our name are fused along dim 0, in table order.
LAYER_NAMES = [
    ("attention.wqkv.weight", "self_attn.q_proj.weight", "attn_q.weight", ("q", "hidden")),
    ("attention.wqkv.weight", "self_attn.k_proj.weight", "attn_k.weight", ("kv", "hidden")),
    ("attention.wqkv.weight", "self_attn.v_proj.weight", "attn_v.weight", ("kv", "hidden")),
    ("attention.wo.weight", "self_attn.o_proj.weight", "attn_output.weight", ("hidden", "q")),
    ("mlp.gate_up.weight", "mlp.gate_proj.weight", "ffn_gate.weight", ("ffn", "hidden")),
    ("mlp.gate_up.weight", "mlp.up_proj.weight", "ffn_up.weight", ("ffn", "hidden")),
    ("mlp.down.weight", "mlp.down_proj.weight", "ffn_down.weight", ("hidden", "ffn")),
    ("attention_norm.weight", "input_layernorm.weight", "attn_norm.weight", ("hidden",)),
    ("mlp_norm.weight", "post_attention_layernorm.weight", "ffn_norm.weight", ("hidden",)),
]
MODEL_NAMES = [
    ("embed.weight", "model.embed_tokens.weight", "token_embd.weight", ("vocab", "hidden")),
    ("norm.weight", "model.norm.weight", "output_norm.weight", ("hidden",)),
    ("lm_head.weight", "lm_head.weight", "output.weight", ("vocab", "hidden")),  # absent when tied to the embedding
]
# the linear layers' weights (the embedding is a lookup table)
LINEAR_NAMES = {ours for ours, _, _, shape in LAYER_NAMES + MODEL_NAMES if len(shape) == 2} - {"embed.weight"}
# config.json "architectures" -> "model_type", both ways
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "LongLlamaForCausalLM": "longllama"}
# GGUF types whose blocks are an int4 QuantizedWeight in groups of 32, exactly (see gguf_int4_weight); others become
# int8 (Q8_0, Q5_*, Q6_K: 5 or more bits) when a quantized GGUF converts to a quantized checkpoint
GGUF_INT4 = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K)
GGUF_FLOATS = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
# the dtype of a quantized checkpoint's float tensors (embedding, norms) unless --dtype says otherwise: the kernels'
# activation dtype
QUANTIZED_FLOATS = torch.bfloat16
# --to gguf --type: what matrices are stored as
GGUF_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
LLAMA_FILE_TYPES = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
                    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
                    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
# Memory settings, which GGUF has no keys for: written and read here as longllama.{key}.
MEMORY_KEYS = ("mem_layers", "mem_positionals", "mem_dtype", "mem_attention_grouping", "last_context_length")
# GGUF files without them: the published LongLLaMA models, known by general.name (lowercase letters and digits only).
KNOWN_LONGLLAMA = {"longllama3b": [6, 12, 18], "longllamacode7b": [8, 16, 24]}
# Tried in this order: safetensors first (same tensors, no pickle).
HF_WEIGHT_FILES = ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin"]


class Part(NamedTuple):
    """One Hugging Face / GGUF tensor: part of (or all of) our tensor `ours`."""

    ours: str
    hf: str
    gguf: str
    shape: tuple


def tensor_parts(config: LongLlamaConfig) -> dict:
    """Our tensor name -> its parts in fusing order, with names and exact shapes filled in for this config."""
    size = dict(vocab=config.vocab_size, hidden=config.hidden_size, ffn=config.intermediate_size,
                q=config.num_attention_heads * config.head_dim, kv=config.num_key_value_heads * config.head_dim)
    rows = [row for row in MODEL_NAMES if not (row[0] == "lm_head.weight" and config.tie_word_embeddings)]
    rows += [(f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", f"blk.{i}.{gguf_name}", shape)
             for i in range(config.num_hidden_layers) for ours, hf, gguf_name, shape in LAYER_NAMES]
    parts = defaultdict(list)
    for ours, hf, gguf_name, shape in rows:
        parts[ours].append(Part(ours, hf, gguf_name, tuple(size[s] for s in shape)))
    return dict(parts)


def first_names(names) -> str:
    """For messages: the first three names, and "..." when there are more."""
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


class GGUFMatrix(NamedTuple):
    """A GGUF matrix as its file stores it: the bytes of each row (uint8 [rows, bytes of a row]: GGUF's blocks run
    along a row, so rows can be reordered and cut like a float matrix's) and their type. It is dequantized a few rows
    at a time where it is used (`float_chunks`), so that converting never holds more than a chunk of it in float32."""

    data: torch.Tensor
    qtype: gguf.GGMLQuantizationType
    columns: int

    @property
    def shape(self) -> tuple:
        return self.data.shape[0], self.columns

    def map(self, fn) -> "GGUFMatrix":
        """The same matrix with fn applied to its rows (a reordering)."""
        return self._replace(data=fn(self.data))

    def dequantize(self, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows start:stop as float32 [rows, columns], as the gguf package dequantizes them."""
        rows = self.data[start:stop]
        return torch.from_numpy(gguf.quants.dequantize(rows.numpy(), self.qtype)).view(rows.shape[0], self.columns)


def check_tensor(name: str, tensor, shape: tuple, source):
    if isinstance(tensor, QuantizedWeight):
        check_stored_weight(tensor, shape, None, f"{source}: {name}")
        return
    if not (isinstance(tensor, GGUFMatrix) or isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
        raise ValueError(f"{source}: {name} is not a floating-point tensor")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, but the config implies {shape}")


def fuse(tensors, parts: dict, dtype, source, quantize: Optional[str] = None, floats=frozenset()):
    """Yield our tensors (name, tensor or QuantizedWeight) from a stream of (Hugging Face name, tensor,
    QuantizedWeight or GGUFMatrix), each checked against the config, each as soon as its parts are in. With
    quantize, linear layers' weights are QuantizedWeights (see `join`), except those named in floats. A part
    missing is found, and raised, at the end of the stream: a writer must not keep what it wrote before then.

    q/k/v (or gate/up) of a layer may sit in different shards: a part waits only until its siblings arrive, so memory
    holds the parts waiting plus the tensor being written, never the whole input or the whole output.
    """
    part_of = {part.hf: part for group in parts.values() for part in group}
    waiting, done = {}, set()
    for name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers versions saved; derived from rope_theta
        part = part_of.get(name)
        if part is None:
            raise ValueError(f"{source}: unexpected tensor {name}")
        if name in waiting or part.ours in done:
            raise ValueError(f"{source}: tensor {name} appears twice")
        check_tensor(name, tensor, part.shape, source)
        scheme = quantize if is_linear(part.ours) and part.ours not in floats else None
        waiting[name] = tensor if scheme or not isinstance(tensor, torch.Tensor) else tensor.to(dtype=dtype)
        del tensor  # held in waiting only: freed once joined and written
        group = parts[part.ours]
        if all(p.hf in waiting for p in group):
            done.add(part.ours)
            yield part.ours, join([waiting.pop(p.hf) for p in group], scheme, dtype)  # [sum of part rows, columns]
    missing = [p.hf for ours, group in parts.items() if ours not in done for p in group if p.hf not in waiting]
    if missing:
        raise ValueError(f"{source}: missing tensors {first_names(missing)}")


def is_linear(ours: str) -> bool:
    """Whether our tensor is a linear layer's weight, which a quantized checkpoint stores quantized."""
    return (ours.split(".", 2)[2] if ours.startswith("layers.") else ours) in LINEAR_NAMES


def join(pieces: list, scheme: Optional[str], dtype):
    """One of our tensors from its parts along dim 0 (q/k/v, gate/up; a single part is copied, so that every output
    tensor owns its memory).

    scheme None: a float tensor in dtype (None: float32, for a GGUFMatrix). "int8" / "int4": a QuantizedWeight
    (int4 in groups of 64, int8 where the kernel cannot take the whole weight); "keep" (GGUF): int8, unless every
    part is already int4 in one group size. Parts already quantized alike (GGUF 4-bit blocks) keep their values;
    others are quantized from the source's precision a few rows at a time (QUANTIZED_CHUNK weights), part by part:
    each row is quantized on its own, so the result is that of the whole weight, without a float copy of it."""
    quantized = [p for p in pieces if isinstance(p, QuantizedWeight)]
    layouts = {(p.scheme, p.scales.shape[1:]) for p in quantized}
    if scheme and len(quantized) == len(pieces) and len(layouts) == 1 and scheme in ("keep", pieces[0].scheme):
        return QuantizedWeight.cat(pieces)
    if scheme is None and all(isinstance(p, torch.Tensor) for p in pieces):
        return torch.cat([p.to(dtype=dtype) for p in pieces])
    rows, columns = sum(p.shape[0] for p in pieces), pieces[0].shape[1]
    if scheme is None:
        out, row = torch.empty(rows, columns, dtype=dtype or torch.float32), 0
        for chunk in (chunk for piece in pieces for chunk in float_chunks(piece)):
            out[row:row + chunk.shape[0]] = chunk
            row += chunk.shape[0]
        return out
    target = "int8" if scheme == "keep" or not int4_fits(rows, columns, INT4_GROUP) else scheme
    chunks = [quantize_rows(chunk, target) for piece in pieces for chunk in float_chunks(piece)]
    return QuantizedWeight.cat(chunks)


def float_chunks(piece):
    """The rows of a float tensor (as they are), QuantizedWeight or GGUFMatrix (dequantized to float32), a few at a
    time: QUANTIZED_CHUNK weights."""
    rows, columns = piece.shape
    step = max(1, QUANTIZED_CHUNK // max(columns, 1))
    for start in range(0, rows, step):
        if isinstance(piece, GGUFMatrix):
            yield piece.dequantize(start, start + step)
        elif isinstance(piece, QuantizedWeight):
            yield piece.map(lambda part: part[start:start + step]).dequantize()
        else:
            yield piece[start:start + step]


def split_rows(tensor, sizes: list) -> list:
    """A tensor or QuantizedWeight cut along dim 0 into pieces of these row counts (views)."""
    if isinstance(tensor, QuantizedWeight):
        return [QuantizedWeight(*parts) for parts in zip(*(
            [None] * len(sizes) if part is None else part.split(sizes) for part in tensor))]
    return list(tensor.split(sizes))


def rope_heads(part: Part, config: LongLlamaConfig) -> Optional[int]:
    """The heads whose rows llama.cpp reorders in a GGUF tensor (q: all heads, k: key/value heads), or None."""
    kind = part.gguf.split(".", 2)[-1]
    return {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}.get(kind)


def permute_rope_rows(weight, heads: int):
    """llama.cpp's reordering of q/k rows (see unpermute_rope_rows): each head's [2, D/2] rows become [D/2, 2]."""
    if isinstance(weight, QuantizedWeight):
        return weight.map(lambda part: permute_rope_rows(part, heads))
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def unpermute_rope_rows(weight, heads: int):
    """Undo llama.cpp's reordering of q/k rows [heads * D, columns] back to Hugging Face's rotate-half layout.

    RoPE rotates pairs of coordinates. In HF's rotate-half layout row j of a head pairs with row j + D/2; ggml rotates
    adjacent rows 2j, 2j+1. So llama.cpp's HF->GGUF converter (`LlamaModel.permute`) reorders each head's rows with
    `w.reshape(heads, 2, D/2, cols).swapaxes(1, 2)`: GGUF row 2j+t is HF row t*D/2 + j. The inverse views the rows as
    [heads, D/2, 2] and swaps back. k uses the number of key/value heads. A QuantizedWeight's parts are all indexed
    by row first: each is reordered alike; a GGUFMatrix's rows of bytes are reordered as they are.
    """
    if isinstance(weight, (QuantizedWeight, GGUFMatrix)):
        return weight.map(lambda part: unpermute_rope_rows(part, heads))
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------------------------------------------------
# Reading sources


def read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands deep
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return values


def build_config(values: dict, mem_layers, last_context_length, source) -> LongLlamaConfig:
    """Our config from Hugging Face config keys; mem_layers / last_context_length (when not None) override them."""
    architectures = values.get("architectures") or []
    if not all(a in HF_ARCHITECTURES for a in architectures):
        raise ValueError(f"{source}: unsupported architecture {architectures} "
                         f"(expected one of {list(HF_ARCHITECTURES)})")
    values = dict(values)
    if mem_layers is not None:
        values["mem_layers"] = mem_layers
    if last_context_length is not None:
        values["last_context_length"] = last_context_length
    try:
        return LongLlamaConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def load_config(directory: Path, mem_layers, last_context_length) -> LongLlamaConfig:
    if not directory.is_dir():
        raise ValueError(f"{directory}: {'not a' if directory.exists() else 'no such'} directory")
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no config.json")
    return build_config(read_json(path), mem_layers, last_context_length, path)


def hf_weight_files(src: Path) -> list:
    """The weight files of a Hugging Face directory: one file, or the shards its index lists."""
    for name in HF_WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        # shard names are plain file names inside src; anything else is a malformed (or hostile) index
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f and Path(f).name == f
                                                       for f in weight_map.values()):
            raise ValueError(f"{path}: malformed index (expected a weight_map of tensor name -> shard file name)")
        shards = [src / f for f in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.is_file():
                raise ValueError(f"{path}: lists shard {shard.name}, which does not exist")
        return shards
    raise ValueError(f"{src}: no weights (expected one of {', '.join(HF_WEIGHT_FILES)})")


def read_weights(path: Path):
    """Yield (name, tensor) from a .safetensors or pickled .bin file, one tensor at a time where the format allows."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)  # builds tensors only, never runs pickled code
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused by torch.load(weights_only=True): not a plain dict of tensors "
                         "(damaged, or it would run code when unpickled)") from None
    except Exception as e:  # a damaged file fails in many ways: SafetensorError, OSError, EOFError, KeyError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "truncated or damaged"
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    while state:
        yield state.popitem()  # popped, so each input tensor is freed once fused


def read_gguf(path: Path):
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... on damaged files
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


MISSING = object()  # gguf_value's default: the key is required


def gguf_value(reader, key: str, source, default=MISSING):
    """A metadata value as Python: numbers, strings, lists (arrays); a float32 as its shortest decimal (1e-06)."""
    found = reader.get_field(key)
    if found is None:
        if default is MISSING:
            raise ValueError(f"{source}: metadata {key} is missing")
        return default
    try:
        value = found.contents()
    except UnicodeDecodeError:
        raise ValueError(f"{source}: metadata {key} is not UTF-8 text") from None
    if found.types == [gguf.GGUFValueType.FLOAT32]:
        value = float(str(np.float32(value)))
    return value


def gguf_config_values(reader, source) -> dict:
    """Hugging Face config keys from the llama.* metadata llama.cpp's converter wrote from config.json."""

    def field(key, default=MISSING):
        value = gguf_value(reader, key, source, default)
        if isinstance(value, list):
            raise ValueError(f"{source}: per-layer {key} is not supported")
        return value

    architecture = field("general.architecture")
    if architecture != "llama":
        raise ValueError(f"{source}: architecture {architecture!r} is not supported (only llama)")
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError(f"{source}: missing tensor token_embd.weight")
    heads, hidden = field("llama.attention.head_count"), field("llama.embedding_length")
    if field("llama.rope.dimension_count", hidden // heads) != hidden // heads:
        raise ValueError(f"{source}: partial rotary embeddings (llama.rope.dimension_count) are not supported")
    if field("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{source}: rope scaling {field('llama.rope.scaling.type')!r} is not supported")
    return dict(
        vocab_size=int(embedding.shape[-1]),  # GGUF lists dimensions innermost first: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=field("llama.feed_forward_length"),
        num_hidden_layers=field("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=field("llama.attention.head_count_kv", heads),
        rms_norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=field("llama.rope.freq_base", 10000.0),
        max_position_embeddings=field("llama.context_length"),  # for a LongLLaMA GGUF: the window, e.g. 2048
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=field("tokenizer.ggml.bos_token_id", LongLlamaConfig.bos_token_id),
        eos_token_id=field("tokenizer.ggml.eos_token_id", LongLlamaConfig.eos_token_id),
        pad_token_id=field("tokenizer.ggml.padding_token_id", LongLlamaConfig.pad_token_id),
    )


def gguf_memory_settings(reader, source) -> dict:
    """The memory settings of a GGUF file (not a GGUF concept): the longllama.* keys export_gguf writes, else the
    memory layers of the published LongLLaMA model general.name names, else none ({})."""
    ours = {key: value for key in MEMORY_KEYS if (value := gguf_value(reader, f"longllama.{key}", source, None))
            is not None}
    if ours:  # written by export_gguf, which always writes last_context_length: a key left out was [] or null
        return {"mem_layers": [], **ours}
    name = str(gguf_value(reader, "general.name", source, ""))
    spelled = "".join(c for c in name.lower() if c.isalnum())  # "LongLLaMA-3Bv1.1", "long_llama_3b_v1_1" alike
    for prefix, mem_layers in KNOWN_LONGLLAMA.items():
        if spelled.startswith(prefix):
            print(f"{source}: general.name {name!r} is a LongLLaMA model: memory layers {mem_layers} "
                  "(--mem-layers overrides)", file=sys.stderr)
            return {"mem_layers": mem_layers}
    return {}


def gguf_tokenizer_files(reader, config: LongLlamaConfig, source) -> dict:
    """{file name: bytes}: the tokenizer llama.cpp's converter stored in tokenizer.ggml.*, rebuilt as the file it came
    from (SentencePiece "llama": tokenizer.model; byte-level BPE "gpt2": tokenizer.json), and a tokenizer_config.json
    naming BOS and EOS, with the chat template when the file has one. {} when the file holds no vocabulary."""
    model = gguf_value(reader, "tokenizer.ggml.model", source, None)
    if model is None:
        return {}
    tokens = gguf_value(reader, "tokenizer.ggml.tokens", source)
    types = gguf_value(reader, "tokenizer.ggml.token_type", source, [NORMAL] * len(tokens))
    if not len(tokens) == len(types) == config.vocab_size:
        raise ValueError(f"{source}: the vocabulary has {len(tokens)} tokens ({len(types)} token types), "
                         f"the embedding {config.vocab_size} rows")
    if model == "llama":
        # llama.cpp's defaults for keys its LLaMA converter does not write
        files = {"tokenizer.model": sentencepiece_model(
            tokens, gguf_value(reader, "tokenizer.ggml.scores", source), types, config.bos_token_id,
            config.eos_token_id, add_dummy_prefix=gguf_value(reader, "tokenizer.ggml.add_space_prefix", source, True),
            remove_extra_whitespaces=gguf_value(reader, "tokenizer.ggml.remove_extra_whitespaces", source, False))}
    elif model == "gpt2":
        files = {"tokenizer.json": bpe_tokenizer_json(
            tokens, types, gguf_value(reader, "tokenizer.ggml.merges", source),
            gguf_value(reader, "tokenizer.ggml.pre", source), source).encode()}
    else:
        raise ValueError(f"{source}: tokenizer {model!r} is not supported (only llama and gpt2)")
    tokenizer_config = {"bos_token": tokens[config.bos_token_id], "eos_token": tokens[config.eos_token_id]}
    chat_template = gguf_value(reader, "tokenizer.chat_template", source, None)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    files[TOKENIZER_CONFIG] = (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode()
    return files


def gguf_int4_parts(reader, parts: dict) -> set:
    """The Hugging Face names of the GGUF matrices that become int4 weights value for value: the parts of a linear
    layer all of whose parts are 4-bit blocks (Q4_0, Q4_1, Q4_K), over rows the int4 kernel takes (a multiple of 16,
    fused). A layer fused from 4-bit and other parts becomes int8 as a whole (see join)."""
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    kept = set()
    for ours, group in parts.items():
        rows, columns = sum(p.shape[0] for p in group), group[0].shape[-1]
        if is_linear(ours) and int4_fits(rows, columns, 32) and all(types.get(p.gguf) in GGUF_INT4 for p in group):
            kept.update(p.hf for p in group)
    return kept


def gguf_tensors(reader, parts: dict, config: LongLlamaConfig, source, int4_parts=frozenset()):
    """Yield (Hugging Face name, tensor) for each GGUF tensor, q/k rows back in HF order: 1-D tensors (norms) in
    float32, the matrices named in int4_parts (see gguf_int4_parts) as the int4 QuantizedWeight their 4-bit blocks
    are, every other matrix as a GGUFMatrix (its bytes, dequantized where used). A GGUF tensor that is the part of
    several (the tied embedding: embed.weight and a quantized lm_head) is read once.

    Each tensor's bytes are read from the file, not through the reader's mapping of it: the pages of a mapping stay
    resident once read, and converting would then hold the whole file besides what it writes."""
    part_of = defaultdict(list)
    for part in (part for group in parts.values() for part in group):
        part_of[part.gguf].append(part)
    with open(reader.data.filename, "rb") as file:
        for tensor in tqdm(reader.tensors, desc="reading", unit="tensor", disable=None, leave=False):
            if tensor.name == "rope_freqs.weight":  # what llama.cpp writes for Llama-3.1's rope_scaling
                raise ValueError(f"{source}: rope frequency factors (rope_freqs.weight, Llama-3.1 rope scaling) are "
                                 "not supported from GGUF: convert the Hugging Face checkpoint instead")
            if tensor.name not in part_of:
                raise ValueError(f"{source}: unexpected tensor {tensor.name}")
            data = gguf_bytes(file, tensor, source)
            for part in part_of[tensor.name]:
                if part.hf in int4_parts:
                    weight = gguf_int4_rows(data, tensor.tensor_type)
                else:
                    weight = GGUFMatrix(data, tensor.tensor_type, int(tensor.shape[0]))
                    try:
                        weight.dequantize(0, 1)  # an unknown type is refused now, not once every tensor is read
                    except NotImplementedError:
                        raise ValueError(f"{source}: {tensor.name} is stored as {tensor.tensor_type.name}, which "
                                         "the gguf package cannot dequantize") from None
                    if len(part.shape) == len(tensor.shape) == 1:  # a norm: float32 [hidden]
                        weight = weight.dequantize().view(-1)
                check_tensor(tensor.name, weight, part.shape, source)
                heads = rope_heads(part, config)
                yield part.hf, weight if heads is None else unpermute_rope_rows(weight, heads)
            del data


def gguf_bytes(file, tensor, source) -> torch.Tensor:
    """A GGUF tensor's bytes as uint8 [rows, bytes of a row] (GGUF lists dimensions innermost first)."""
    data = torch.empty(tensor.n_bytes, dtype=torch.uint8)
    file.seek(tensor.data_offset)
    if file.readinto(memoryview(data.numpy())) != tensor.n_bytes:
        raise ValueError(f"{source}: {tensor.name} is cut short")
    rows = int(np.prod(tensor.shape[1:], dtype=np.int64))
    return data.view(rows, -1)


def gguf_int4_rows(data: torch.Tensor, qtype) -> QuantizedWeight:
    """gguf_int4_weight of a matrix's bytes, a few rows at a time (its unpacked values take 2 bytes a weight)."""
    step = max(1, QUANTIZED_CHUNK // max(data.shape[1], 1))
    chunks = [gguf_int4_weight(data[start:start + step].numpy(), qtype) for start in range(0, data.shape[0], step)]
    return QuantizedWeight.cat(chunks)


def gguf_int4_weight(data: np.ndarray, qtype) -> QuantizedWeight:
    """A matrix of GGUF 4-bit blocks (uint8 [rows, bytes of a row]) as an int4 QuantizedWeight in groups of 32, value
    for value. Each block of 32 weights holds 4-bit values q in [0, 15] and w = d (q - 8) (Q4_0), d q + m (Q4_1), or
    d sc q - dmin m with 6-bit sc, m per block, 8 blocks sharing d and dmin (Q4_K): so that, in this project's
    (q - 8) scale + zero, scale is d (or d sc) and zero is 0, m + 8 d or 8 d sc - dmin m. Only rounding scale and zero to
    bfloat16, which the kernel takes, changes a weight: by a few hundredths of a step."""
    rows = data.shape[0]
    half = lambda raw: raw.copy().view(np.float16).astype(np.float32)  # [..., 2] bytes -> [..., 1]
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        blocks = data.reshape(rows, -1, 144)  # d, dmin, 12 bytes of packed sc and m, 128 bytes of values
        d, dmin = half(blocks[..., 0:2]), half(blocks[..., 2:4])
        sc, m = (x.reshape(rows, -1, 8).astype(np.float32)
                 for x in gguf.quants.Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12)))
        scale, zero = d * sc, 8 * d * sc - dmin * m  # [rows, super-blocks, 8]
        packed = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # 4 x 32 bytes: the low nibbles of 32 bytes are one
        values = np.concatenate([packed & 15, packed >> 4], axis=3)  # block, the high nibbles the next one
    else:
        header = 2 if qtype == gguf.GGMLQuantizationType.Q4_0 else 4
        blocks = data.reshape(rows, -1, header + 16)  # d (and m), 16 bytes: values 0-15 low nibbles, 16-31 high
        d = half(blocks[..., 0:2])
        scale, zero = d, (np.zeros_like(d) if header == 2 else half(blocks[..., 2:4]) + 8 * d)
        packed = blocks[..., header:]
        values = np.concatenate([packed & 15, packed >> 4], axis=-1)
    values = torch.from_numpy(values.reshape(rows, -1))
    bf16 = lambda x: torch.from_numpy(np.ascontiguousarray(x).reshape(rows, -1)).to(torch.bfloat16)
    return QuantizedWeight(pack_nibbles(values), bf16(scale), bf16(zero))


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def check_out_dir(out_dir: Path, force: bool):
    """Refuse early (before reading gigabytes) to replace something that is not ours to replace, or to write where
    no directory can be made."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "exists" if existing == out_dir else f"{existing} exists"
        raise ValueError(f"{out_dir}: {where} and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"{out_dir}: exists and is not empty (--force replaces it)")


def check_fits_in_memory(config: LongLlamaConfig, dtype, source):
    """load() will need the converted weights in memory with the rotary tables of the window (converting holds
    one tensor at a time, but a checkpoint that cannot load is of no use): refuse, before reading, a config that
    cannot fit (the source's dtype is only known once read: at least 2 bytes per weight). A window too long to load
    (max_position_embeddings) is refused here, not at load time."""
    needed, available = model_bytes(config, dtype or torch.bfloat16), available_bytes(torch.device("cpu"))
    if needed > available:
        window, rope = config.max_position_embeddings, 2 * config.max_position_embeddings * config.head_dim * 4
        why = (f" (max_position_embeddings={window}: the rotary tables of that window alone take "
               f"{rope / 2**30:.1f} GiB)" if rope > needed / 2 else "")
        raise ValueError(f"{source}: the converted model needs at least {needed / 2**30:.1f} GiB of memory, "
                         f"{available / 2**30:.1f} GiB are free{why}")


def weight_names(src: Path) -> Optional[list]:
    """The tensor names of SRC/model.safetensors; None when there is none, or it cannot be read (reading it later
    says why)."""
    try:
        with safe_open(str(src / "model.safetensors"), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError):
        return None


def is_ours(src: Path) -> bool:
    """Whether SRC is one of this project's checkpoint directories (a model.safetensors with our tensor names)."""
    names = weight_names(src) if src.is_dir() else None
    return bool(names) and "embed.weight" in names


def check_ours(src: Path, target: str):
    """--to hf / gguf converts this project's checkpoints: say so when SRC is a Hugging Face one."""
    names = weight_names(src) or []
    hf_only = not (src / "model.safetensors").is_file() and any((src / name).is_file() for name in HF_WEIGHT_FILES)
    if hf_only or any(name.startswith("model.") for name in names):
        raise ValueError(f"{src} is a Hugging Face checkpoint, and --to {target} converts this project's: convert it "
                         f"to one first (python convert_weights.py {src} OUT)")


def check_out_file(out_path: Path, force: bool):
    """As check_out_dir, for a single file (a GGUF export)."""
    existing = next(p for p in out_path.parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{out_path}: {existing} exists and is not a directory")
    if out_path.is_dir() or (out_path.exists() and not force):
        raise ValueError(f"{out_path}: exists{' and is a directory' if out_path.is_dir() else ' (--force replaces it)'}")


def source_tokenizer(path, src_dir) -> Optional[Tokenizer]:
    """The tokenizer to carry over: the one given (--tokenizer), else the source directory's, else None. A damaged
    file is refused now, rather than found by generate.py in the finished checkpoint."""
    path = path or (src_dir and tokenizer_file(src_dir))
    return open_tokenizer(path) if path else None


def tokenizer_bytes(tok: Optional[Tokenizer]) -> dict:
    """{checkpoint file name: content} of a tokenizer's files (tokenizer.model or .json, tokenizer_config.json)."""
    return {name: path.read_bytes() for name, path in tok.files.items()} if tok else {}


def write_checkpoint(out_dir: Path, config: dict, state, tokenizer_files: dict, count: Optional[int] = None):
    """Write config.json, model.safetensors and the tokenizer's files into a temporary sibling, then rename it to
    out_dir: out_dir never holds half a checkpoint, and an old out_dir (empty, or --force) is replaced only once the
    new is complete. state: a dict of tensors (or QuantizedWeights), or a stream of (name, tensor) pairs (count
    of them, where known), written one at a time as they come: converting then holds one tensor, not the model."""
    made = [p for p in out_dir.parents if not p.exists()]  # the folders made for out_dir, removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        items = state.items() if isinstance(state, dict) else state
        count = len(state) if isinstance(state, dict) else count
        write_safetensors(tmp / "model.safetensors", stored_tensors(items), {"format": "pt"},
                          header_room(3 * (count or 1000)))  # a quantized weight: 3 tensors at most
        for name, content in tokenizer_files.items():
            (tmp / name).write_bytes(content)
        if tokenizer_files:
            open_tokenizer(tokenizer_file(tmp))  # a rebuilt tokenizer is checked by its own library before it counts
        if out_dir.exists():
            old = tmp.with_name(f"{tmp.name}.old")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # warnings come after the work, so that a failed conversion reports its error alone
    if not tokenizer_files:
        warnings.warn(f"{out_dir} has no {' or '.join(TOKENIZER_FILES)} (generate.py needs one): pass --tokenizer PATH")


def checkpoint_tensors(path: Path):
    """Yield (name, tensor) from our model.safetensors, a quantized linear layer's parts ({layer}.weight, .scales,
    .zeros) as one QuantizedWeight under {layer}.weight."""
    if not path.is_file():
        raise ValueError(f"{path.parent}: no model.safetensors")
    tensors = dict(read_weights(path))  # memory-mapped by safetensors: read as they are used
    for name in [n for n in tensors if not n.endswith((".scales", ".zeros"))]:
        layer = name.removesuffix(".weight")
        if f"{layer}.scales" in tensors:
            yield name, QuantizedWeight(tensors.pop(name), tensors.pop(f"{layer}.scales"),
                                        tensors.pop(f"{layer}.zeros", None))
        else:
            yield name, tensors.pop(name)
    if tensors:
        raise ValueError(f"{path}: unexpected tensors {first_names(list(tensors))}")


def stored_tensors(items):
    """Yield the tensors of (name, tensor) pairs as safetensors stores them: a QuantizedWeight under {layer}.weight
    as its parts {layer}.weight, .scales and (int4) .zeros."""
    for name, tensor in items:
        if isinstance(tensor, QuantizedWeight):
            layer = name.removesuffix(".weight")
            yield from ((f"{layer}.{part}", value) for part, value in zip(("weight", "scales", "zeros"), tensor)
                        if value is not None)
        else:
            yield name, tensor


# torch dtype -> the name safetensors' header gives it
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
DATA_ALIGNMENT = 64  # the tensors' bytes start at a multiple of this: the int8 kernel reads weights in place only there
SMALL_TENSOR = 1 << 20  # bytes: a tensor smaller than this, not a multiple of DATA_ALIGNMENT long, is written last


def header_room(count: int) -> int:
    """Bytes kept for a safetensors header of `count` tensors: one entry, {"layers.123.attention.wqkv.scales":
    {"dtype":"BF16","shape":[...],"data_offsets":[...,...]}}, takes about 120 bytes; 256 each leaves room for long
    names and large numbers (and write_safetensors makes room where it runs out)."""
    return 256 * count + 1024


def write_safetensors(path: Path, tensors, metadata: dict, room: int):
    """Write (name, tensor) pairs to a safetensors file one tensor at a time, so that the whole state is never in
    memory at once (safetensors' save_file takes every tensor at once).

    The format: an 8-byte little-endian length N, N bytes of a JSON header {name: {"dtype", "shape", "data_offsets":
    [begin, end]} (offsets from the end of the header), "__metadata__": {str: str}}, then every tensor's bytes, one
    after another with no gaps. The bytes are written first, after `room` bytes left for the header, which is
    written last, padded with spaces (as safetensors pads its own) to end at a multiple of DATA_ALIGNMENT; a
    header longer than the room is written before a copy of the bytes instead. Small tensors (norms, scales) whose
    size would shift the next tensor off DATA_ALIGNMENT are held back and written last, so that large weights
    of whole multiples of it (int8 weights: rows of a multiple of 64 columns) start aligned."""
    room += -(8 + room) % DATA_ALIGNMENT
    entries, held, names, offset = {}, [], set(), 0
    with open(path, "wb") as f:
        f.seek(8 + room)

        def write(name, tensor):
            nonlocal offset
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: {tensor.dtype} cannot be stored in safetensors here")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + data.nbytes]}
            offset += data.nbytes

        for name, tensor in tensors:
            if name in names:
                raise ValueError(f"{path}: tensor {name} written twice")
            names.add(name)
            nbytes = tensor.numel() * tensor.element_size()
            if nbytes < SMALL_TENSOR and nbytes % DATA_ALIGNMENT:
                held.append((name, tensor.detach().clone()))  # its own copy: not a view of a large tensor
            else:
                write(name, tensor)
        for name, tensor in held:
            write(name, tensor)
        header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
        if len(header) <= room:
            f.seek(0)
            f.write(struct.pack("<Q", room) + header.ljust(room, b" "))
            return
    # the header outgrew its room: write it in front of a copy of the bytes
    size = len(header) + -(8 + len(header)) % DATA_ALIGNMENT
    moved = path.with_name(path.name + ".bytes")
    os.replace(path, moved)
    try:
        with open(moved, "rb") as source, open(path, "wb") as f:
            f.write(struct.pack("<Q", size) + header.ljust(size, b" "))
            source.seek(8 + room)
            shutil.copyfileobj(source, f, 1 << 24)
    finally:
        moved.unlink()


def checked_tensors(src: Path, config: LongLlamaConfig, tied_lm_head: bool = False):
    """Yield (name, its parts, tensor) for every tensor of our checkpoint directory, each checked against config;
    a tensor the config does not have, or lacks, is refused. The quantized lm_head a tied checkpoint may store (one
    converted from a tied GGUF: see convert_gguf) is yielded with tied_lm_head, and left out otherwise (a tied
    model's output layer is its embedding, wherever it goes)."""
    parts, path = tensor_parts(config), src / "model.safetensors"
    for name, fused in checkpoint_tensors(path):
        group = parts.pop(name, None)
        if group is None and name == "lm_head.weight" and config.tie_word_embeddings:
            if not tied_lm_head:
                continue
            group = [Part(name, name, "output.weight", (config.vocab_size, config.hidden_size))]
        if group is None:
            raise ValueError(f"{path}: unexpected tensor {name}")
        check_tensor(name, fused, (sum(p.shape[0] for p in group), *group[0].shape[1:]), path)
        yield name, group, fused
    if parts:
        raise ValueError(f"{path}: missing tensors {first_names(list(parts))}")


def checkpoint_parts(src: Path, config: LongLlamaConfig):
    """Yield (Part, tensor) for every Hugging Face / GGUF tensor of our checkpoint directory: fused tensors split."""
    for _, group, fused in checked_tensors(src, config):
        yield from zip(group, split_rows(fused, [p.shape[0] for p in group]))


def write_gguf_file(writer: gguf.GGUFWriter, path: Path):
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=sys.stderr.isatty())
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------------------------------
# The conversions


def convert_hf(src, out_dir, dtype=None, mem_layers=None, last_context_length=None, tokenizer=None,
               force=False, quantize=None) -> LongLlamaConfig:
    """Hugging Face LongLLaMA / LLaMA directory, or one of ours -> our checkpoint directory (quantize: int8 / int4
    linear layers)."""
    src, out_dir = Path(src), Path(out_dir)
    check_out_dir(out_dir, force)
    if is_ours(src):
        return convert_ours(src, out_dir, dtype, mem_layers, last_context_length, tokenizer, quantize)
    config = replace(load_config(src, mem_layers, last_context_length), quantization=quantize)
    check_fits_in_memory(config, dtype, src)
    files = hf_weight_files(src)
    tokenizer_files = tokenizer_bytes(source_tokenizer(tokenizer, src))
    tensors = (item for path in tqdm(files, desc="reading", unit="shard", disable=None, leave=False)
               for item in read_weights(path))
    parts = tensor_parts(config)
    state = fuse(tensors, parts, dtype or (QUANTIZED_FLOATS if quantize else None), src, quantize)
    write_checkpoint(out_dir, config.to_dict(), state, tokenizer_files, len(parts))
    return config


def convert_ours(src: Path, out_dir: Path, dtype, mem_layers, last_context_length, tokenizer, quantize):
    """One of our checkpoints -> another: quantized (or requantized) to `quantize`, else kept as quantized as it is;
    float tensors cast to dtype; memory settings replaced."""
    config = load_config(src, mem_layers, last_context_length)
    quantized_source = config.quantization is not None
    config = replace(config, quantization=quantize or config.quantization)
    check_fits_in_memory(config, dtype, src)
    tokenizer_files = tokenizer_bytes(source_tokenizer(tokenizer, src))

    def state():
        for name, _, tensor in checked_tensors(src, config, tied_lm_head=True):
            if isinstance(tensor, QuantizedWeight) and not quantized_source:
                raise ValueError(f"{src}: {name} is stored quantized, but config.json names no quantization")
            float_dtype = dtype or (QUANTIZED_FLOATS if config.quantization else tensor.dtype)
            # requantized to quantize where given; else quantized weights are kept as they are (an int4
            # checkpoint's int8 layers too) and float ones (a tied GGUF's lm_head) stay float
            scheme = quantize or ("keep" if isinstance(tensor, QuantizedWeight) else None)
            yield name, join([tensor], scheme if is_linear(name) else None, float_dtype)

    write_checkpoint(out_dir, config.to_dict(), state(), tokenizer_files, len(tensor_parts(config)) + 1)
    return config


def convert_gguf(src, out_dir, dtype=None, mem_layers=None, last_context_length=None, tokenizer=None,
                 force=False, quantize=None) -> LongLlamaConfig:
    """llama.cpp GGUF file (any quantization the gguf package can dequantize) -> our checkpoint directory, with the
    tokenizer rebuilt from the file's vocabulary unless --tokenizer names one.

    A file whose matrices are quantized stays quantized unless dtype is given: 4-bit blocks (Q4_0, Q4_1, Q4_K) become
    int4 weights value for value, every other type int8 (a layer fused from both, int8). quantize: int8 or int4
    for every linear layer, 4-bit blocks kept as they are under int4."""
    src, out_dir = Path(src), Path(out_dir)
    check_out_dir(out_dir, force)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    reader = read_gguf(src)
    values = gguf_config_values(reader, src)
    if mem_layers is None:
        values.update(gguf_memory_settings(reader, src))
    config = build_config(values, mem_layers, last_context_length, src)
    keep = quantize is None and dtype is None and any(t.tensor_type not in GGUF_FLOATS for t in reader.tensors)
    scheme = "keep" if keep else quantize
    float_dtype = dtype or (QUANTIZED_FLOATS if scheme else None)  # None: as dequantized, float32
    check_fits_in_memory(config, float_dtype or torch.float32, src)
    tokenizer_files = (tokenizer_bytes(source_tokenizer(tokenizer, None)) if tokenizer
                       else gguf_tokenizer_files(reader, config, src))
    parts, floats = tensor_parts(config), set()
    if config.tie_word_embeddings and scheme:
        # A quantized checkpoint of a tied GGUF stores lm_head (config.json still says tied), made from the file's
        # own embedding rather than by load() from its bfloat16 copy, which would quantize it afresh to the
        # checkpoint's scheme (int4 in groups of 64 for a Q4 file, whose embedding llama.cpp keeps in Q8_0).
        parts["lm_head.weight"] = [Part("lm_head.weight", "lm_head.weight", "token_embd.weight",
                                        (config.vocab_size, config.hidden_size))]
    int4_parts = gguf_int4_parts(reader, parts) if scheme in ("keep", "int4") else set()
    if keep and config.tie_word_embeddings and "lm_head.weight" not in int4_parts:
        # 4-bit blocks become int4 value for value; any other embedding stays a float lm_head, in bfloat16 (the
        # file's values to bfloat16's rounding). int8 cannot hold it as the file does: one scale per row against
        # Q8_0's one per 32 weights, and an embedding's rows span a few large columns (SmolLM2-135M: 6 columns of
        # 576 hold 6 times the typical magnitude), so each row's step grows about twofold; measured on SmolLM2-135M
        # Q4_1, the next-token argmax then agrees with the file's model at 96.8% of positions, 98.9% in bfloat16
        # (docs/quantization.md).
        floats.add("lm_head.weight")
    config.quantization = "int4" if keep and int4_parts else "int8" if keep else quantize
    tensors = gguf_tensors(reader, parts, config, src, int4_parts)
    write_checkpoint(out_dir, config.to_dict(), fuse(tensors, parts, float_dtype, src, scheme, floats),
                     tokenizer_files, len(parts))
    if not config.mem_layers and mem_layers is None:
        warnings.warn(f"{src.name} names no memory layers and no --mem-layers was given: {out_dir} is plain LLaMA "
                      f"limited to its {config.max_position_embeddings}-token window")
    return config


def export_hf(src, out_dir, dtype=None, mem_layers=None, last_context_length=None, tokenizer=None,
              force=False) -> LongLlamaConfig:
    """Our checkpoint directory -> Hugging Face LongLLaMA layout (LLaMA when it has no memory layers)."""
    src, out_dir = Path(src), Path(out_dir)
    check_out_dir(out_dir, force)
    check_ours(src, "hf")
    config = load_config(src, mem_layers, last_context_length)
    if config.quantization:  # quantized weights leave dequantized, in the dtype of the float tensors beside them
        dtype = dtype or QUANTIZED_FLOATS
        config = replace(config, quantization=None)
    check_fits_in_memory(config, dtype, src)
    tokenizer_files = tokenizer_bytes(source_tokenizer(tokenizer, src))
    # clone: pieces of one tensor share memory otherwise
    state = {part.hf: (piece.dequantize() if isinstance(piece, QuantizedWeight) else piece).to(dtype=dtype).clone()
             for part, piece in checkpoint_parts(src, config)}
    architecture = "LongLlamaForCausalLM" if config.mem_layers else "LlamaForCausalLM"
    values = {key: value for key, value in config.to_dict().items() if key != "quantization"}  # not an HF key
    hf_config = {"architectures": [architecture], "model_type": HF_ARCHITECTURES[architecture], "hidden_act": "silu",
                 "torch_dtype": str(state["model.embed_tokens.weight"].dtype).removeprefix("torch."), **values}
    write_checkpoint(out_dir, hf_config, state, tokenizer_files)
    return config


def export_gguf(src, out_path, mem_layers=None, last_context_length=None, tokenizer=None, force=False,
                gguf_type="f16") -> LongLlamaConfig:
    """Our checkpoint directory -> a LLaMA GGUF file as llama.cpp's converter writes one (gguf_type: f32, f16, q8_0),
    with the memory settings under longllama.* keys, which other GGUF readers ignore."""
    src, out_path = Path(src), Path(out_path)
    check_out_file(out_path, force)
    check_ours(src, "gguf")
    config = load_config(src, mem_layers, last_context_length)
    check_fits_in_memory(config, torch.float32, src)  # the writer holds every tensor until it writes the file
    if config.rope_scaling is not None:  # llama.cpp stores it as a rope_freqs.weight tensor, which is not read back
        raise ValueError(f"{src}: rope_scaling cannot be written to GGUF here")
    tok = source_tokenizer(tokenizer, src)
    if tok is None:
        raise ValueError(f"{src}: no {' or '.join(TOKENIZER_FILES)} (a GGUF file carries its tokenizer; pass --tokenizer)")
    writer = gguf.GGUFWriter(None, "llama")
    add_gguf_metadata(writer, config, src.name, GGUF_TYPES[gguf_type])
    add_gguf_tokenizer(writer, tok, config, src)
    for part, tensor in checkpoint_parts(src, config):
        heads = rope_heads(part, config)
        add_gguf_tensor(writer, part.gguf, tensor if heads is None else permute_rope_rows(tensor, heads),
                        GGUF_TYPES[gguf_type])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically({out_path: lambda tmp: write_gguf_file(writer, tmp)})  # temporary name, then renamed
    return config


def add_gguf_metadata(writer: gguf.GGUFWriter, config: LongLlamaConfig, name: str, qtype):
    """The llama.* keys llama.cpp's converter writes from config.json, and our memory settings."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(LLAMA_FILE_TYPES[qtype])
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    for key, value in config.to_dict().items():
        if key not in MEMORY_KEYS or value in (None, []):  # GGUF has no null and no empty array: left out
            continue
        add = (writer.add_array if isinstance(value, list) else writer.add_bool if isinstance(value, bool)
               else writer.add_string if isinstance(value, str) else writer.add_uint32)
        add(f"longllama.{key}", value)


def add_gguf_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, config: LongLlamaConfig, source):
    """tokenizer.ggml.* as llama.cpp's converter writes them: SentencePiece pieces, scores and types, or BPE tokens,
    types, merges and pre-tokenizer name; "[PADi]" tokens fill the vocabulary up to the embedding's rows."""
    if isinstance(tok, BPETokenizer):
        tokens, types, merges, pre = bpe_vocabulary(tok)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        tokens, scores, types = sentencepiece_vocabulary(tok)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores + [-1000.0] * (config.vocab_size - len(scores)))
        # llama.cpp reads these two normalizer rules from the file (defaults: True, False); found by trying them
        writer.add_add_space_prefix(tok.sp.IdToPiece(tok.sp.encode("a")[0]).startswith("\u2581"))
        writer.add_remove_extra_whitespaces(tok.sp.decode(tok.sp.encode("a  b")) == "a b")
    if len(tokens) > config.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(tokens)} tokens, the embedding only {config.vocab_size} rows")
    padding = range(len(tokens), config.vocab_size)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in padding])
    writer.add_token_types(types + [UNUSED] * len(padding))
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size:
        writer.add_pad_token_id(config.pad_token_id)
    chat_template = tokenizer_chat_template(tok)
    if chat_template:
        writer.add_chat_template(chat_template)


def tokenizer_chat_template(tok: Tokenizer) -> Optional[str]:
    path = tok.files.get(TOKENIZER_CONFIG)
    return read_tokenizer_config(path).get("chat_template") if path else None


def add_gguf_tensor(writer: gguf.GGUFWriter, name: str, weight, qtype):
    """A tensor or QuantizedWeight stored as qtype. 1-D tensors (norms) stay float32, as llama.cpp keeps them; a
    matrix whose rows do not fill whole Q8_0 blocks falls back to float16, as llama.cpp's converter does. int8
    weights become Q8_0 as they are (q8_0_blocks); others are dequantized first."""
    if isinstance(weight, QuantizedWeight):
        blocks = q8_0_blocks(weight) if qtype == gguf.GGMLQuantizationType.Q8_0 else None
        if blocks is not None:
            writer.add_tensor(name, blocks, raw_dtype=qtype)
            return
        weight = weight.dequantize()
    weight = weight.float().numpy()
    if weight.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    try:
        writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    except gguf.quants.QuantError:
        writer.add_tensor(name, gguf.quants.quantize(weight, gguf.GGMLQuantizationType.F16),
                          raw_dtype=gguf.GGMLQuantizationType.F16)


def q8_0_blocks(weight: QuantizedWeight) -> Optional[np.ndarray]:
    """An int8 weight's Q8_0 bytes [rows, 34 per 32 columns], without a float round trip: a Q8_0 block is a float16
    scale d and 32 int8 values standing for d q, so every block of a row takes the row's scale and its own values.
    None for int4, a row not in whole blocks, or a scale float16 cannot hold exactly (then the weight is requantized)."""
    rows, columns = weight.shape
    scales = weight.scales.float()
    if weight.scheme != "int8" or columns % 32 or not torch.equal(scales.half().float(), scales):
        return None
    d = scales.half().numpy().view(np.uint8).reshape(rows, 1, 2)  # [rows, 1, 2 bytes]
    values = weight.q.numpy().view(np.uint8).reshape(rows, -1, 32)  # [rows, blocks, 32]
    return np.concatenate([np.broadcast_to(d, (rows, values.shape[1], 2)), values], axis=-1).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def layer_list(text: str) -> list:
    """--mem-layers "6,12,18" -> [6, 12, 18]; "" -> [] (no memory layers)."""
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # a bad flag is bad input like any other: one line, status 1
    parser.add_argument("src", type=Path, metavar="SRC",
                        help="Hugging Face directory or .gguf file (with --to hf/gguf: our checkpoint directory)")
    parser.add_argument("out", type=Path, metavar="OUT", help="directory to create (with --to gguf: the .gguf file)")
    parser.add_argument("--to", choices=["ours", "hf", "gguf"], default="ours", help="output layout (default: ours)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast (default: keep)")
    parser.add_argument("--type", choices=list(GGUF_TYPES), help="with --to gguf: how matrices are stored (default f16)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="store linear layers' weights in int8 (per channel) or int4 (groups of 64; GGUF 4-bit "
                             "blocks: groups of 32, as they are). A quantized GGUF stays quantized without it")
    parser.add_argument("--mem-layers", type=layer_list, help='memory layer indices, e.g. "6,12,18" ("" for none)')
    parser.add_argument("--last-context-length", type=int, help="tokens kept in the local window, not memory")
    parser.add_argument("--tokenizer", type=Path,
                        help="tokenizer.model or tokenizer.json to use (default: SRC's, or the one a GGUF file holds)")
    parser.add_argument("--force", action="store_true", help="replace OUT when it is not empty")
    args = parser.parse_args(argv)
    if (args.type and args.to != "gguf") or (args.dtype and args.to == "gguf") or (args.quantize and args.to != "ours"):
        fail("--type goes with --to gguf, --dtype with the other layouts, --quantize with --to ours")
    settings = dict(mem_layers=args.mem_layers, last_context_length=args.last_context_length,
                    tokenizer=args.tokenizer, force=args.force)
    if args.to == "gguf":
        convert = functools.partial(export_gguf, gguf_type=args.type or "f16")
    else:
        convert = export_hf if args.to == "hf" else convert_gguf if args.src.suffix == ".gguf" else convert_hf
        settings["dtype"] = getattr(torch, args.dtype) if args.dtype else None
        if args.to == "ours":
            settings["quantize"] = args.quantize

    with warnings.catch_warnings():  # warnings as one plain line each, like errors
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            config = convert(args.src, args.out, **settings)
        except (ValueError, OSError) as e:
            fail(str(e))
    layout = {"ours": "longllama layout", "hf": "Hugging Face layout", "gguf": f"GGUF {args.type or 'f16'}"}[args.to]
    if args.to == "ours" and config.quantization:
        layout += f", {config.quantization} weights"
    print(f"wrote {args.out} ({layout}): {config.num_hidden_layers} layers, mem_layers {config.mem_layers}, "
          f"last_context_length {config.last_context_length}")


if __name__ == "__main__":
    main()
