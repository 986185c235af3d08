"""Quantized checkpoints: written by convert_weights.py --quantize or from GGUF quants, loaded as they are stored.

Each test checks against an independent computation: the quantization written out by hand (test_model's
dequantized_as_specified), or the gguf package's own dequantization of the file llama.cpp's way of writing made.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import convert_weights
import documents
import longllama
import quantize
import passkey
import train
from test_convert import (fuse_by_hand, hf_config, llama_cpp_permute, logits_of, random_hf_tensors, write_gguf,
                          write_hf)
from conftest import ROOT, openllama_tokenizer
from test_bad_input import exits_with_one_error_line, one_error_line
from test_model import dequantized_as_specified

Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0 = (gguf.GGMLQuantizationType[name]
                                      for name in ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0"))


def dequantized_layers(ckpt) -> dict:
    """{our tensor name: float64 weight} of every quantized linear layer in a checkpoint, from its stored parts, by
    the storage format's definition (int8: q * scale; int4: low nibble first, (q - 8) * scale + zero)."""
    tensors, weights = load_file(ckpt / "model.safetensors"), {}
    for name in [n for n in tensors if n.endswith(".scales")]:
        layer = name.removesuffix(".scales")
        q, scales = tensors[f"{layer}.weight"], tensors[name].double()
        if q.dtype == torch.int8:
            weights[f"{layer}.weight"] = q.double() * scales[:, None]
            continue
        values = torch.stack([q & 15, q >> 4], dim=-1).view(q.shape[0], -1).double()  # [N, K]
        group = values.shape[1] // scales.shape[1]
        zeros = tensors[f"{layer}.zeros"].double()
        weights[f"{layer}.weight"] = ((values - 8) * scales.repeat_interleave(group, 1)
                                      + zeros.repeat_interleave(group, 1))
    return weights


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_convert_quantize_stores_the_specified_quantization_and_loads_it_as_load_quantize_does(scheme, tmp_path):
    config = hf_config(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    hf = random_hf_tensors(config)
    write_hf(tmp_path / "hf", config, hf, "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "float")])
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", scheme])

    stored = dequantized_layers(tmp_path / "q")
    for name, weight in fuse_by_hand(hf, config["num_hidden_layers"]).items():
        if weight.dim() == 2 and name != "embed.weight":
            assert torch.equal(stored[name], dequantized_as_specified(weight, scheme)), name
    assert load_file(tmp_path / "q" / "model.safetensors")["embed.weight"].dtype == torch.bfloat16
    quantized = longllama.load(tmp_path / "q", dtype=torch.bfloat16)
    assert quantized.config.quantization == scheme
    on_load = longllama.load(tmp_path / "float", dtype=torch.bfloat16, quantize=scheme)
    assert torch.equal(logits_of(quantized), logits_of(on_load))

    # ours -> ours keeps it; back to Hugging Face, the weights leave dequantized
    convert_weights.main([str(tmp_path / "q"), str(tmp_path / "copy"), "--mem-layers", "0"])
    assert longllama.load(tmp_path / "copy").config.quantization == scheme
    convert_weights.main([str(tmp_path / "q"), str(tmp_path / "back"), "--to", "hf", "--dtype", "float32"])
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert torch.equal(back["model.layers.0.mlp.down_proj.weight"].double(),
                       stored["layers.0.mlp.down.weight"])
    with pytest.raises(ValueError, match=f"holds {scheme} weights"):
        longllama.load(tmp_path / "q", quantize="int4" if scheme == "int8" else "int8")
    with pytest.raises(ValueError, match="is not saved"):
        longllama.save(quantized, tmp_path / "saved")


def random_q4_k_blocks(rows: int, columns: int, seed: int) -> np.ndarray:
    """A Q4_K matrix's bytes as llama.cpp lays them out (the gguf package cannot quantize to Q4_K): per 256 weights,
    float16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values. Any bytes are a valid
    encoding; d and dmin are set to sizes a trained model has."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, columns // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = (rng.uniform(0.5, 2, size=(rows, columns // 256, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = (rng.uniform(0.5, 2, size=(rows, columns // 256, 1)) * 4e-3).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_quantized_gguf(path, config: dict, qtype) -> dict:
    """A GGUF as llama.cpp's quantizer writes one: matrices in qtype, the output matrix in Q8_0 (llama.cpp keeps it
    in more bits), norms in F32, q/k rows permuted. Returns the file's matrices as the gguf package dequantizes them."""
    dequantized = {}

    def encode(name, array):
        kind = Q8_0 if name == "output.weight" else qtype
        seed = len(dequantized)
        if kind == Q4_K:
            data = random_q4_k_blocks(*array.shape, seed)
        elif kind == Q6_K:  # 210 bytes per 256 weights, the float16 scale last: random bytes, a small scale
            blocks = np.random.default_rng(seed).integers(0, 256, size=(array.shape[0], array.shape[1] // 256, 210),
                                                          dtype=np.uint8)
            blocks[..., 208:210] = np.array([2e-4], dtype=np.float16).view(np.uint8)
            data = blocks.reshape(array.shape[0], -1)
        else:
            data = gguf.quants.quantize(array, kind)
        dequantized[name] = torch.from_numpy(gguf.quants.dequantize(data, kind)).double()
        return data, kind

    write_gguf(path, config, random_hf_tensors(config), qtype, encode=encode)
    return dequantized


def unpermuted(dequantized: dict, config: dict) -> dict:
    """The file's matrices under HF names, q/k rows back in HF order (inverse of llama_cpp_permute, by search)."""
    heads, names = config["num_attention_heads"], {}
    for name, weight in dequantized.items():
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            order = llama_cpp_permute(torch.arange(weight.shape[0]).view(-1, 1), heads).view(-1)
            weight = weight[order.argsort()]
        names[name] = weight
    return names


GGUF_LAYERS = {"attn_q": 0, "attn_k": 1, "attn_v": 2}  # wqkv's parts, in order


def fused_from_gguf(weights: dict, layers: int) -> dict:
    """Our fused linear weights from GGUF-named ones (as fuse_by_hand does for HF names)."""
    ours = {"lm_head.weight": weights["output.weight"]}
    for i in range(layers):
        w = {name.split(".")[2]: weight for name, weight in weights.items() if name.startswith(f"blk.{i}.")}
        ours[f"layers.{i}.attention.wqkv.weight"] = torch.cat([w["attn_q"], w["attn_k"], w["attn_v"]])
        ours[f"layers.{i}.attention.wo.weight"] = w["attn_output"]
        ours[f"layers.{i}.mlp.gate_up.weight"] = torch.cat([w["ffn_gate"], w["ffn_up"]])
        ours[f"layers.{i}.mlp.down.weight"] = w["ffn_down"]
    return ours


@pytest.mark.parametrize("qtype, scheme, tolerance", [(Q8_0, "int8", 1 / 200), (Q4_0, "int4", 1 / 200),
                                                      (Q4_1, "int4", 1 / 200), (Q4_K, "int4", 1 / 200),
                                                      (Q5_0, "int8", 1 / 200), (Q6_K, "int8", 1 / 200)])
def test_gguf_quants_load_quantized_and_equal_the_files_weights(qtype, scheme, tolerance, tmp_path):
    """4-bit blocks become int4 value for value (only scale and zero are rounded to bfloat16), other types int8
    (one scale per row: half a row step at most). The tolerance, relative to each matrix's largest weight, is far
    below a wrong nibble order, scale or zero point, or a row out of place."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=64)
    dequantized = unpermuted(write_quantized_gguf(tmp_path / "model.gguf", config, qtype), config)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])

    model = longllama.load(tmp_path / "ours")
    assert model.config.quantization == scheme
    kinds = {name: getattr(parent, attribute).scheme
             for name, (parent, attribute) in quantize.linear_layers(model).items()}
    assert kinds.pop("lm_head") == "int8" and set(kinds.values()) == {scheme}
    stored = dequantized_layers(tmp_path / "ours")
    for name, expected in fused_from_gguf(dequantized, config["num_hidden_layers"]).items():
        error = (stored[name] - expected).abs().max() / expected.abs().max()
        assert error <= tolerance, (name, error.item())
    if scheme == "int4":  # rows of 4-bit blocks: only the bfloat16 rounding of scale and zero
        assert (stored["layers.0.mlp.down.weight"] - fused_from_gguf(dequantized, 3)["layers.0.mlp.down.weight"]
                ).abs().max() <= 2**-7 * stored["layers.0.mlp.down.weight"].abs().max()
    assert torch.isfinite(logits_of(model)).all()


def test_a_mixed_gguf_fuses_4_bit_and_6_bit_parts_as_int8_and_float_output_on_request(tmp_path):
    """q/k in 4-bit blocks with v in Q8_0 (as llama.cpp's Q4_K_M keeps attn_v in more bits): the fused wqkv cannot be
    int4 in one layout, so it is int8; --dtype asks for a float checkpoint instead."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=64)
    hf = random_hf_tensors(config)
    write_gguf(tmp_path / "model.gguf", config, hf, Q4_0)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert {t.tensor_type for t in reader.tensors if t.data.ndim == 2} == {Q4_0}
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "int4")])
    model = longllama.load(tmp_path / "int4")
    assert model.layers[0].attention.wqkv.scheme == "int4" and model.config.quantization == "int4"
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "float"), "--dtype", "float32"])
    assert longllama.load(tmp_path / "float").config.quantization is None
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "int8"), "--quantize", "int8"])
    assert longllama.load(tmp_path / "int8").layers[0].attention.wqkv.scheme == "int8"


def test_int8_weights_export_to_q8_0_value_for_value(tmp_path):
    """int8 -> Q8_0 keeps every value and scale: the exported blocks dequantize (by the gguf package) to exactly the
    int8 weights, and converting the file back gives the same int8 tensors."""
    config = hf_config(hidden_size=64, intermediate_size=128, vocab_size=32000)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    shutil.copy(openllama_tokenizer("open_llama_v2.model"), tmp_path / "hf" / "tokenizer.model")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int8"])
    convert_weights.main([str(tmp_path / "q"), str(tmp_path / "model.gguf"), "--to", "gguf", "--type", "q8_0"])
    stored = dequantized_layers(tmp_path / "q")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    assert down.tensor_type == Q8_0
    assert torch.equal(torch.from_numpy(gguf.quants.dequantize(down.data, Q8_0)).double(),
                       stored["layers.1.mlp.down.weight"].float().double())
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "back")])
    original, back = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    for name in original:
        if name != "embed.weight":  # the embedding went through Q8_0 as a float matrix
            assert torch.equal(original[name], back[name]), name


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"layers.0.mlp.down.weight": t["layers.0.mlp.down.weight"].float()}), "is not a stored int8"),
    (lambda t: t.pop("layers.0.mlp.down.scales"), "missing tensors"),
    (lambda t: t.update({"layers.0.mlp.down.scales": t["layers.0.mlp.down.scales"][:3]}), "is not a stored int8"),
    (lambda t: t.update({"layers.0.mlp.down.zeros": t["layers.0.mlp.down.scales"].clone()}), "unexpected|not a stored"),
    (lambda t: t.update({"layers.0.mlp.down.weight": torch.zeros(32, 64, dtype=torch.uint8),  # int4, no groups
                         "layers.0.mlp.down.scales": torch.zeros(32, 0), "layers.0.mlp.down.zeros": torch.zeros(32, 0)}),
     "not a stored int4 weight: its scales are"),
])
def test_a_damaged_quantized_checkpoint_is_refused_in_one_line(change, message, tmp_path):
    config = hf_config(hidden_size=64, intermediate_size=128)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int8"])
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        longllama.load(tmp_path / "q")


def test_generate_answers_from_a_shipped_checkpoint_converted_to_int8(tmp_path):
    """The command line a user runs: a trained checkpoint quantized by convert_weights.py, then generate.py on it."""
    convert_weights.main([str(ROOT / "models" / "fot7"), str(tmp_path / "int8"), "--quantize", "int8"])
    prompt = passkey.prompt_text(documents.FILLER, documents.FILLER, 31415)
    result = subprocess.run([sys.executable, "generate.py", "--ckpt", str(tmp_path / "int8"), "--prompt", prompt,
                             "--temperature", "0", "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("31415")


def test_int4_weights_the_kernel_cannot_take_are_refused_in_one_line(tmp_path):
    config = hf_config(hidden_size=64, intermediate_size=128)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int4"])
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    for part in ("scales", "zeros"):  # groups of 16 columns: not a group size the kernel takes
        tensors[f"layers.0.mlp.gate_up.{part}"] = tensors[f"layers.0.mlp.gate_up.{part}"].repeat_interleave(4, 1)
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="gate_up is stored as int4 in groups of 16 over 256 rows"):
        longllama.load(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config_path.write_text(config_path.read_text().replace('"int4"', '"int8"'))
    with pytest.raises(ValueError, match="is stored as int4 in an int8 checkpoint"):
        longllama.load(tmp_path / "q")


def test_what_cannot_use_quantized_weights_refuses_them_in_one_line(tmp_path, capsys):
    """Training needs float weights (the packed kernels have no backward); a file whose weights are stored quantized
    under a config that says nothing of it is damaged."""
    config = hf_config(hidden_size=64, intermediate_size=128)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int8"])
    capsys.readouterr()  # the converter's warning: no tokenizer
    assert train.cli(["--init", str(tmp_path / "q"), "--out", str(tmp_path / "o"), "--max-steps", "1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "holds int8 weights: train from the unquantized checkpoint" in line
    config_path = tmp_path / "q" / "config.json"
    config_path.write_text(config_path.read_text().replace('"int8"', "null"))
    line = exits_with_one_error_line(capsys, convert_weights.main, [str(tmp_path / "q"), str(tmp_path / "again")])
    assert "is stored quantized, but config.json names no quantization" in line


def test_a_quantized_checkpoint_goes_back_to_hugging_face_in_bfloat16(tmp_path):
    config = hf_config(hidden_size=64, intermediate_size=128)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int4"])
    convert_weights.main([str(tmp_path / "q"), str(tmp_path / "back"), "--to", "hf"])
    assert {t.dtype for t in load_file(tmp_path / "back" / "model.safetensors").values()} == {torch.bfloat16}
    hf_back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization" not in hf_back and hf_back["torch_dtype"] == "bfloat16"


def test_4_bit_gguf_rows_the_int4_kernel_cannot_take_become_int8(tmp_path):
    """A vocabulary of 72 rows in Q4_0 (llama.cpp's --pure): the int4 kernel needs rows in multiples of 16."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=72)
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), Q4_0)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    model = longllama.load(tmp_path / "ours")
    assert model.lm_head.scheme == "int8" and model.layers[0].mlp.down.scheme == "int4"


def test_a_quantized_checkpoint_is_refused_where_its_stored_size_does_not_fit(tmp_path, monkeypatch):
    """The memory check of a quantized checkpoint counts its stored tensors (header sizes), not an estimate."""
    config = hf_config(hidden_size=64, intermediate_size=128)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "q"), "--quantize", "int4"])
    model = longllama.load(tmp_path / "q", dtype=torch.bfloat16)
    held = sum(t.nbytes for t in model.state_dict().values()) + model.config.rope_bytes
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device: held - 1)
    with pytest.raises(ValueError, match="the model needs"):
        longllama.load(tmp_path / "q", dtype=torch.bfloat16)
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device: held + 4096)
    longllama.load(tmp_path / "q", dtype=torch.bfloat16)


def block_scales(path, dequantized: dict, qtype) -> dict:
    """{GGUF name: the bound on a kept int4 weight's distance from the file's, per weight}, for Q4_0 / Q4_1 matrices:
    a block's d and m are float16, and the kernel takes scale d and zero point m + 8 d in bfloat16, whose rounding
    moves each by at most 2^-8 of itself: a weight (q - 8) d + zero, q in [0, 15], by at most 2^-8 (8 |d| + |zero|)."""
    header = 2 if qtype == Q4_0 else 4
    bounds = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name not in dequantized or tensor.tensor_type != qtype:
            continue
        blocks = np.asarray(tensor.data).reshape(tensor.data.shape[0], -1, header + 16)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16).astype(np.float64)[..., 0])
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).astype(np.float64)[..., 0]) if header == 4 else 0
        bounds[tensor.name] = (2**-8 * (8 * d.abs() + (m + 8 * d).abs() * (header == 4))).repeat_interleave(32, 1)
    return bounds


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1])
def test_4_bit_blocks_keep_the_files_values_to_the_bfloat16_rounding_of_scale_and_zero(qtype, tmp_path):
    """Q4_0 / Q4_1 blocks of 32 are int4 groups of 32 value for value: each weight differs from the file's only by
    the bfloat16 rounding of its block's scale and zero point (measured: at most 0.031 of a step for Q4_0, 0.046 for
    SmolLM2-135M's Q4_1), far below a wrong value, nibble, block or row."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=64)
    dequantized = write_quantized_gguf(tmp_path / "model.gguf", config, qtype)
    bounds = block_scales(tmp_path / "model.gguf", dequantized, qtype)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    stored = dequantized_layers(tmp_path / "ours")
    layers = config["num_hidden_layers"]
    expected = fused_from_gguf(unpermuted(dequantized, config), layers)
    bound = fused_from_gguf(unpermuted({**bounds, "output.weight": bounds["blk.0.attn_q.weight"]}, config), layers)
    for name, weight in expected.items():
        if name == "lm_head.weight":  # Q8_0 in this file: int8
            continue
        assert (stored[name] - weight).abs().le(bound[name] * (1 + 1e-6)).all(), name
        assert not torch.equal(stored[name], weight)  # the rounding is there: most float16 scales are not bfloat16's


@pytest.mark.parametrize("embedding, lm_head", [(Q8_0, "float"), (Q4_0, "int4")])
def test_a_tied_gguf_embedding_gives_lm_head_the_files_values_and_old_checkpoints_load_as_before(embedding, lm_head,
                                                                                              tmp_path):
    """A tied output layer keeps the file's values: an embedding in 4-bit blocks becomes an int4 lm_head value for
    value; one in Q8_0 (as llama.cpp keeps it in a Q4 file) a float lm_head (int8's one scale per row cannot hold
    Q8_0's 32-wide blocks; see docs/quantization.md), stored in bfloat16, not int4 quantized afresh by load(). A
    checkpoint without it (converted before) still loads with lm_head quantized from the embedding."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=64,
                       tie_word_embeddings=True)
    dequantized = {}

    def encode(name, array):  # the layers in Q4_0, the embedding as named
        kind = embedding if name == "token_embd.weight" else Q4_0
        data = gguf.quants.quantize(array, kind)
        dequantized[name] = torch.from_numpy(gguf.quants.dequantize(data, kind)).double()
        return data, kind

    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), Q4_0, encode=encode)
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    model = longllama.load(tmp_path / "ours")
    assert model.config.tie_word_embeddings and model.config.quantization == "int4"
    assert model.layers[0].mlp.down.scheme == "int4"
    file_embedding = dequantized["token_embd.weight"]
    tensors = load_file(tmp_path / "ours" / "model.safetensors")
    if lm_head == "float":
        assert isinstance(model.lm_head, torch.nn.Linear) and "lm_head.scales" not in tensors
        assert tensors["lm_head.weight"].dtype == torch.bfloat16
        weight = model.lm_head.weight.double()
        assert (weight - file_embedding).abs().le(2**-8 * file_embedding.abs()).all()  # bfloat16's rounding
    else:
        assert model.lm_head.scheme == "int4"
        weight = dequantized_layers(tmp_path / "ours")["lm_head.weight"]
        bound = block_scales(tmp_path / "model.gguf", dequantized, Q4_0)["token_embd.weight"]
        assert (weight - file_embedding).abs().le(bound * (1 + 1e-6)).all()
    hidden = torch.randn(5, 256)
    assert torch.allclose(model.lm_head(hidden).double(), hidden.bfloat16().double() @ weight.T, rtol=0.02, atol=0.05)

    # a checkpoint converted before lm_head was stored: load() quantizes the embedding afresh, as it did
    del tensors["lm_head.weight"]
    tensors.pop("lm_head.scales", None), tensors.pop("lm_head.zeros", None)
    save_file(tensors, tmp_path / "ours" / "model.safetensors")
    old = longllama.load(tmp_path / "ours")
    assert old.lm_head.scheme == "int4" and old.lm_head.group == quantize.INT4_GROUP
    assert torch.equal(old.lm_head(hidden), quantize.QuantizedLinear.quantized(old.embed.weight, "int4")(hidden))


def test_a_tied_lm_head_stays_as_stored_through_ours_to_ours_and_leaves_with_the_embedding(tmp_path):
    """Converting the checkpoint again (here: new memory layers) keeps every stored layer as it is (an int4
    checkpoint's int8 and float layers are not requantized to int4); --to hf writes the tied model, without it."""
    config = hf_config(hidden_size=256, intermediate_size=256, num_attention_heads=4, vocab_size=72,
                       tie_word_embeddings=True)  # 72 rows: an int4 lm_head would not fit the kernel
    hf = random_hf_tensors(config)
    write_gguf(tmp_path / "model.gguf", config, hf, Q4_0,
               encode=lambda name, array: (gguf.quants.quantize(array, Q8_0 if "embd" in name else Q4_0),
                                           Q8_0 if "embd" in name else Q4_0))
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "again"), "--mem-layers", "1"])
    first, again = (load_file(tmp_path / name / "model.safetensors") for name in ("ours", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[name], again[name]) for name in first)
    assert longllama.load(tmp_path / "again").config.mem_layers == [1]
    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in back and json.loads((tmp_path / "hf" / "config.json").read_text())[
        "tie_word_embeddings"]
    assert torch.equal(back["model.embed_tokens.weight"], first["embed.weight"])


MEMORY_CHECK = """
import sys
sys.path.insert(0, {root!r})
import convert_weights, quantize

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

# dequantize and quantize a few rows at a time, few enough that their float32 copies are small beside the file
convert_weights.QUANTIZED_CHUNK = quantize.QUANTIZED_CHUNK = 1 << 15
convert_weights.main([{small!r}, {small_out!r}])  # every code path once: what it loads is not the conversion's
before = status("VmRSS")
convert_weights.main([{large!r}, {large_out!r}])
print((status("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads its memory from /proc")
def test_converting_a_gguf_holds_about_one_tensor_not_the_file(tmp_path):
    """A 60 MB Q8_0 file converts in a subprocess whose memory grows by less than a third of the file (measured:
    9-11 MB; 250-320 MB when the converter held the converted model and mapped the whole file): its tensors are
    read one at a time (not through a mapping of the whole file, whose pages would stay resident), converted a few
    rows at a time, and written as they come."""
    config = hf_config(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_hidden_layers=16,
                       vocab_size=4096, mem_layers=[])
    rng = np.random.default_rng(0)

    def random_q8_0(name, array):  # random blocks, d of a trained model's size: fast at this size
        blocks = rng.integers(-127, 128, size=(array.shape[0], array.shape[1] // 32, 34), dtype=np.int8).view(np.uint8)
        blocks[..., 0:2] = np.array([1e-3], dtype=np.float16).view(np.uint8)
        return blocks.reshape(array.shape[0], -1), Q8_0

    small = hf_config(mem_layers=[])
    write_gguf(tmp_path / "small.gguf", small, random_hf_tensors(small), Q8_0)
    write_gguf(tmp_path / "large.gguf", config, random_hf_tensors(config), Q8_0, encode=random_q8_0)
    size = (tmp_path / "large.gguf").stat().st_size
    assert size > 55e6
    script = MEMORY_CHECK.format(root=str(ROOT), small=str(tmp_path / "small.gguf"), small_out=str(tmp_path / "s"),
                                 large=str(tmp_path / "large.gguf"), large_out=str(tmp_path / "l"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    assert growth < size / 3, f"converting a {size / 1e6:.0f} MB file took {growth / 1e6:.0f} MB more"
    model = longllama.load(tmp_path / "l")
    assert model.config.quantization == "int8" and model.layers[15].mlp.down.weight.dtype == torch.int8
