"""Bad input, as a user types it and as a hostile file holds it: one `error: ` line on stderr, a non-zero exit status,
no traceback, and nothing written. Checked where each value enters: config.json and load(), generate.py, train.py
and convert_weights.py.

Most cases run the commands' main() in-process; subprocesses run only where the process itself is the point
(stdin, argv bytes, an interrupt).
"""

import io
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench
import checkpoint
import context_scaling
import convert_weights
import documents
import generate
import longllama
import passkey
import train
from conftest import ROOT
from test_generate import checkpoint as openllama_checkpoint  # noqa: F401 (a fixture: OpenLLaMA's tokenizer)
from test_train import assets, small_run  # noqa: F401 (assets is a fixture)
from tokenizer import Tokenizer

TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, mem_layers=[1], last_context_length=16, mem_dtype="float32")
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # valid JSON, but parsing it recurses past Python's limit


@pytest.fixture(scope="module")
def trained_run(assets, tmp_path_factory):
    """A two-step run from test_train's tiny checkpoint (assets): the state files that the damage tests break."""
    out = tmp_path_factory.mktemp("run") / "run"
    train.main(small_run(assets, out, "--max-steps", "2"))
    return out


def snapshot(directory):
    """Every file under directory with its bytes: to show that nothing was written."""
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()} if directory.exists() else None


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def exits_with_one_error_line(capsys, main, argv) -> str:
    """Run a command's main() in-process; it must exit with status 1 and one error line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 1
    return one_error_line(capsys.readouterr().err)


def rewrite(path, change):
    """Replace a file: by bytes, or by a function of its JSON; None deletes it."""
    if change is None:
        path.unlink()
    elif isinstance(change, bytes):
        path.write_bytes(change)
    else:
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def changed(**values):
    """A change for rewrite(): these keys of a JSON object set to these values."""
    return lambda old: {**old, **values}


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def run_command(script, *args, stdin=b"", cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *args], input=stdin, capture_output=True, timeout=120,
                          cwd=cwd)


# ------------------------------------------------------------------------------------------------------ config.json


@pytest.mark.parametrize("change,message", [
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    (dict(num_attention_heads=-4), "num_attention_heads must be a positive integer"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    (dict(num_key_value_heads=3), "num_key_value_heads must be a divisor of num_attention_heads=4"),
    (dict(hidden_size=36), "hidden_size must be divisible by num_attention_heads=4 into an even head_dim"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer"),
    (dict(vocab_size=320.0), "vocab_size must be a positive integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
    (dict(rope_theta=0), "rope_theta must be a positive finite number"),
    (dict(rope_theta=float("nan")), "rope_theta must be a positive finite number"),
    (dict(rope_theta="1e4"), "rope_theta must be a positive finite number"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive finite number"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a positive finite number"),
    (dict(bos_token_id=-1), "bos_token_id must be a token id in [0, vocab_size=320)"),
    (dict(eos_token_id=320), "eos_token_id must be a token id in [0, vocab_size=320)"),
    (dict(pad_token_id="0"), "pad_token_id must be null or an integer"),
    (dict(mem_dtype="int8"), "mem_dtype must be one of bfloat16, float16, float32, float64"),
    (dict(mem_dtype="bool"), "mem_dtype must be one of"),
    (dict(mem_layers="1"), "mem_layers must be a list of distinct layer indices in [0, num_hidden_layers=2)"),
    (dict(mem_layers=[True]), "mem_layers must be a list"),
    (dict(mem_layers=[0.5]), "mem_layers must be a list"),
    (dict(mem_layers=[1, 1]), "mem_layers must be a list of distinct"),
    (dict(mem_layers=[2]), "mem_layers must be a list"),
    (dict(mem_layers=None), "mem_layers must be a list"),
    (dict(mem_attention_grouping="23"), "mem_attention_grouping must be null or two positive integers"),
    (dict(mem_attention_grouping=[2.5, 3]), "mem_attention_grouping must be null or two"),
    (dict(mem_attention_grouping=[True, 2]), "mem_attention_grouping must be null or two"),
    (dict(mem_attention_grouping=[4]), "mem_attention_grouping must be null or two"),
    (dict(mem_positionals="no"), "mem_positionals must be true or false"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings must be true or false"),
    (dict(last_context_length=-1), "last_context_length must be null or an integer in [0, max_position_embeddings=32]"),
    (dict(vocab_size=10**13, hidden_size=10**6), "more than any machine can address"),
    (dict(mem_topk=10**30), "mem_topk must be null or a positive integer below 2**63"),  # OverflowError in torch
    (dict(mem_topk=4, mem_block_size=2**63), "mem_block_size must be a positive integer below 2**63"),
])
def test_a_bad_config_value_is_refused_naming_its_key(change, message):
    with pytest.raises(ValueError) as error:
        longllama.LongLlamaConfig.from_dict({**TINY, **change})
    assert str(error.value).startswith("config: ") and message in str(error.value)


def test_sound_values_are_kept_and_put_in_canonical_form():
    config = longllama.LongLlamaConfig.from_dict({**TINY, "mem_layers": (1, 0), "mem_attention_grouping": [2, 8],
                                                  "mem_dtype": "float64", "rope_theta": 10000})
    assert config.mem_layers == [0, 1] and config.mem_attention_grouping == (2, 8)


@pytest.mark.parametrize("tied,kv_heads", [(False, 4), (True, 2)])
def test_the_parameter_count_memory_checks_use_is_the_models(tied, kv_heads):
    config = longllama.LongLlamaConfig(**{**TINY, "tie_word_embeddings": tied, "num_key_value_heads": kv_heads})
    assert config.num_parameters == sum(p.numel() for p in longllama.LongLlama(config).parameters())


def bad_checkpoint(assets, tmp_path, **config_changes):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(assets["init"], ckpt)
    rewrite(ckpt / "config.json", changed(**config_changes))
    return ckpt


@pytest.mark.parametrize("overrides,message", [
    (dict(mem_layers="1"), "mem_layers must be a list"),
    (dict(mem_dtype="int8"), "mem_dtype must be one of"),
    (dict(mem_attention_grouping=[0, 4]), "mem_attention_grouping must be null or two positive integers"),
    (dict(frobnicate=3), "unknown overrides ['frobnicate']"),
])
def test_load_overrides_are_checked_like_config_json(assets, overrides, message):
    with pytest.raises(ValueError) as error:
        longllama.load(assets["init"], **overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("change", [dict(max_position_embeddings=10**12), dict(num_hidden_layers=10**6),
                                    dict(hidden_size=2**20, intermediate_size=2**20)])
def test_load_refuses_a_model_bigger_than_free_memory_before_allocating_it(assets, tmp_path, change, monkeypatch):
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device: 2**34)  # 16 GiB free, whatever this machine has
    with pytest.raises(ValueError, match=r"the model needs [\d.]+ GiB in float32, 16.0 GiB are free on cpu"):
        longllama.load(bad_checkpoint(assets, tmp_path, **change))


def test_load_compares_the_layers_before_building_a_model_of_them(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device: 2**50)  # not refused for memory first
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"missing tensors \['layers.10.\*', 'layers.100.\*'"):
        longllama.load(bad_checkpoint(assets, tmp_path, num_hidden_layers=200_000))  # minutes to build
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("content,message", [
    (b"{not json", "cannot read config"), (b"\xff\xfe", "cannot read config"), (DEEP_JSON, "cannot read config"),
    (b"[1, 2]", "config must be a JSON object"),
])
def test_load_refuses_a_config_json_that_is_no_config(assets, tmp_path, content, message):
    ckpt = bad_checkpoint(assets, tmp_path)
    rewrite(ckpt / "config.json", content)
    with pytest.raises(ValueError, match=message):
        longllama.load(ckpt)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_load_refuses_weights_that_are_not_floating_point(assets, tmp_path, dtype):
    ckpt = bad_checkpoint(assets, tmp_path)
    state = load_file(ckpt / "model.safetensors")
    state["norm.weight"] = state["norm.weight"].to(dtype)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=f"norm.weight holds {dtype}, not floating-point weights"):
        longllama.load(ckpt)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        longllama.load(assets["init"], dtype=dtype)


NOT_HERE = ["tpu9", "meta", "cuda:x", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("name", NOT_HERE)
def test_a_device_that_is_not_here_is_refused(name):
    with pytest.raises(ValueError, match=f"device '{name}': "):
        checkpoint.resolve_device(name)


@pytest.mark.parametrize("command", ["generate.py", "train.py", "convert_weights.py"])
def test_a_bad_config_json_is_one_error_line_from_every_command(assets, tmp_path, command):
    ckpt = bad_checkpoint(assets, tmp_path, num_attention_heads=0)
    args = {"generate.py": ["--ckpt", str(ckpt), "--prompt", "x", "--device", "cpu"],
            "train.py": ["--init", str(ckpt), "--data", assets["corpus"], "--out", "out"],
            "convert_weights.py": [str(ckpt), "out", "--to", "hf"]}[command]
    result = run_command(command, *args, cwd=tmp_path)
    assert result.returncode == 1
    line = one_error_line(result.stderr.decode())
    assert line.endswith("config: num_attention_heads must be a positive integer, got 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ------------------------------------------------------------------------------------------------------ generate.py


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    (["--seed", "-1"], "--seed must be in [0, 2**64)"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--last-context-length", "33"], "last_context_length must be null or an integer in [0, max_position_embed"),
    (["--mem-attention-grouping", "1,2,3"], "mem_attention_grouping must be null or two positive integers"),
    (["--device", "tpu9"], "device 'tpu9': expected cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "device 'cuda:99': "),
])
def test_generate_refuses_a_bad_flag(assets, capsys, flags, message):
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", assets["init"], "--prompt", "def f", *flags])
    assert message in line


def test_generate_compile_without_a_cxx_compiler_is_one_error_line(assets, capsys, monkeypatch):
    from torch._inductor import config, cpp_builder
    monkeypatch.setenv("CXX", "no-such-compiler")
    with config.patch({"cpp.cxx": (None, "no-such-compiler")}):  # what inductor read $CXX into when imported
        cpp_builder.cpp_compiler_search.cache_clear()  # inductor remembers the compiler it found
        line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", assets["init"], "--prompt", "def f",
                                                                 "--device", "cpu", "--compile"])
    cpp_builder.cpp_compiler_search.cache_clear()
    assert line == ("error: compiling on CPU needs a C++ compiler: no-such-compiler does not run (install g++ or "
                    "set CXX)")


@pytest.mark.parametrize("data,message", [
    (b"def f():\x00\x01\x02", "not UTF-8 text: binary data (a NUL byte) at byte 8"),
    (b"caf\xe9 au lait", "not UTF-8 text: invalid continuation byte at byte 3"),
])
@pytest.mark.parametrize("source", ["file", "stdin", "argv"])
def test_generate_refuses_a_prompt_that_is_not_utf8_text(assets, tmp_path, capsys, monkeypatch, source, data, message):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(data)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    flags = {"file": ["--prompt-file", str(prompt_file)], "stdin": ["--prompt-file", "-"],
             "argv": ["--prompt", data.decode("utf-8", "surrogateescape")]}[source]  # how Python hands argv over
    named = {"file": f"prompt file {prompt_file}", "stdin": "stdin", "argv": "--prompt"}[source]
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", assets["init"], *flags])
    assert line == f"error: cannot read {named}: {message}"


def test_generate_refuses_binary_stdin_in_one_line(assets, tmp_path):
    result = run_command("generate.py", "--ckpt", assets["init"], "--prompt-file", "-", "--device", "cpu",
                         stdin=bytes(range(256)), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == b""
    line = one_error_line(result.stderr.decode())
    assert line == "error: cannot read stdin: not UTF-8 text: binary data (a NUL byte) at byte 0"


def run_generate(capsys, assets, *flags):
    generate.main(["--ckpt", assets["init"], "--prompt", "def alpha_1(x):", "--temperature", "0", "--device", "cpu",
                   *flags])
    return capsys.readouterr()


def test_zero_new_tokens_print_no_continuation_and_no_decode_rate(assets, capsys):
    printed = run_generate(capsys, assets, "--max-new-tokens", "0")
    assert printed.out == ""
    assert printed.err.splitlines()[-1].startswith("answer 0 tokens | first token - | - tok/s |")


def test_an_interrupted_generation_exits_130_quietly(assets, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "answer", interrupt)
    with pytest.raises(SystemExit) as exit_:
        run_generate(capsys, assets)
    err = capsys.readouterr().err  # the document's stats line, and nothing about the interrupt
    assert exit_.value.code == 130 and "error" not in err and "Traceback" not in err


def test_echo_prints_the_prompt_then_the_continuation(assets, capsys):
    tokenizer = Tokenizer(assets["tokenizer"])
    prompt = tokenizer.encode("def alpha_1(x):")
    model = longllama.load(assets["init"])
    new = generate.answer(model, tokenizer, generate.read(model, tokenizer, "def alpha_1(x):"), None,
                          generate.Sampling(5, temperature=0)).tokens[0]
    assert run_generate(capsys, assets, "--max-new-tokens", "5", "--echo").out == tokenizer.decode(prompt + new) + "\n"
    assert run_generate(capsys, assets, "--max-new-tokens", "0", "--echo").out == tokenizer.decode(prompt) + "\n"


# ------------------------------------------------------------------------------------------------------ train.py


def train_fails(capsys, argv) -> str:
    """train.py's command in-process: status 1 and one error line."""
    assert train.cli(argv) == 1
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags,message", [
    (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--min-lr", "inf"], "--min-lr must be a finite number >= 0, got inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--beta2", "1"], "--beta2 must be a number in [0, 1)"),
    (["--holdout", "150"], "--holdout must be a percentage in [0, 100], got 150.0"),
    (["--holdout", "-5"], "--holdout must be a percentage in [0, 100], got -5.0"),
    (["--eval-spans", "0"], "--eval-spans must be an integer in [1, 2**63)"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be an integer in [1, 2**63)"),
    (["--save-every", "0"], "--save-every must be an integer in [1, 2**63)"),
    (["--log-every", "0"], "--log-every must be an integer in [1, 2**63)"),
    (["--grad-accum", str(2**70)], "--grad-accum must be an integer in [1, 2**63)"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer in [0, 2**63)"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**64)"),
    (["--vocab-size", "10"], "--vocab-size must be an integer in [259, 2**31)"),
    (["--mem-layers", "1,1"], "mem_layers must be a list of distinct layer indices"),
    (["--device", "tpu9"], "device 'tpu9': expected cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "device 'cuda:99': "),
    (["--batch-size", str(10**9), "--packing", "1"], "this run needs at least"),
    (["--cross-batch-range", str(10**9)], "this run needs at least"),
    (["--eval-memory", "1,x"], "--eval-memory: expected comma-separated integers"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--preset", "small"], "--preset small and --init "),  # two shapes asked for: the preset's would be dropped
    (["--trainable", "mlp"], "--trainable must be one of all, upper, memory-layers, memory-attention, got 'mlp'"),
    (["--passkey-docs", "2", "--passkey-layout", "far,chat"], "--passkey-layout chat: "),  # no chat template
])
def test_train_refuses_a_bad_flag_before_writing_anything(assets, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert message in train_fails(capsys, small_run(assets, out, *flags))
    assert not out.exists()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_train_refuses_an_out_that_cannot_be_a_directory_before_training_a_tokenizer(assets, tmp_path, capsys, out):
    (tmp_path / "file").write_text("precious")
    line = train_fails(capsys, ["--preset", "tiny", "--data", assets["corpus"], "--out", str(tmp_path / out)])
    assert line == f"error: --out {tmp_path / out}: {tmp_path / 'file'} is not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "precious"


def damaged_run(trained_run, tmp_path, name, change):
    """A copy of the finished run, its file `name` rewritten."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    rewrite(out / name, change)
    return out


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


def with_setting(**settings):
    return lambda state: {**state, "settings": {**state["settings"], **settings}}


@pytest.mark.parametrize("change,message", [
    (b"{not json", "holds no run to continue"),
    (DEEP_JSON, "holds no run to continue"),
    (lambda state: {}, "is damaged: it must be an object with the keys step, tokens, world_size, settings, pipeline"),
    (lambda state: [state], "is damaged: it must be an object with the keys"),
    (lambda state: without(state, "step"), "is damaged: it must be an object with the keys"),
    (changed(step="2"), "is damaged: step must be an integer >= 0, got '2'"),
    (changed(tokens=-1), "is damaged: tokens must be an integer >= 0, got -1"),
    (changed(pipeline={}), "is damaged: pipeline must be a list"),
    (changed(world_size=2), "is damaged: it has 1 pipeline states for 2 processes"),
    (lambda state: {**state, "pipeline": [{**state["pipeline"][0], "slots": [{"documents": [0], "offset": 1.5}]}]},
     "is damaged: pipeline[0].slots[0].offset must be an integer >= 0, got 1.5"),
    (lambda state: {**state, "pipeline": [{**state["pipeline"][0], "slots": [{"documents": [999], "offset": 0}] * 2}]},
     "pipeline state names documents this run does not have"),
    (with_setting(frobnicate=1), "is damaged: unknown settings ['frobnicate']"),
    (lambda state: {**state, "settings": without(state["settings"], "lr")}, "is damaged: missing settings ['lr']"),
    (with_setting(batch_size="4"), "is damaged: settings.batch_size must be an integer in [1, "),
    (with_setting(lr=float("nan")), "is damaged: settings.lr must be a finite number >= 0"),
    (with_setting(data="corpus"), "is damaged: settings.data must be a list of paths"),
    (with_setting(preset="huge"), "is damaged: settings.preset must be one of tiny, tiny6, small"),
])
def test_resume_refuses_a_damaged_train_state(trained_run, tmp_path, capsys, change, message):
    out = damaged_run(trained_run, tmp_path, "train_state.json", change)
    before = snapshot(out)
    assert message in train_fails(capsys, ["--resume", "--out", str(out)])
    assert snapshot(out) == before


@pytest.mark.parametrize("content,message", [
    (b"garbage", "is not a file of plain tensors"),
    (b"", "does not hold this run's optimizer state"),
    (saved({}), "does not hold this run's optimizer state"),
])
def test_resume_refuses_a_damaged_optimizer_state(trained_run, tmp_path, capsys, content, message):
    out = damaged_run(trained_run, tmp_path, "optimizer.pt", content)
    before = snapshot(out)
    assert message in train_fails(capsys, ["--resume", "--out", str(out)])
    assert snapshot(out) == before


def test_resume_drops_a_log_line_cut_short_by_a_kill(trained_run, tmp_path):
    out = damaged_run(trained_run, tmp_path, "log.jsonl", (trained_run / "log.jsonl").read_bytes() + b'{"step": 3, "lo')
    train.main(["--resume", "--out", str(out), "--max-steps", "3"])
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_jsonl_record_nested_thousands_deep_is_malformed(tmp_path):
    (tmp_path / "deep.jsonl").write_bytes(b'{"text": "fine"}\n' + DEEP_JSON + b"\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: malformed JSON"):
        documents.scan_paths([tmp_path / "deep.jsonl"])


def test_a_corpus_too_small_for_the_vocabulary_size_gives_a_warning_naming_both_sizes(assets, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--preset", "tiny", "--data", assets["corpus"], "--out", str(out), "--vocab-size", "4096",
                "--batch-size", "2", "--seq-len", "16", "--packing", "2", "--max-steps", "0", "--eval-every", "0"])
    pieces = Tokenizer(out / "tokenizer.model").vocab_size
    assert pieces < 4096
    warning = f"warning: the tokenizer has {pieces} pieces, not the 4096 of --vocab-size: the corpus is too small"
    assert warning in capsys.readouterr().err


def test_every_setting_has_a_rule():
    ruled = [key for keys, _, _ in train.SETTING_RULES for key in keys]
    assert sorted(ruled) == sorted(f.name for f in fields(train.Settings))


def test_an_interrupted_run_exits_130_without_a_traceback_and_its_checkpoint_loads(assets, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"),
               *small_run(assets, out, "--max-steps", "100000", "--save-every", "1")]
    # Ctrl-C as a terminal sends it: a suite started in the background without job control (`cmd &` in a script)
    # runs with SIGINT ignored, which the child would inherit and keep
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):  # the first step is logged
            assert process.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert "Traceback" not in stderr and stderr.rstrip().endswith("interrupted")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    if (out / "train_state.json").exists():  # the last complete checkpoint loads, and the run goes on from it
        step = json.loads((out / "train_state.json").read_text())["step"]
        longllama.load(out)
        train.main(["--resume", "--out", str(out), "--max-steps", str(step + 1)])
        assert json.loads((out / "train_state.json").read_text())["step"] == step + 1


# ------------------------------------------------------------------------------------------------ convert_weights.py


@pytest.fixture(scope="module")
def hf_source(assets, tmp_path_factory):
    """The tiny checkpoint in the Hugging Face layout, as convert_weights.py reads it."""
    hf = tmp_path_factory.mktemp("hf") / "tiny"
    convert_weights.export_hf(assets["init"], hf)
    return hf


CONVERT_CASES = {  # arguments after SRC, a rewrite of SRC/config.json (or None), the message
    "dtype int8": (["out", "--dtype", "int8"], changed(), "argument --dtype: invalid choice: 'int8'"),
    "mem-layers garbage": (["out", "--mem-layers", "a,b"], changed(),
                           "argument --mem-layers: expected comma-separated layer indices, got 'a,b'"),
    "mem-layers twice": (["out", "--mem-layers", "1,1"], changed(), "mem_layers must be a list of distinct layer"),
    "last-context-length negative": (["out", "--last-context-length", "-5"], changed(),
                                     "last_context_length must be null or an integer"),
    "out is a file": (["file"], changed(), "file: exists and is not a directory"),
    "out is under a file": (["file/ckpt"], changed(), "file/ckpt: file exists and is not a directory"),
    "no out": ([], changed(), "the following arguments are required: OUT"),
    "no config.json": (["out"], None, "src: no config.json"),
    "config nested thousands deep": (["out"], DEEP_JSON, "src/config.json: not valid JSON"),
    "config with zero heads": (["out"], changed(num_attention_heads=0),
                               "config: num_attention_heads must be a positive integer, got 0"),
    "config with int8 memory": (["out"], changed(mem_dtype="int8"), "config: mem_dtype must be one of"),
    "config too big for memory": (["out"], changed(num_hidden_layers=10**6), "the converted model needs at least"),
    "tokenizer that is no model": (["out", "--tokenizer", "file"], changed(), "tokenizer file: not a SentencePiece"),
}


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_refuses_bad_input_in_one_line(hf_source, tmp_path, capsys, monkeypatch, case):
    args, config_change, message = CONVERT_CASES[case]
    shutil.copytree(hf_source, tmp_path / "src")
    rewrite(tmp_path / "src" / "config.json", config_change)
    (tmp_path / "file").write_text("precious")
    monkeypatch.setattr(convert_weights, "available_bytes", lambda device: 2**34)  # 16 GiB free
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert message in exits_with_one_error_line(capsys, convert_weights.main, ["src", *args])
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------- outputs that are inputs


@pytest.mark.parametrize("target", ["prompt.txt", "ckpt/model.safetensors", "ckpt/config.json", "ckpt/tokenizer.model",
                                    "ckpt/../ckpt/tokenizer.model"])
def test_generate_refuses_to_save_memory_over_an_input(assets, tmp_path, capsys, monkeypatch, target):
    shutil.copytree(assets["init"], tmp_path / "ckpt")
    (tmp_path / "prompt.txt").write_text("def alpha_1(x):")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", "ckpt", "--prompt-file", "prompt.txt",
                                                            "--save-memory", target, "--device", "cpu"])
    what = "a prompt file" if target == "prompt.txt" else "a file of the checkpoint ckpt"
    assert line == f"error: --save-memory {target} is {what}: writing it would destroy an input (choose another path)"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out,inputs,message", [
    ("ckpt", ["--init", "ckpt"], "--out ckpt is the --init path ckpt"),
    ("corpus", ["--init", "ckpt"], "--out corpus is the --data path corpus"),
    ("corpus/run", ["--init", "ckpt"], "--out corpus/run is inside the --data path corpus"),
    ("held", ["--init", "ckpt", "--eval-data", "held"], "--out held is the --eval-data path held"),
])
def test_train_refuses_an_out_that_is_one_of_its_inputs(assets, tmp_path, capsys, monkeypatch, out, inputs, message):
    shutil.copytree(assets["init"], tmp_path / "ckpt")
    shutil.copytree(assets["corpus"], tmp_path / "corpus")
    shutil.copytree(assets["corpus"], tmp_path / "held")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args = ["--data", "corpus", *inputs, "--out", out, "--batch-size", "4", "--seq-len", "16", "--packing", "2",
            "--max-steps", "1", "--eval-every", "0"]
    line = train_fails(capsys, args)
    assert line.startswith(f"error: {message}: the run would write over what it reads")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags,message", [
    (["--haystack", "hay.txt", "--out", "hay.txt"], "--out hay.txt is the --haystack: writing it would destroy"),
    (["--plot", "ckpt/config.json"], "--plot ckpt/config.json is a file of the checkpoint ckpt: writing it would"),
    (["--out", "r.json", "--plot", "./r.json"], "--out and --plot are the same file r.json"),
    (["--out", "somewhere"], "--out " + "{tmp}/somewhere: is a directory"),
])
def test_passkey_refuses_an_output_that_is_an_input_or_the_other_output(assets, tmp_path, capsys, monkeypatch, flags,
                                                                        message):
    shutil.copytree(assets["init"], tmp_path / "ckpt")
    (tmp_path / "hay.txt").write_text("alpha = 1\nbeta = 2\n")
    (tmp_path / "somewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    line = exits_with_one_error_line(capsys, passkey.main, ["--ckpt", "ckpt", "--device", "cpu", "--lengths", "300",
                                                           "--trials", "1", *flags])
    assert message.format(tmp=tmp_path) in line
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------- integers far beyond range


HUGE = str(10**30)


@pytest.mark.parametrize("flags", [["--max-new-tokens", HUGE], ["--max-new-tokens", "-" + HUGE], ["--top-k", HUGE],
                                   ["--last-context-length", HUGE], ["--mem-topk", HUGE],
                                   ["--mem-topk", "4", "--mem-block-size", HUGE]])
def test_generate_refuses_an_integer_beyond_int64(assets, capsys, flags):
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", assets["init"], "--prompt", "def f",
                                                            "--device", "cpu", *flags])
    assert line.startswith(f"error: argument {flags[-2]}: must be an integer in [-2**63, 2**63), got ")


@pytest.mark.parametrize("flags,message", [
    (["--trials", HUGE], "argument --trials: must be an integer in [-2**63, 2**63)"),
    (["--lengths", HUGE], f"a length in tokens must be below 2**63, got '{HUGE}'"),
    (["--lengths", HUGE + "k"], "a length in tokens must be below 2**63"),
    (["--task", "decoys", "--lengths", "0," + HUGE], "a length in tokens must be below 2**63"),
    (["--mem-topk", "4", "--mem-block-size", HUGE], "argument --mem-block-size: must be an integer in [-2**63, 2**63)"),
])
def test_passkey_refuses_an_integer_beyond_int64(assets, capsys, flags, message):
    line = exits_with_one_error_line(capsys, passkey.main, ["--ckpt", assets["init"], "--device", "cpu", "--lengths",
                                                           "300", *flags])
    assert message in line


@pytest.mark.parametrize("flags,message", [
    (["--repeats", HUGE], "argument --repeats: must be an integer in [-2**63, 2**63)"),
    (["--layers", HUGE], "argument --layers: must be an integer in [-2**63, 2**63)"),
    (["--prefill", HUGE], "--prefill must be positive token counts (below 2**63)"),
    (["--decode-memory", HUGE], "--decode-memory must be token counts >= 0 (below 2**63)"),
    (["--mem-topk", "4", "--mem-block-size", HUGE], "argument --mem-block-size: must be an integer in [-2**63, 2**63)"),
    (["--prefill", str(10**12)], "a prompt of 1000000000000 tokens needs about"),  # in range, not in memory
    (["--decode-memory", str(10**12)], "a prompt of 1000000000128 tokens needs about"),
])
def test_bench_refuses_an_integer_beyond_int64_or_memory(capsys, flags, message):
    argv = ["--preset", "tiny", "--device", "cpu", "--prefill", "64", "--decode-memory", "64", "--repeats", "1", *flags]
    assert message in exits_with_one_error_line(capsys, bench.main, argv)


@pytest.mark.parametrize("flag", ["--batch-size", "--seq-len", "--cross-batch-range", "--packing", "--max-steps",
                                  "--grad-accum", "--warmup-steps", "--lr-decay-steps", "--save-every", "--log-every",
                                  "--eval-every", "--eval-spans", "--eval-batch-size", "--passkey-docs", "--seed",
                                  "--vocab-size"])
@pytest.mark.parametrize("value", [HUGE, "99999999999999999999", "-" + HUGE])
def test_train_refuses_an_integer_beyond_int64(assets, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    line = train_fails(capsys, small_run(assets, out, flag, value))
    assert line.startswith(f"error: {flag} must be an integer in [") and line.endswith(f"got {value}")
    assert not out.exists()


def test_convert_refuses_an_integer_beyond_int64(hf_source, tmp_path, capsys):
    line = exits_with_one_error_line(capsys, convert_weights.main, [str(hf_source), str(tmp_path / "out"),
                                                                   "--last-context-length", HUGE])
    assert "last_context_length must be null or an integer in [0, max_position_embeddings=32]" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- passkey prompts as asked for


def run_passkey(capsys, ckpt, *flags):
    """passkey.py's table rows: trials on the tiny checkpoint at 300 tokens unless flags say otherwise."""
    passkey.main(["--ckpt", str(ckpt), "--device", "cpu", "--trials", "1", *flags])
    return capsys.readouterr()


@pytest.mark.parametrize("content", [b"\xef\xbb\xbf", b"\xef\xbb\xbf\n\n   \n\t\n", b"\n\n"])
@pytest.mark.parametrize("task", ["passkey", "documents"])
def test_passkey_refuses_a_haystack_of_only_a_byte_order_mark_and_blank_lines(assets, tmp_path, capsys, content, task):
    (tmp_path / "hay.txt").write_bytes(content)
    line = exits_with_one_error_line(capsys, passkey.main, ["--ckpt", assets["init"], "--device", "cpu", "--task",
                                                           task, "--haystack", str(tmp_path / "hay.txt"),
                                                           "--lengths", "300"])
    assert line == f"error: --haystack {tmp_path / 'hay.txt'}: the file has no text (only blank lines)"


def test_passkey_refuses_a_haystack_line_longer_than_the_prompt_has_room_for(assets, tmp_path, capsys):
    hay = tmp_path / "hay.txt"
    hay.write_text("\ufeffalpha = 1\n\nbeta = " + "7" * 2000 + "\ngamma = 3\n")  # line 3: thousands of tokens
    builder = passkey.PromptBuilder(Tokenizer(assets["tokenizer"]),
                                    passkey.Haystack.from_text(Tokenizer(assets["tokenizer"]),
                                                               hay.read_text().removeprefix("\ufeff"), "hay"))
    shortest, unit = builder.shortest_length()
    assert unit == 1 and shortest > 300
    line = exits_with_one_error_line(capsys, passkey.main, ["--ckpt", assets["init"], "--device", "cpu", "--haystack",
                                                           str(hay), "--lengths", f"{shortest},300"])
    assert line.startswith(f"error: --lengths 300: the shortest passkey prompt here is {shortest} tokens: its task, "
                           f"passkey and question lines take {builder.fixed_tokens}, and a prompt holds at least one "
                           f"line of --haystack {hay}, taken once half of it fits, and line 3 is ")
    # at the shortest length, every trial's prompt holds haystack, wherever it starts; a token less, not
    room = shortest - builder.fixed_tokens
    assert all(builder.haystack.take(room, start) for start in range(3)) and not builder.haystack.take(room - 1, 1)


def test_passkey_refuses_a_length_shorter_than_the_prompts_fixed_parts(assets, capsys):
    builder = passkey.PromptBuilder(Tokenizer(assets["tokenizer"]))
    shortest, _ = builder.shortest_length()
    line = exits_with_one_error_line(capsys, passkey.main, ["--ckpt", assets["init"], "--device", "cpu", "--lengths",
                                                           f"50,{shortest}"])
    assert line == (f"error: --lengths 50: the shortest passkey prompt here is {shortest} tokens: its task, passkey "
                    f"and question lines take {builder.fixed_tokens}, and a prompt holds at least one block of filler "
                    f"({builder.haystack.cost(0)} tokens, taken once half of it fits)")
    # the shortest length itself runs, and its prompt holds filler around the passkey; a token less, not
    assert documents.FILLER in builder.build(shortest, 0.5, 1234).text
    assert documents.FILLER not in builder.build(shortest - 1, 0.5, 1234).text
    assert f"| {shortest} |" in run_passkey(capsys, assets["init"], "--lengths", str(shortest)).out


# -------------------------------------------------------------------------- refusals leave no --out they made


def test_a_train_refusal_after_out_is_made_leaves_no_out(openllama_checkpoint, tmp_path, capsys):
    """Documents of spaces only, which the OpenLLaMA tokenizer reads as no token: refused at the first batch, after
    the run has started its log in OUT."""
    (tmp_path / "spaces").mkdir()
    for i in range(3):
        (tmp_path / "spaces" / f"s{i}.txt").write_text(" ")
    args = ["--init", str(openllama_checkpoint), "--data", str(tmp_path / "spaces"), "--batch-size", "4", "--seq-len",
            "16", "--packing", "2", "--max-steps", "1", "--eval-every", "0"]
    assert train.cli([*args, "--out", str(tmp_path / "runs" / "new")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: no document has any tokens"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spaces"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")  # an OUT that was there: only what the run added goes
    assert train.cli([*args, "--out", str(tmp_path / "mine")]) == 1
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_first_checkpoint_that_cannot_be_written_leaves_no_out(assets, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", disk_full)  # optimizer.pt of the first checkpoint
    out = tmp_path / "a" / "run"
    assert train.cli(small_run(assets, out, "--max-steps", "2")) == 1  # after its progress bar
    assert capsys.readouterr().err.splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_a_passkey_refusal_leaves_no_directory_for_its_outputs(assets, tmp_path, capsys):
    line = exits_with_one_error_line(capsys, passkey.main, [
        "--ckpt", assets["init"], "--device", "cpu", "--lengths", "50", "--out", str(tmp_path / "new" / "r.json"),
        "--plot", str(tmp_path / "plots" / "h.png")])
    assert line.startswith("error: --lengths 50: the shortest passkey prompt here is")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_experiment_leaves_no_out_it_made(tmp_path, capsys, monkeypatch):
    def failing(commands, side_by_side=1):
        raise ValueError("a step above failed: rerun the experiment to go on from the last finished step")

    monkeypatch.setattr(context_scaling, "run", failing)  # the first training run fails
    with pytest.raises(SystemExit):
        context_scaling.main(["--out", str(tmp_path / "scaling")])
    assert one_error_line(capsys.readouterr().err).startswith("error: a step above failed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "scaling" / "base").mkdir(parents=True)  # a step that is there stays for the rerun
    (tmp_path / "scaling" / "base" / "train_state.json").write_text("{}")
    with pytest.raises(SystemExit):
        context_scaling.main(["--out", str(tmp_path / "scaling")])
    assert (tmp_path / "scaling" / "base" / "train_state.json").exists()


# ----------------------------------------------------------------------------- flags ignored in combination


def test_bench_small_warns_in_one_line_which_flags_it_ignores(capsys):
    args = bench.parse_args(["--small", "--prefill", "512", "--kernel", "fused", "--device", "cpu", "--repeats", "2",
                             "--dtype", "bfloat16", "--layers", "4"])
    assert capsys.readouterr().err == ("warning: --small times its own work (--prefill 4096 --decode-memory 4096 "
                                       "--kernel fused,plain --device cpu, at least 5 repeats): ignoring --prefill "
                                       "512, --kernel fused, --repeats 2\n")
    assert (args.prefill, args.kernel, args.repeats, args.dtype, args.layers) == ([4096], ["fused", "plain"], 5,
                                                                                  "bfloat16", 4)
    bench.parse_args(["--small", "--device", "cpu", "--repeats", "9", "--compile"])  # nothing ignored: no warning
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", ["1", "-5"])
def test_generate_refuses_a_mem_logn_that_is_no_count_of_trained_keys(assets, capsys, value):
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", assets["init"], "--prompt", "def f",
                                                            "--device", "cpu", "--mem-logn", value])
    assert line == f"error: --mem-logn must be 0 (off) or an integer above 1, got {value}"
