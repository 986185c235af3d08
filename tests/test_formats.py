"""Every checkpoint format: GGUF vocabularies in (SentencePiece and byte-level BPE), GGUF out and back, Llama-3 and
Code-7B shaped checkpoints end to end.

GGUF files are written here the way llama.cpp's converter writes them, from the source tokenizer called directly
(sentencepiece, tokenizers); expected encodings come from those source tokenizers, expected logits from models
built from hand-fused (and hand-quantized) tensors, never from the code under test.
"""
import json
import math
import shutil

import gguf
import jinja2
import pytest
import sentencepiece as spm
import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

import convert_weights
import generate
import longllama
import train
from conftest import openllama_tokenizer
from test_convert import (fuse_by_hand, hand_loaded_model, hf_config, llama_config, logits_of, quantized,
                          random_hf_tensors, write_gguf, write_hf)
from test_generate import greedy_by_hand
from test_tokenizer import CODE, TEXTS
from tokenizer import checkpoint_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*plain LLaMA limited")

SAMPLES = TEXTS + [CODE, "Größe, Ärger, ñandú; Привет, мир; مرحبا بالعالم; 你好，世界; こんにちは; 안녕하세요; नमस्ते 👋🏽",
                   "fn main() {\n\tlet v: Vec<u8> = vec![0xFF; 4];\n    println!(\"{:?}\", v);\r\n}\n"]
F16, Q8_0 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
# What each OpenLLaMA model's normalizer_spec says (remove_extra_whitespaces); v1 collapses runs of spaces.
COLLAPSES_SPACES = {"open_llama_v1.model": True, "open_llama_v2.model": False}
CHAT_TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>" \
                "{% endfor %}"


# ---------------------------------------------------------------------------------------------------- vocabularies


def sentencepiece_vocabulary(model_path, vocab_size, normalizer_keys: bool):
    """tokenizer.ggml.* as llama.cpp's _create_vocab_sentencepiece writes them (padding to vocab_size with [PADi]);
    normalizer_keys adds the two whitespace rules, which its LLaMA converter leaves out (llama.cpp's defaults)."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, scores, types = [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size, [UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)

    def add(writer):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        if normalizer_keys:
            writer.add_add_space_prefix(True)
            writer.add_remove_extra_whitespaces(COLLAPSES_SPACES[model_path.name])
        writer.add_chat_template(CHAT_TEMPLATE)
    return add


def train_bpe(directory) -> tokenizers.Tokenizer:
    """A small byte-level BPE tokenizer built like Llama-3's (its split regex, ignore_merges, special tokens), saved
    as tokenizer.json with a tokenizer_config.json naming BOS/EOS and holding a chat template."""
    llama3_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3_split), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLES * 3 + [open(convert_weights.__file__).read()], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE}))
    return tok


def bpe_vocabulary(tokenizer_json, vocab_size):
    """tokenizer.ggml.* as llama.cpp's _set_vocab_gpt2 writes them for Llama-3 (pre-tokenizer "llama-bpe")."""
    spec = json.loads(tokenizer_json.read_text())
    added = {t["id"]: t for t in spec["added_tokens"]}
    by_id = {i: token for token, i in spec["model"]["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in by_id else NORMAL if i not in added else CONTROL if added[i]["special"]
             else USER_DEFINED for i in range(vocab_size)]

    def add(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
        writer.add_chat_template(CHAT_TEMPLATE)
    return add


def llama3_config(tok: tokenizers.Tokenizer, **overrides) -> dict:
    """Llama-3's config.json at toy size: grouped-query attention, a large rope_theta, a vocabulary from tok."""
    return llama_config(vocab_size=tok.get_vocab_size(), num_key_value_heads=2, rope_theta=500000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=32, bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                        eos_token_id=tok.token_to_id("<|eot_id|>"), **overrides)


def assert_encodes_like_sentencepiece(ckpt, model_path):
    ours, source = checkpoint_tokenizer(ckpt), spm.SentencePieceProcessor(model_file=str(model_path))
    for text in SAMPLES:
        assert ours.encode(text) == [source.bos_id()] + source.encode(text), text
        assert ours.decode(ours.encode(text)) == source.decode(source.encode(text)), text
    assert (ours.bos_id, ours.eos_id) == (source.bos_id(), source.eos_id())


def assert_encodes_like_tokenizers(ckpt, source: tokenizers.Tokenizer):
    ours = checkpoint_tokenizer(ckpt)
    bos, eos = source.token_to_id("<|begin_of_text|>"), source.token_to_id("<|eot_id|>")
    assert (ours.bos_id, ours.eos_id) == (bos, eos)
    for text in SAMPLES:
        ids = source.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == [bos] + ids, text
        assert ours.decode(ours.encode(text)) == source.decode(ids), text


# ---------------------------------------------------------------------------------------------------- GGUF vocabulary in


@pytest.mark.parametrize("name, normalizer_keys", [("open_llama_v1.model", True), ("open_llama_v2.model", False)])
def test_gguf_sentencepiece_vocabulary_becomes_a_tokenizer_model_that_encodes_like_the_original(tmp_path, name,
                                                                                                  normalizer_keys):
    model_path = openllama_tokenizer(name)
    config = hf_config(vocab_size=32000)
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), Q8_0,
               vocabulary=sentencepiece_vocabulary(model_path, 32000, normalizer_keys))
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours"), "--mem-layers", "1"])
    assert_encodes_like_sentencepiece(tmp_path / "ours", model_path)
    saved = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert saved == {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}


def test_gguf_bpe_vocabulary_becomes_a_tokenizer_json_that_encodes_like_the_original(tmp_path):
    source = train_bpe(tmp_path / "bpe")
    config = llama3_config(source)
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), Q8_0,
               vocabulary=bpe_vocabulary(tmp_path / "bpe" / "tokenizer.json", config["vocab_size"]))
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    assert_encodes_like_tokenizers(tmp_path / "ours", source)
    saved = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert saved == {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE}


def test_tokenizer_flag_overrides_the_gguf_vocabulary(tmp_path):
    v1, v2 = openllama_tokenizer("open_llama_v1.model"), openllama_tokenizer("open_llama_v2.model")
    config = hf_config(vocab_size=32000)
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), F16,
               vocabulary=sentencepiece_vocabulary(v1, 32000, True))
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours"), "--tokenizer", str(v2)])
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == v2.read_bytes()


def test_a_known_longllama_name_selects_its_memory_layers_with_a_line_on_stderr(tmp_path, capsys):
    config = llama_config(num_hidden_layers=19)
    writer_name = "LongLLaMA-3Bv1.1"
    write_gguf(tmp_path / "model.gguf", config, random_hf_tensors(config), F16,
               vocabulary=lambda writer: writer.add_name(writer_name))
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "ours")])
    assert longllama.load(tmp_path / "ours").config.mem_layers == [6, 12, 18]
    assert "'LongLLaMA-3Bv1.1' is a LongLLaMA model: memory layers [6, 12, 18]" in capsys.readouterr().err
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "flag"), "--mem-layers", "2,4"])
    assert longllama.load(tmp_path / "flag").config.mem_layers == [2, 4]


# ---------------------------------------------------------------------------------------------------- GGUF out and back


@pytest.mark.parametrize("gguf_type, qtype", [("f16", F16), ("q8_0", Q8_0)])
def test_gguf_export_loads_back_to_the_logits_of_the_rounded_weights_and_the_same_tokenizer(tmp_path, gguf_type, qtype):
    model_path = openllama_tokenizer("open_llama_v2.model")
    config = hf_config(vocab_size=32000, num_key_value_heads=2, mem_layers=[1], mem_dtype="float32")
    hf = random_hf_tensors(config)
    write_hf(tmp_path / "hf", config, hf, "safetensors")
    shutil.copy(model_path, tmp_path / "hf" / "tokenizer.model")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "model.gguf"), "--to", "gguf", "--type", gguf_type])
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "back"), "--dtype", "float32"])

    back = longllama.load(tmp_path / "back")
    assert back.config == longllama.LongLlamaConfig.from_dict(config)  # memory settings travel as longllama.*
    # quantization works on blocks along a row and permuting q/k rows commutes with it: rounding each HF tensor
    # directly gives exactly the weights that must come back
    assert torch.equal(logits_of(back), logits_of(hand_loaded_model(config, quantized(hf, qtype))))
    for name, weight in fuse_by_hand(hf, config["num_hidden_layers"]).items():
        error = (back.state_dict()[name] - weight).abs()
        assert (error <= rounding_bound(weight, gguf_type)).all(), name
    assert_encodes_like_sentencepiece(tmp_path / "back", model_path)


def rounding_bound(weight, gguf_type):
    """The most a weight can move when stored as gguf_type: float16 rounds to 11 significant bits; Q8_0 stores each run
    of 32 weights along a row as int8 multiples of a step, (largest |w| of the run) / 127, stored as float16."""
    if weight.dim() == 1:
        return torch.zeros_like(weight)  # norms stay float32
    if gguf_type == "f16":
        return (weight.abs() * 2**-11).clamp(min=2**-25)  # below 2**-14 float16 steps are 2**-24 apart
    step = weight.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
    # half a step, plus up to 127 times the step's own float16 rounding (weights are rounded before the step is)
    return (step * (1 / 2 + 127 * 2**-11)).expand(-1, 32).reshape(weight.shape)



# ---------------------------------------------------------------------------------------------------- Llama-3, Code-7B


def write_llama3(directory, **overrides):
    """A Llama-3 shaped Hugging Face checkpoint: config.json, safetensors, tokenizer.json, tokenizer_config.json."""
    source = train_bpe(directory.with_name("bpe"))
    config = llama3_config(source, **overrides)
    hf = random_hf_tensors(config)
    write_hf(directory, config, hf, "safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(directory.with_name("bpe") / name, directory / name)
    return source, config, hf


def generated_text(capsys, ckpt, prompt, steps=8) -> str:
    generate.main(["--ckpt", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(steps), "--temperature", "0",
                   "--device", "cpu", "--dtype", "float32"])  # as the references compute
    return capsys.readouterr().out


def test_llama3_checkpoint_with_tokenizer_json_converts_generates_and_fot_trains(tmp_path, capsys):
    source, config, hf = write_llama3(tmp_path / "hf")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the chat template travels in tokenizer_config.json
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    model = longllama.load(tmp_path / "ours")
    assert model.config.mem_layers == [] and model.config.last_context_length == 32  # plain, its whole window

    prompt = "def greet(name):\n    return f'Hello, {name}!'\n" * 3
    capsys.readouterr()
    printed = generated_text(capsys, tmp_path / "ours", prompt)
    prompt_ids = [source.token_to_id("<|begin_of_text|>")] + source.encode(prompt, add_special_tokens=False).ids
    expected = greedy_by_hand(hand_loaded_model(config, hf), prompt_ids, 8)
    eos = source.token_to_id("<|eot_id|>")
    expected = expected[:expected.index(eos)] if eos in expected else expected
    assert printed == source.decode(expected, skip_special_tokens=True) + "\n"

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(SAMPLES):
        (corpus / f"doc{i}.txt").write_text(text * 4)
    train.main(["--init", str(tmp_path / "ours"), "--mem-layers", "1", "--data", str(corpus), "--out",
                str(tmp_path / "fot"), "--batch-size", "4", "--seq-len", "16", "--packing", "2",
                "--cross-batch-range", "1", "--max-steps", "2", "--eval-every", "0", "--log-every", "1"])
    assert longllama.load(tmp_path / "fot").config.mem_layers == [1]
    assert (tmp_path / "fot" / "tokenizer_config.json").read_bytes() == (tmp_path / "hf" / "tokenizer_config.json").read_bytes()
    assert_encodes_like_tokenizers(tmp_path / "fot", source)


def test_a_converted_llama3_checkpoint_is_prompted_through_its_chat_template_as_jinja_renders_it(tmp_path, capsys):
    source = write_llama3(tmp_path / "hf")[0]
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    document, question = "def greet(name):\n    return name", "What does greet return?"
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=[{"role": "user", "content": f"{document}\n\n{question}"}])
    tok = checkpoint_tokenizer(tmp_path / "ours")
    chat = generate.prompt_format("chat", tmp_path / "ours", tok)
    # the document is encoded apart from what follows it (it is read once): equal where no token spans the two
    assert chat.document_ids(tok, document) + chat.question_ids(tok, question) == source.encode(rendered).ids
    capsys.readouterr()
    generate.main(["--ckpt", str(tmp_path / "ours"), "--prompt", document, "--template", "chat", "--question", question,
                   "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out.startswith("Q: What does greet return?\nA: ")


def test_llama3_checkpoint_exports_to_gguf_with_its_bpe_vocabulary(tmp_path):
    source, config, hf = write_llama3(tmp_path / "hf")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "model.gguf"), "--to", "gguf", "--type", "q8_0"])
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    field = reader.get_field
    assert field("tokenizer.ggml.model").contents() == "gpt2" and field("tokenizer.ggml.pre").contents() == "llama-bpe"
    assert field("tokenizer.chat_template").contents() == CHAT_TEMPLATE
    convert_weights.main([str(tmp_path / "model.gguf"), str(tmp_path / "back"), "--dtype", "float32"])
    assert_encodes_like_tokenizers(tmp_path / "back", source)
    assert torch.equal(logits_of(longllama.load(tmp_path / "back")),
                       logits_of(hand_loaded_model(config, quantized(hf, Q8_0))))


def test_code_7b_shaped_checkpoint_converts_generates_and_exports(tmp_path, capsys):
    """LongLLaMA-Code-7B scaled down: vocabulary 32016 (more rows than its tokenizer's 32000 pieces), rope_theta 1e6,
    rms_norm_eps 1e-5, memory layers in every layer but the first (8/16/24 of 32)."""
    model_path = openllama_tokenizer("open_llama_v2.model")  # stands in for Code Llama's tokenizer
    config = hf_config(vocab_size=32016, rope_theta=1e6, rms_norm_eps=1e-5, num_hidden_layers=4, mem_layers=[1, 2, 3],
                       mem_dtype="float32")
    hf = random_hf_tensors(config)
    write_hf(tmp_path / "hf", config, hf, "bin-sharded")
    shutil.copy(model_path, tmp_path / "hf" / "tokenizer.model")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    prompt = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 3
    capsys.readouterr()
    printed = generated_text(capsys, tmp_path / "ours", prompt)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    expected = greedy_by_hand(hand_loaded_model(config, hf), [1] + sp.encode(prompt), 8)
    expected = expected[:expected.index(2)] if 2 in expected else expected
    assert printed == sp.decode([i for i in expected if i < 32000 and i not in (0, 1)]) + "\n"

    convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "code.gguf"), "--to", "gguf", "--type", "q8_0"])
    tokens = gguf.GGUFReader(tmp_path / "code.gguf").get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == 32016 and tokens[32000:] == [f"[PAD{i}]" for i in range(32000, 32016)]  # as llama.cpp pads
    convert_weights.main([str(tmp_path / "code.gguf"), str(tmp_path / "back"), "--dtype", "float32"])
    assert longllama.load(tmp_path / "back").config == longllama.LongLlamaConfig.from_dict(config)
    assert_encodes_like_sentencepiece(tmp_path / "back", model_path)


LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_gives_llama_cpps_frequency_factors():
    """llama.cpp's converter writes Llama-3.1's scaling as one divisor per frequency, computed in a loop: the rotary
    tables must turn at those frequencies."""
    head_dim, theta, scaling = 128, 500000.0, LLAMA31_ROPE_SCALING
    low_wavelength = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wavelength = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    expected, branches = [], set()
    for i in range(0, head_dim, 2):
        frequency = 1.0 / theta ** (i / head_dim)
        wavelength = 2 * math.pi / frequency
        if wavelength < high_wavelength:
            divisor, branch = 1.0, "kept"
        elif wavelength > low_wavelength:
            divisor, branch = scaling["factor"], "divided"
        else:
            branch = "blended"
            smooth = (scaling["original_max_position_embeddings"] / wavelength - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            divisor = 1 / ((1 - smooth) / scaling["factor"] + smooth)
        expected.append(frequency / divisor)
        branches.add(branch)
    assert branches == {"kept", "divided", "blended"}
    position = 1000
    cos, sin = longllama.rope_tables(head_dim, position + 1, theta, scaling)
    angles = torch.tensor(expected, dtype=torch.float64) * position
    assert torch.allclose(cos[position].double(), torch.cat([angles.cos(), angles.cos()]), atol=1e-4)
    assert torch.allclose(sin[position].double(), torch.cat([angles.sin(), angles.sin()]), atol=1e-4)


def test_llama31_checkpoint_keeps_its_rope_scaling_and_other_scalings_are_refused(tmp_path, capsys):
    source, config, hf = write_llama3(tmp_path / "hf", rope_scaling=LLAMA31_ROPE_SCALING)
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    model = longllama.load(tmp_path / "ours")
    assert model.config.rope_scaling == LLAMA31_ROPE_SCALING
    assert not torch.equal(model.rope_cos, longllama.LongLlama(longllama.LongLlamaConfig.from_dict(
        {**config, "rope_scaling": None})).rope_cos)
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "model.gguf"), "--to", "gguf"])
    assert "rope_scaling cannot be written to GGUF" in capsys.readouterr().err

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_scaling": yarn}))
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "yarn")])
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "rope_scaling must be null or" in error and error.count("\n") == 1


def test_gguf_export_writes_nothing_when_it_fails_and_replaces_a_file_only_with_force(tmp_path, capsys, monkeypatch):
    config = hf_config(vocab_size=32000)
    write_hf(tmp_path / "hf", config, random_hf_tensors(config), "safetensors")
    shutil.copy(openllama_tokenizer("open_llama_v2.model"), tmp_path / "hf" / "tokenizer.model")
    convert_weights.main([str(tmp_path / "hf"), str(tmp_path / "ours")])
    (tmp_path / "model.gguf").write_text("precious")
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "model.gguf"), "--to", "gguf"])
    assert "exists (--force replaces it)" in capsys.readouterr().err

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(SystemExit):
        convert_weights.main([str(tmp_path / "ours"), str(tmp_path / "model.gguf"), "--to", "gguf", "--force"])
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device\n"
    assert (tmp_path / "model.gguf").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.gguf", "ours"]
