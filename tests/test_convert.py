"""convert_weights.py: Hugging Face and GGUF checkpoints in, ours out, and back to Hugging Face.

Expected values never come from the converter itself: tensors are fused here with torch.cat, reference models are
loaded from those hand-fused tensors, and GGUF files are written the way llama.cpp's converter writes them.
"""

import json
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import convert_weights
import longllama
from conftest import ROOT, openllama_tokenizer

# Most toy checkpoints here come without a tokenizer.model; test_missing_tokenizer_is_a_warning covers the warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.model")

WINDOW = 16
LAYOUTS = ["bin", "bin-sharded", "safetensors", "safetensors-sharded"]


# ---------------------------------------------------------------------------------------------------- fixtures


def hf_config(**overrides) -> dict:
    """A LongLLaMA-3B style config.json as transformers writes it, at toy size (head_dim 8). Like the published ones it
    has no num_key_value_heads and no rope_theta (their defaults: all heads, 10000)."""
    config = {
        "architectures": ["LongLlamaForCausalLM"], "model_type": "longllama", "hidden_act": "silu",
        "torch_dtype": "float32", "transformers_version": "4.30.0", "initializer_range": 0.02, "use_cache": True,
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": WINDOW,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "last_context_length": 8, "mem_layers": [1], "mem_positionals": True,
        "mem_dtype": "bfloat16", "mem_attention_grouping": None,
    }
    config.update(overrides)
    return config


def llama_config(**overrides) -> dict:
    """A plain LLaMA config.json: no memory keys."""
    config = {k: v for k, v in hf_config().items() if not k.startswith(("mem_", "last_context"))}
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", **overrides)
    return config


def random_hf_tensors(config: dict, dtype=torch.float32, inv_freq=False, seed=0) -> dict:
    """HF-named random tensors for a config; inv_freq adds the buffers older transformers versions saved."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.3).to(dtype)

    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        tensors.update({
            layer + "self_attn.q_proj.weight": rand(hidden, hidden),
            layer + "self_attn.k_proj.weight": rand(kv, hidden),
            layer + "self_attn.v_proj.weight": rand(kv, hidden),
            layer + "self_attn.o_proj.weight": rand(hidden, hidden),
            layer + "mlp.gate_proj.weight": rand(ffn, hidden),
            layer + "mlp.up_proj.weight": rand(ffn, hidden),
            layer + "mlp.down_proj.weight": rand(hidden, ffn),
            layer + "input_layernorm.weight": 1 + rand(hidden),
            layer + "post_attention_layernorm.weight": 1 + rand(hidden),
        })
        if inv_freq:
            tensors[layer + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    tensors["model.norm.weight"] = 1 + rand(hidden)
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = rand(vocab, hidden)
    return tensors


def write_hf(directory, config: dict, tensors: dict, layout: str):
    """A Hugging Face checkpoint directory in one of LAYOUTS; shards hold tensors round-robin, so q, k and v of a
    layer (and gate, up) sit in different shards."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    pickled = layout.startswith("bin")

    def save(part, path):
        torch.save(part, path) if pickled else save_file(part, str(path), metadata={"format": "pt"})

    if not layout.endswith("sharded"):
        save(tensors, directory / ("pytorch_model.bin" if pickled else "model.safetensors"))
        return
    shards = [f"pytorch_model-0000{k}-of-00002.bin" if pickled else f"model-0000{k}-of-00002.safetensors"
              for k in (1, 2)]
    weight_map = {name: shards[n % 2] for n, name in enumerate(tensors)}
    for shard in shards:
        save({name: t for name, t in tensors.items() if weight_map[name] == shard}, directory / shard)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / f"{'pytorch_model.bin' if pickled else 'model.safetensors'}.index.json").write_text(json.dumps(index))


def fuse_by_hand(hf: dict, num_layers: int) -> dict:
    """Our tensor names and layout, written out by hand: q/k/v fused into wqkv, gate/up into gate_up, in order."""
    ours = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        ours["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(num_layers):
        layer, attn, mlp = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        ours[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
            [hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"]], dim=0)
        ours[f"layers.{i}.attention.wo.weight"] = hf[attn + "o_proj.weight"]
        ours[f"layers.{i}.mlp.gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        ours[f"layers.{i}.mlp.down.weight"] = hf[mlp + "down_proj.weight"]
        ours[f"layers.{i}.attention_norm.weight"] = hf[layer + "input_layernorm.weight"]
        ours[f"layers.{i}.mlp_norm.weight"] = hf[layer + "post_attention_layernorm.weight"]
    return ours


def hand_loaded_model(config: dict, hf: dict) -> longllama.LongLlama:
    """A model built from the config and the hand-fused HF tensors, without the converter."""
    model = longllama.LongLlama(longllama.LongLlamaConfig.from_dict(config)).eval()
    ours = {k: v.float() for k, v in fuse_by_hand(hf, config["num_hidden_layers"]).items()}
    ours.setdefault("lm_head.weight", ours["embed.weight"])  # tied: the same tensor
    model.load_state_dict(ours)
    return model


@torch.no_grad()
def logits_of(model):
    """Logits of 40 tokens: more than two windows, so memory layers read memory."""
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    return model(tokens)[0]


def assert_same_tensors(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_nothing_written(out_dir):
    """No OUT_DIR and no temporary directory beside it."""
    assert not out_dir.exists()
    if out_dir.parent.exists():
        assert not [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


# ---------------------------------------------------------------------------------------------------- Hugging Face in


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_hf_layout_gives_the_hand_fused_tensors_and_their_logits(tmp_path, layout):
    config = hf_config(num_key_value_heads=2)  # grouped-query attention: k and v narrower than q
    hf = random_hf_tensors(config, inv_freq=layout.startswith("bin"))
    write_hf(tmp_path / "hf", config, hf, layout)
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")

    expected = fuse_by_hand(hf, config["num_hidden_layers"])
    assert_same_tensors(load_file(tmp_path / "ours" / "model.safetensors"), expected)
    model = longllama.load(tmp_path / "ours")
    assert model.config == longllama.LongLlamaConfig.from_dict(config)
    assert_same_tensors(model.state_dict(), expected)
    assert torch.equal(logits_of(model), logits_of(hand_loaded_model(config, hf)))


def test_tied_embeddings_store_no_lm_head_and_give_the_same_logits(tmp_path):
    config = hf_config(tie_word_embeddings=True)
    hf = random_hf_tensors(config)
    write_hf(tmp_path / "hf", config, hf, "safetensors")
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")

    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")
    model = longllama.load(tmp_path / "ours")
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(logits_of(model), logits_of(hand_loaded_model(config, hf)))


def test_tokenizer_model_is_copied(tmp_path):
    tokenizer = openllama_tokenizer("open_llama_v1.model")
    config = hf_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    shutil.copy(tokenizer, tmp_path / "hf" / "tokenizer.model")
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    convert_weights.export_hf(tmp_path / "ours", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


def test_missing_tokenizer_is_a_warning(tmp_path):
    config = hf_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    with pytest.warns(UserWarning, match="no tokenizer.model"):
        convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours" / "tokenizer.model").exists()


def test_source_dtype_is_kept_and_dtype_flag_casts(tmp_path):
    config = hf_config()
    hf = random_hf_tensors(config, dtype=torch.bfloat16)
    write_hf(tmp_path / "hf", config, hf, "bin")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "kept")])
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "cast"), "--dtype", "float32"])
    expected = fuse_by_hand(hf, config["num_hidden_layers"])
    assert_same_tensors(load_file(tmp_path / "kept" / "model.safetensors"), expected)
    assert_same_tensors(load_file(tmp_path / "cast" / "model.safetensors"), {k: v.float() for k, v in expected.items()})


def test_plain_llama_gets_memory_layers_only_from_the_flag(tmp_path):
    config = llama_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "plain")])
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "long"), "--mem-layers", "0,2",
                          "--last-context-length", "4"])

    plain, long = longllama.load(tmp_path / "plain").config, longllama.load(tmp_path / "long").config
    assert plain.mem_layers == [] and plain.last_context_length == WINDOW  # no memory: the whole window stays local
    assert long.mem_layers == [0, 2] and long.last_context_length == 4


def test_config_with_memory_layers_keeps_them(tmp_path):
    config = hf_config(mem_layers=[0, 2], mem_positionals=False, mem_attention_grouping=[2, 8])
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["mem_layers"] == [0, 2] and saved["mem_positionals"] is False
    assert saved["mem_attention_grouping"] == [2, 8] and saved["last_context_length"] == 8


# ---------------------------------------------------------------------------------------------------- back to HF


@pytest.mark.parametrize("dtype, layout, tied", [(torch.float32, "bin-sharded", False),
                                                 (torch.bfloat16, "safetensors", True)])
def test_round_trip_hf_ours_hf_is_bit_identical(tmp_path, dtype, layout, tied):
    config = hf_config(num_key_value_heads=2, tie_word_embeddings=tied, torch_dtype=str(dtype)[6:])
    hf = random_hf_tensors(config, dtype=dtype, inv_freq=True)
    write_hf(tmp_path / "hf", config, hf, layout)
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"])

    without_inv_freq = {k: v for k, v in hf.items() if not k.endswith("inv_freq")}
    assert_same_tensors(load_file(tmp_path / "back" / "model.safetensors"), without_inv_freq)
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["architectures"] == ["LongLlamaForCausalLM"] and exported["model_type"] == "longllama"
    assert exported["hidden_act"] == "silu" and exported["torch_dtype"] == config["torch_dtype"]
    model_keys = [k for k in config if k not in ("transformers_version", "initializer_range", "use_cache")]
    assert {k: exported[k] for k in model_keys} == {k: config[k] for k in model_keys}
    assert exported["rope_theta"] == 10000.0  # absent from the source: the default, written out


def test_plain_llama_exports_as_llama(tmp_path):
    config = llama_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    convert_weights.export_hf(tmp_path / "ours", tmp_path / "back")
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"] and exported["model_type"] == "llama"


# ---------------------------------------------------------------------------------------------------- GGUF in

# HF names under model.layers.{i}. -> GGUF names under blk.{i}. (llama.cpp's tensor map for LLaMA)
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
GGUF_MODEL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
FILE_TYPES = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
              gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
              gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def llama_cpp_permute(weight, heads):
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to q/k rows [heads * D, columns]: each head's
    rows, viewed as [2, D/2] (the two rotate-half halves), are transposed to [D/2, 2] (pairs of adjacent rows)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path, config: dict, hf: dict, qtype, architecture="llama", vocabulary=None, encode=None):
    """A GGUF file as llama.cpp's HF converter writes one: llama.* metadata, q/k permuted, 1-D tensors in F32.
    vocabulary(writer) adds the tokenizer.ggml.* keys (test_formats.py); without it the file holds no vocabulary.
    encode(GGUF name, float32 array) -> (bytes, type) stores matrices its own way (as llama.cpp's quantizer)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    if qtype in FILE_TYPES:  # general.file_type names the usual types only
        writer.add_file_type(FILE_TYPES[qtype])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if vocabulary is not None:
        vocabulary(writer)
    for name, tensor in hf.items():
        if name.endswith("inv_freq"):
            continue  # llama.cpp skips these buffers too
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            i, rest = base.removeprefix("model.layers.").split(".", 1)
            gguf_name = f"blk.{i}.{GGUF_LAYER_NAMES[rest]}.weight"
        else:
            gguf_name = f"{GGUF_MODEL_NAMES[base]}.weight"
        array = tensor.float()
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, kv_heads)
        array = array.numpy()
        if array.ndim == 1:
            writer.add_tensor(gguf_name, array)  # llama.cpp keeps norms in F32
        else:
            data, kind = encode(gguf_name, array) if encode else (stored(array, qtype), qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def stored(array, qtype):
    """The bytes of array stored as qtype; zero blocks of the right size for a type the gguf package cannot quantize
    (Q8_1: llama.cpp uses it for activations only, and the gguf package does not dequantize it either)."""
    try:
        return gguf.quants.quantize(array, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((*array.shape[:-1], array.shape[-1] // block * size), dtype=np.uint8)


def test_llama_cpp_permutation_turns_rotate_half_into_interleaved_rope():
    """Why GGUF q/k rows are permuted: ggml's RoPE rotates adjacent pairs (2j, 2j+1), ours (HF's) rotates (j, j+D/2).
    After llama.cpp's permutation, interleaved RoPE of the projection equals the permuted rotate-half RoPE."""
    heads, head_dim, hidden, position = 2, 8, 16, 5
    weight, x = torch.randn(heads * head_dim, hidden), torch.randn(hidden)
    cos, sin = longllama.rope_tables(head_dim, position + 1, 10000.0)
    rotate_half = longllama.apply_rope((weight @ x).view(heads, 1, head_dim), cos[position:], sin[position:])

    pairs = (llama_cpp_permute(weight, heads) @ x).view(heads, head_dim // 2, 2)  # adjacent rows form a pair
    angle = position * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)  # [D/2]
    first, second = pairs[..., 0], pairs[..., 1]
    interleaved = torch.stack([first * angle.cos() - second * angle.sin(),
                               first * angle.sin() + second * angle.cos()], dim=-1).view(heads * head_dim)

    assert torch.allclose(llama_cpp_permute(rotate_half.reshape(-1, 1), heads).view(-1), interleaved, atol=1e-5)
    assert torch.equal(convert_weights.unpermute_rope_rows(llama_cpp_permute(weight, heads), heads), weight)


def quantized(hf: dict, qtype) -> dict:
    """The HF tensors as a GGUF of this type holds them (1-D ones stay float32). Quantization works on blocks along a
    row, so permuting rows (q, k) commutes with it: these are exactly the tensors a converter must recover."""
    return {name: tensor if tensor.dim() == 1 else
            torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype))
            for name, tensor in hf.items()}


@pytest.mark.parametrize("qtype, atol, tied", [(gguf.GGMLQuantizationType.F32, 0, True),
                                               (gguf.GGMLQuantizationType.F16, 2e-3, False),
                                               (gguf.GGMLQuantizationType.Q8_0, 1.5e-2, False)])
def test_gguf_converts_back_to_the_hf_tensors(tmp_path, qtype, atol, tied):
    config = hf_config(num_key_value_heads=2, tie_word_embeddings=tied)  # k has fewer heads than q
    hf = random_hf_tensors(config)
    write_gguf(tmp_path / "model.gguf", config, hf, qtype)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours"), "--mem-layers", "1",
                          "--last-context-length", "8", "--dtype", "float32"])  # floats: Q8_0 would stay int8

    model = longllama.load(tmp_path / "ours")
    assert model.config == longllama.LongLlamaConfig.from_dict(config)
    actual = load_file(tmp_path / "ours" / "model.safetensors")
    assert_same_tensors(actual, fuse_by_hand(quantized(hf, qtype), config["num_hidden_layers"]))
    for name, tensor in fuse_by_hand(hf, config["num_hidden_layers"]).items():
        assert (actual[name] - tensor).abs().max() <= atol, name  # quantization error only
    assert torch.equal(logits_of(model), logits_of(hand_loaded_model(config, quantized(hf, qtype))))


def test_gguf_logits_are_close_to_the_unquantized_model(tmp_path):
    config = hf_config(num_key_value_heads=2, mem_dtype="float32")  # bfloat16 memory would add its own rounding
    hf = random_hf_tensors(config)
    write_gguf(tmp_path / "model.gguf", config, hf, gguf.GGMLQuantizationType.F16)
    convert_weights.convert_gguf(tmp_path / "model.gguf", tmp_path / "ours", mem_layers=[1], last_context_length=8)
    reference = logits_of(hand_loaded_model(config, hf))
    error = logits_of(longllama.load(tmp_path / "ours", mem_dtype="float32")) - reference
    assert error.norm() <= 0.01 * reference.norm()


def test_gguf_without_flags_warns_of_plain_llama_and_of_the_missing_tokenizer(tmp_path):
    config = hf_config()
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), gguf.GGMLQuantizationType.F32)
    with pytest.warns(UserWarning) as warned:
        result = convert_weights.convert_gguf(tmp_path / "model.gguf", tmp_path / "ours")
    messages = " | ".join(str(w.message) for w in warned)
    assert "plain LLaMA limited to its 16-token window" in messages and "no tokenizer.model" in messages
    assert result.mem_layers == [] and result.max_position_embeddings == WINDOW
    assert longllama.load(tmp_path / "ours").config.mem_layers == []


def test_gguf_takes_the_tokenizer_flag(tmp_path):
    tokenizer = openllama_tokenizer("open_llama_v1.model")
    config = hf_config()
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), gguf.GGMLQuantizationType.F16)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours"), "--mem-layers", "1",
                          "--tokenizer", str(tokenizer)])
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


# ---------------------------------------------------------------------------------------------------- bad input


def bad_source(tmp_path, case: str):
    """Build the bad input `case` under tmp_path; returns the SRC path to convert."""
    src = tmp_path / "src"
    config = hf_config()
    tensors = random_hf_tensors(config)
    if case == "missing source":
        return tmp_path / "nowhere"
    if case == "no config.json":
        write_hf(src, config, tensors, "safetensors")
        (src / "config.json").unlink()
    elif case == "no weights":
        src.mkdir()
        (src / "config.json").write_text(json.dumps(config))
    elif case == "unknown architecture":
        write_hf(src, hf_config(architectures=["MistralForCausalLM"], model_type="mistral"), tensors, "safetensors")
    elif case == "corrupt safetensors":
        write_hf(src, config, tensors, "safetensors")
        (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" * 3)
    elif case == "truncated safetensors":
        write_hf(src, config, tensors, "safetensors")
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "truncated bin":
        write_hf(src, config, tensors, "bin")
        data = (src / "pytorch_model.bin").read_bytes()
        (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif case == "malformed index":
        write_hf(src, config, tensors, "safetensors-sharded")
        (src / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": ')
    elif case == "index without weight_map":
        write_hf(src, config, tensors, "bin-sharded")
        (src / "pytorch_model.bin.index.json").write_text('{"metadata": {}}')
    elif case == "index pointing outside":
        write_hf(src, config, tensors, "bin-sharded")
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../x.bin"}}))
    elif case == "missing shard":
        write_hf(src, config, tensors, "bin-sharded")
        (src / "pytorch_model-00002-of-00002.bin").unlink()
    elif case == "wrong shape":
        tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 32)
        write_hf(src, config, tensors, "safetensors")
    elif case == "missing tensor":
        del tensors["model.layers.2.mlp.up_proj.weight"]
        write_hf(src, config, tensors, "bin")
    elif case == "extra tensor":
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
        write_hf(src, config, tensors, "safetensors")
    elif case == "gguf of another architecture":
        src = tmp_path / "gpt2.gguf"
        write_gguf(src, config, tensors, gguf.GGMLQuantizationType.F32, architecture="gpt2")
    elif case == "gguf of a type the gguf package cannot read":
        src = tmp_path / "model.gguf"
        write_gguf(src, config, tensors, gguf.GGMLQuantizationType.Q8_1)
    elif case == "gguf vocabulary smaller than the embedding":
        src = tmp_path / "model.gguf"

        def ten_tokens(writer):
            writer.add_tokenizer_model("llama")
            writer.add_token_list(["<unk>", "<s>", "</s>"] + list("abcdefg"))
            writer.add_token_scores([0.0] * 10)
            writer.add_token_types([2, 3, 3] + [1] * 7)
        write_gguf(src, config, tensors, gguf.GGMLQuantizationType.F16, vocabulary=ten_tokens)
    elif case == "window too long to load":
        write_hf(src, hf_config(max_position_embeddings=2**38), tensors, "safetensors")
    elif case == "damaged gguf":
        src = tmp_path / "model.gguf"
        write_gguf(src, config, tensors, gguf.GGMLQuantizationType.F16)
        src.write_bytes(src.read_bytes()[:3000])
    else:
        raise AssertionError(case)
    return src


BAD_INPUTS = {
    "missing source": "no such directory",
    "no config.json": "no config.json",
    "no weights": "no weights",
    "unknown architecture": "unsupported architecture ['MistralForCausalLM']",
    "corrupt safetensors": "model.safetensors: cannot read weights",
    "truncated safetensors": "model.safetensors: cannot read weights",
    "truncated bin": "pytorch_model.bin: cannot read weights",
    "malformed index": "model.safetensors.index.json: not valid JSON",
    "index without weight_map": "pytorch_model.bin.index.json: malformed index",
    "missing shard": "lists shard pytorch_model-00002-of-00002.bin, which does not exist",
    "index pointing outside": "pytorch_model.bin.index.json: malformed index",
    "wrong shape": "model.layers.1.self_attn.k_proj.weight has shape (16, 32), but the config implies (32, 32)",
    "missing tensor": "missing tensors model.layers.2.mlp.up_proj.weight",
    "extra tensor": "unexpected tensor model.layers.0.self_attn.q_proj.bias",
    "gguf of another architecture": "architecture 'gpt2' is not supported (only llama)",
    "damaged gguf": "not a readable GGUF file",
    "gguf of a type the gguf package cannot read": "token_embd.weight is stored as Q8_1, which the gguf package "
                                                   "cannot dequantize",
    "gguf vocabulary smaller than the embedding": "the vocabulary has 10 tokens (10 token types), the embedding 64 rows",
    "window too long to load": "(max_position_embeddings=274877906944: the rotary tables of that window alone take",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    src = bad_source(tmp_path, case)
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main([str(src), str(out), "--mem-layers", "1"])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_INPUTS[case] in lines[0], lines
    assert_nothing_written(out)


@pytest.mark.parametrize("target,out", [("hf", "out"), ("gguf", "out.gguf")])
def test_exporting_a_hugging_face_directory_says_it_is_one(tmp_path, capsys, target, out):
    config = hf_config()
    write_hf(tmp_path / "src", config, random_hf_tensors(config), "safetensors")
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "src"), str(tmp_path / out), "--to", target])
    line = capsys.readouterr().err.strip()
    assert line == (f"error: {tmp_path / 'src'} is a Hugging Face checkpoint, and --to {target} converts this "
                    f"project's: convert it to one first (python convert_weights.py {tmp_path / 'src'} OUT)")
    assert not (tmp_path / out).exists()


def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling with the full pickle module would create the marker

    config = hf_config()
    write_hf(tmp_path / "src", config, {**random_hf_tensors(config), "lm_head.weight": Payload()}, "bin")
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main([str(tmp_path / "src"), str(tmp_path / "out")])
    assert exit_.value.code == 1
    assert "refused by torch.load(weights_only=True)" in capsys.readouterr().err
    assert not marker.exists()
    assert_nothing_written(tmp_path / "out")
    torch.load(tmp_path / "src" / "pytorch_model.bin", weights_only=False)  # control: unsafe loading does run it
    assert marker.exists()


def test_command_line_error_is_one_line_and_exit_status_1(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(tmp_path / "nowhere"),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert_nothing_written(tmp_path / "out")


def test_export_checks_our_checkpoint_against_its_config(tmp_path, capsys):
    config = hf_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.convert_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    ours["layers.0.mlp.gate_up.weight"] = torch.zeros(64, 32)
    save_file(ours, str(tmp_path / "ours" / "model.safetensors"))
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"])
    assert exit_.value.code == 1
    assert "layers.0.mlp.gate_up.weight has shape (64, 32), but the config implies (128, 32)" in capsys.readouterr().err
    assert_nothing_written(tmp_path / "back")


# ---------------------------------------------------------------------------------------------------- output directory


def test_non_empty_out_dir_is_replaced_only_with_force(tmp_path, capsys):
    config = hf_config()
    hf = random_hf_tensors(config)
    write_hf(tmp_path / "hf", config, hf, "safetensors")
    out = tmp_path / "ours"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")

    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "hf"), str(out)])
    assert "not empty (--force replaces it)" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"

    convert_weights.main([str(tmp_path / "hf"), str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]


def test_failed_write_leaves_the_old_out_dir_and_no_temporary(tmp_path, monkeypatch):
    config = hf_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    out = tmp_path / "ours"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_weights, "write_safetensors", disk_full)
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "hf"), str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]


def test_failed_write_removes_the_folders_it_made_for_out(tmp_path, monkeypatch):
    config = hf_config()
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_weights, "write_safetensors", disk_full)
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "a" / "b" / "ours")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("room", [0, 4096])
def test_safetensors_written_a_tensor_at_a_time_read_back_and_start_large_weights_aligned(tmp_path, room):
    """convert_weights writes model.safetensors itself, one tensor at a time: safetensors reads it back exactly,
    whether the header fits the room kept for it or is written in front of a copy of the bytes (room 0); small
    tensors go last, so that the large ones start on 64-byte boundaries (the int8 kernel's weights are used in place
    only there)."""
    tensors = {"norm": torch.randn(7), "big": torch.randint(-127, 128, (1024, 1088), dtype=torch.int8),
               "scales": torch.randn(1024, dtype=torch.bfloat16), "flag": torch.tensor([True, False]),
               "half": torch.randn(3, 5).half(), "other": torch.randint(-127, 128, (512, 2048), dtype=torch.int8)}
    path = tmp_path / "model.safetensors"
    convert_weights.write_safetensors(path, iter(tensors.items()), {"format": "pt"}, room)
    assert_same_tensors(load_file(path), tensors)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_length])
    assert header["__metadata__"] == {"format": "pt"}
    for name in ("big", "other"):
        assert (8 + header_length + header[name]["data_offsets"][0]) % 64 == 0, name
