"""generate.py: the generation loop against a hand-written greedy decode, sampling, the CLI and its errors."""

import subprocess
import sys

import pytest
import torch

import convert_weights
import generate
import longllama
from conftest import ROOT, openllama_tokenizer
from test_model import WINDOW, tiny_model, tokens
from test_train import assets, synthetic_text  # noqa: F401 (assets is a fixture)
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with the OpenLLaMA v1 tokenizer (vocab 32000)."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = longllama.LongLlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=32, mem_layers=[1],
                                       last_context_length=16)
    longllama.save(longllama.LongLlama(config), out)
    (out / "tokenizer.model").write_bytes(openllama_tokenizer("open_llama_v1.model").read_bytes())
    return out


def greedy_by_hand(model, prompt, steps):
    """Greedy decoding written out with the model API: prompt into the cache, then one token per call."""
    with torch.no_grad():
        logits, cache = model(torch.tensor([prompt]), use_cache=True)
        out = []
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits, cache = model(torch.tensor([[out[-1]]]), cache=cache, use_cache=True)
    return out


def test_greedy_generation_equals_step_by_step_greedy_decode_through_evictions(assets):
    model, tok = longllama.load(assets["init"]), Tokenizer(assets["tokenizer"])
    window = model.config.max_position_embeddings
    document = synthetic_text(1, lines=12)
    prompt = tok.encode(document)
    assert len(prompt) > 3 * window
    documents = generate.read(model, tok, document)
    result = generate.answer(model, tok, documents, None, generate.Sampling(2 * window + 3, temperature=0))
    expected = greedy_by_hand(model, prompt, 2 * window + 3)
    assert tok.eos_id not in expected and result.tokens == [expected]
    assert result.texts == [tok.decode(prompt + expected)[len(tok.decode(prompt)):]]
    assert documents.cache.memory_size == len(prompt) - model.config.last_context_length


def test_generation_stops_after_eos(assets):
    model, tok = longllama.load(assets["init"]), Tokenizer(assets["tokenizer"])
    document = synthetic_text(2, lines=2)
    expected = greedy_by_hand(model, tok.encode(document), 8)
    tok.eos_id = expected[4]  # the fifth token plays EOS
    result = generate.answer(model, tok, generate.read(model, tok, document), None, generate.Sampling(8, 0))
    assert result.tokens == [expected[:expected.index(expected[4]) + 1]]


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k_and_top_p(assets):
    model, tok = longllama.load(assets["init"]), Tokenizer(assets["tokenizer"])
    documents = generate.read(model, tok, synthetic_text(3, lines=2))
    questions = ["def alpha", "return"]
    first = generate.generate(model, tok, documents, questions, 12, temperature=1.0, seed=3)
    assert first == generate.generate(model, tok, documents, questions, 12, temperature=1.0, seed=3)
    greedy = generate.generate(model, tok, documents, questions, 12, temperature=0)
    assert first != greedy
    assert generate.generate(model, tok, documents, questions, 12, temperature=1.0, top_k=1, seed=5) == greedy
    assert generate.generate(model, tok, documents, questions, 12, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_sample_draws_only_from_the_allowed_set():
    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {generate.sample(logits, 1.0, top_k=2, generator=g) for _ in range(300)} == {1, 2}
    probs = logits.softmax(-1)  # p = [.03, .50, .45, .02, .005...]: top_p 0.9 keeps exactly tokens 1 and 2
    assert probs[1] < 0.9 < probs[1] + probs[2]
    assert {generate.sample(logits, 1.0, top_p=0.9, generator=g) for _ in range(300)} == {1, 2}
    assert generate.sample(logits, 0.0) == 1


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=120)


def test_cli_streams_the_greedy_continuation_of_a_long_prompt_and_prints_stats(checkpoint, tmp_path):
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text("def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 10)
    result = run_cli("--ckpt", str(checkpoint), "--prompt-file", str(prompt_file), "--max-new-tokens", "12",
                     "--temperature", "0", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    prompt = tok.encode(prompt_file.read_text())
    model = longllama.load(checkpoint)
    sampled = greedy_by_hand(model, prompt, 12)
    expected = sampled[:sampled.index(tok.eos_id) + 1] if tok.eos_id in sampled else sampled  # EOS ends an answer
    assert result.stdout == tok.decode(prompt + expected)[len(tok.decode(prompt)):] + "\n"
    document_stats, answer_stats = result.stderr.strip().splitlines()[-2:]
    assert f"document {len(prompt)} tokens | memory {len(prompt) - 16} entries" in document_stats
    assert " MiB | read in " in document_stats and "tok/s" in document_stats
    assert answer_stats.startswith(f"answer {len(expected)} tokens | first token ")
    assert "tok/s" in answer_stats and "peak" in answer_stats


def test_cli_reads_the_prompt_from_stdin(checkpoint):
    result = run_cli("--ckpt", str(checkpoint), "--prompt-file", "-", "--max-new-tokens", "3", "--seed", "1",
                     stdin="héllo wörld 🙂")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    assert f"document {len(tok.encode('héllo wörld 🙂'))} tokens" in result.stderr


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, torch.float32)])
def test_the_default_dtype_is_bfloat16_where_the_cpu_multiplies_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert generate.default_dtype(torch.device("cpu")) == expected
    assert generate.default_dtype(torch.device("cuda")) == torch.bfloat16


def expect_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_bad_inputs_give_one_clear_line_and_a_non_zero_exit(checkpoint, tmp_path, capsys, monkeypatch):
    ckpt = str(checkpoint)
    expect_error(capsys, ["--ckpt", str(tmp_path / "missing"), "--prompt", "x"], "does not exist")
    expect_error(capsys, ["--ckpt", ckpt, "--prompt", "  \n"], "prompt is empty")
    expect_error(capsys, ["--ckpt", ckpt, "--prompt-file", str(tmp_path / "nope.txt")], "cannot read prompt file")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    expect_error(capsys, ["--ckpt", ckpt, "--prompt-file", str(binary)], "cannot read prompt file")
    expect_error(capsys, ["--ckpt", ckpt, "--prompt", "x", "--mem-attention-grouping", "4"], "mem_attention_grouping")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    expect_error(capsys, ["--ckpt", str(broken), "--prompt", "x"], "model.safetensors is missing")
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    expect_error(capsys, ["--ckpt", str(broken), "--prompt", "x"], "cannot read weights")
    (broken / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    (broken / "config.json").write_text("{not json")
    expect_error(capsys, ["--ckpt", str(broken), "--prompt", "x"], "cannot read config")
    (broken / "config.json").write_text((checkpoint / "config.json").read_text().replace('"hidden_size": 32',
                                                                                        '"hidden_size": 64'))
    expect_error(capsys, ["--ckpt", str(broken), "--prompt", "x"], "has shape")
    (broken / "tokenizer.model").write_bytes(b"garbage")
    expect_error(capsys, ["--ckpt", str(broken), "--prompt", "x"], "not a SentencePiece model")
    convert_weights.export_hf(checkpoint, tmp_path / "hf")  # a Hugging Face directory, not yet converted
    expect_error(capsys, ["--ckpt", str(tmp_path / "hf"), "--prompt", "x"], "convert it first")

    monkeypatch.setattr(generate, "available_bytes", lambda device: 1 << 16)
    expect_error(capsys, ["--ckpt", ckpt, "--prompt", "word " * 500], "needs about")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 8589934592 bytes.")])
def test_running_out_of_memory_in_a_command_is_one_error_line(capsys, error):
    def job():
        raise error
    with pytest.raises(SystemExit) as exit_:
        generate.as_command(job)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: out of memory") and err.count("\n") == 1


def test_a_failed_compilation_in_a_command_is_one_error_line_not_taken_for_a_lack_of_memory(capsys):
    def job():
        raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)
    with pytest.raises(SystemExit) as exit_:
        generate.as_command(job)
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("error: torch.compile failed") and err.count("\n") == 1


def test_other_runtime_errors_in_a_command_are_not_called_a_lack_of_memory():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        generate.as_command(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_prompt_memory_estimate_is_the_memory_plus_a_workspace_bounded_by_the_window():
    config = longllama.LongLlamaConfig(**longllama.PRESETS["3b"])
    kv_bytes = 3 * 2 * 3200 * 2  # 3 memory layers x (key + value) x hidden x bfloat16
    estimates = {n: generate.prompt_memory_bytes(config, n, torch.bfloat16) for n in (4096, 131072, 1 << 20)}
    workspaces = {n: estimate - (n - 1024) * kv_bytes for n, estimate in estimates.items()}
    assert len(set(workspaces.values())) == 1 and 0 < workspaces[4096] < 2**31  # the same, whatever the memory


def test_prompt_memory_estimate_covers_the_memory_a_read_really_holds():
    model = tiny_model(mem_layers=[0, 2], mem_dtype="bfloat16")
    _, cache = model(tokens(1, 7 * WINDOW + 3), use_cache=True)
    held = sum(t.nbytes for memory in cache.memory.values() for t in memory.view()[:2])
    held += sum(c.keys.nbytes + c.values.nbytes for c in cache.local)
    assert held <= generate.prompt_memory_bytes(model.config, 7 * WINDOW + 3, torch.float32) < 4 * held + 2**20


def test_the_readme_python_example_runs_as_written_and_each_answer_equals_a_fresh_read(checkpoint, tmp_path):
    readme = (ROOT / "docs" / "sessions.md").read_text()
    example = readme.split("## From Python\n\n```python\n", 1)[1].split("```", 1)[0]
    document = tmp_path / "long.txt"
    document.write_text("The grass is green. The sky is blue. Here we go. " * 120)  # ~2k tokens: many windows
    script = (example.replace('ckpt = "ckpt/long_llama_3b_v1_1"', f"ckpt = {str(checkpoint)!r}")
              .replace('open("long.txt")', f"open({str(document)!r})"))
    assert script != example and "torch.no_grad" not in script and "inference_mode" not in script
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    # the same questions, each after its own fresh read of the document, greedy by hand with the model API
    model, tok = longllama.load(checkpoint), Tokenizer(checkpoint / "tokenizer.model")

    def fresh_answer(question, stop=None):
        _, cache = model(torch.tensor([tok.encode(document.read_text())]), use_cache=True)
        question_ids = tok.encode(question, bos=False)
        ids, answer = torch.tensor([question_ids]), []
        while len(answer) < 20 and tok.eos_id not in answer:
            logits, cache = model(ids, cache=cache, use_cache=True)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            answer.append(ids.item())
        text = tok.decode(question_ids + answer)[len(tok.decode(question_ids)):]
        return text.split(stop)[0] if stop else text

    questions = ["\nQ: Who wrote it?\nA:", "\nQ: When was it written?\nA:"]
    expected = [question.strip() + " " + fresh_answer(question, stop="\n").strip() + "\n" for question in questions]
    expected.append(fresh_answer("\nQ: What is it about?\nA:") + "\n")  # streamed, with no stop string
    assert result.stdout == "".join(expected)


def test_inference_records_no_autograd_graph_and_its_cache_copies():
    model = tiny_model()
    assert torch.is_grad_enabled()
    logits, cache = model(tokens(1, 3 * WINDOW), use_cache=True)
    assert not logits.requires_grad
    copied = cache.copy()
    assert torch.equal(copied.local[0].keys, cache.local[0].keys)
    assert copied.local[0].keys.data_ptr() != cache.local[0].keys.data_ptr()
