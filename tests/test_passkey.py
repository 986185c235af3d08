"""passkey.py and context_scaling.py: prompts checked by re-tokenizing them, greedy answers against a full
recomputation, training documents that put the answer a window after the passkey, the CLI, and the plots."""

import json
import random
import subprocess
import sys

import pytest

import context_scaling
import longllama
import passkey
import train
from conftest import ROOT, shared_tokenizer
from test_generate import checkpoint  # noqa: F401 (a tiny random checkpoint, window 32)
from test_train import assets, small_run  # noqa: F401 (assets: test_train's tiny corpus and checkpoint)
from tokenizer import Tokenizer, checkpoint_tokenizer


@pytest.fixture(scope="module", params=["open_llama_v1.model", "open_llama_v2.model"])
def tokenizer(request):
    return Tokenizer(shared_tokenizer(request.param))


@pytest.mark.parametrize("length", [200, 1000, 5000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_prompt_has_the_requested_length_and_the_passkey_at_its_depth(tokenizer, length, depth):
    builder = passkey.PromptBuilder(tokenizer)
    prompt, answer = builder.build(length, depth, 31415)[1:]
    assert abs(len(prompt) - length) <= builder.filler_tokens
    text = tokenizer.decode(prompt)
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    assert tokenizer.decode(answer).strip() == "31415"
    before, after = text.split(passkey.passkey_line(31415))
    fillers = before.count(passkey.FILLER) + after.count(passkey.FILLER)
    assert before.count(passkey.FILLER) == round(depth * fillers)


def test_the_prompt_and_its_answer_decode_to_the_question_followed_by_the_passkey(tokenizer):
    text, prompt, answer = passkey.PromptBuilder(tokenizer).build(300, 0.3, 7)
    assert tokenizer.encode(text) == prompt
    assert tokenizer.decode(prompt + answer).endswith(f"\n{passkey.QUESTION} 7")
    assert tokenizer.decode(prompt).endswith(passkey.QUESTION)


def test_a_byte_level_bpe_tokenizer_gets_the_passkey_as_its_answer(tmp_path):
    from test_formats import train_bpe  # a small Llama-3-like tokenizer.json
    train_bpe(tmp_path / "bpe")
    tok = checkpoint_tokenizer(tmp_path / "bpe")
    text, prompt, answer = passkey.PromptBuilder(tok).build(400, 0.5, 40321)
    assert tok.encode(text) == prompt and tok.decode(answer).strip() == "40321"
    assert tok.decode(prompt + answer).endswith(f"{passkey.QUESTION} 40321")


@pytest.mark.parametrize("window", [64, 128, 512])
def test_training_gaps_span_up_to_three_windows_and_the_last_at_least_one(tokenizer, window):
    """Tokens between consecutive mentions of the passkey, counted by the tokenizer itself."""
    filler_tokens = passkey.PromptBuilder(tokenizer).filler_tokens
    question = len(tokenizer.encode(f"\n{passkey.QUESTION}", bos=False))
    rng = random.Random(window)
    for _ in range(20):
        text = passkey.training_document(rng, window, filler_tokens)
        key = int(text.split("The pass key is ")[1].split(".")[0])
        said = [i for i in range(len(text)) if text.startswith(f" {key}", i)]
        assert len(said) == 2 + passkey.TRAINING_QUESTIONS  # the passkey line says it twice, then the answers
        gaps = [len(tokenizer.encode(text[a:b], bos=False)) for a, b in zip(said[1:], said[2:])]
        assert gaps[-1] >= window
        # a gap's tokens besides filler: the question, the number and the end of the line said before it
        assert all(gap <= passkey.TRAINING_GAP_WINDOWS * window + question + 16 for gap in gaps)


def test_lengths_parse_with_k_and_m_suffixes():
    assert [passkey.parse_length(t) for t in ["100", "4k", "1M"]] == [100, 4096, 2**20]
    for bad in ["x", "0", "-4k", "4kk"]:
        with pytest.raises(ValueError):
            passkey.parse_length(bad)


def test_the_command_writes_a_table_a_json_file_and_a_heatmap(checkpoint, tmp_path):
    out, plot = tmp_path / "r.json", tmp_path / "h.png"
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), "--lengths", "100,300",
                             "--depths", "0,1", "--trials", "2", "--out", str(out), "--plot", str(plot)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert len(report["results"]) == 2 * 2 * 2
    for length in [100, 300]:  # the summary counts the trials
        hits = [r["correct"] for r in report["results"] if r["length"] == length]
        assert report["accuracy"][str(length)] == sum(hits) / len(hits)
    assert "| 300 |" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_depths_are_reported_by_quarter_and_a_quarter_without_trials_is_empty_not_zero(checkpoint):
    model = longllama.load(checkpoint)
    builder = passkey.PromptBuilder(Tokenizer(checkpoint / "tokenizer.model"))
    results = passkey.run_trials(model, builder, [120, 200], None, 2, seed=1, log=lambda _: None)
    assert {r["column"] for r in results} <= {"0-25%", "25-50%", "50-75%", "75-100%"}
    assert all(r["column"] == passkey.depth_column(r["depth"], None) for r in results)
    summary = passkey.summarize(results)
    for length in ["120", "200"]:
        for column, value in summary["by_depth"][length].items():
            trials = [r for r in results if r["length"] == int(length) and r["column"] == column]
            assert value == (sum(r["correct"] for r in trials) / len(trials) if trials else None)
    if None in summary["by_depth"]["120"].values():  # 2 trials cannot fill the 3 or 4 quarters 4 trials hit
        assert "| -" in passkey.table(summary) or " - |" in passkey.table(summary)


@pytest.mark.parametrize("flags", [["--lengths", "4q"], ["--depths", "2"], ["--depths", "a"], ["--trials", "0"],
                                   ["--lengths", "4000m"]])  # the last: more memory than the machine has
def test_bad_input_is_one_error_line(checkpoint, flags):
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_passkey_documents_are_the_same_text_on_every_read_and_differ_from_each_other(tokenizer):
    docs = train.passkey_documents(3, seed=5, window=64, tokenizer=tokenizer)
    again = train.passkey_documents(3, seed=5, window=64, tokenizer=tokenizer)
    assert train.read_document(docs[1]) == train.read_document(again[1])
    assert len({train.read_document(doc)[1] for doc in docs}) == 3


def test_a_training_run_reads_passkey_documents_beside_the_corpus(assets, tmp_path):
    tok = Tokenizer(assets["tokenizer"])
    docs = train.scan_paths([assets["corpus"]]) + train.passkey_documents(6, seed=0, window=16, tokenizer=tok)
    batches = train.Batches(docs, tok, batch_size=4, seq_len=16, packing=2, seed=0)
    text = "".join(tok.decode(batches.next()[0].flatten().tolist()) for _ in range(40))
    assert "important info" in text and "def " in text  # the task line of a passkey document, and code
    train.main(small_run(assets, tmp_path / "run", "--max-steps", "2", "--passkey-docs", "6"))
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_experiment_plots_draw_from_a_small_results_file(tmp_path):
    summary = dict(accuracy={"1024": 1.0, "4096": 0.5}, by_depth={"1024": {"0.5": 1.0}, "4096": {"0.5": 0.5}})
    results = dict(size="cpu", window=256, train_tokens=128, setups={
        name: dict(cross_batch_range=d, passkey=summary, perplexity={"0": 30.0, "4": 29.0 - d, "16": 28.0 - d})
        for name, d in context_scaling.SETUPS.items()})
    (tmp_path / "results.json").write_text(json.dumps(results))
    context_scaling.main(["--out", str(tmp_path), "--only-draw"])
    for name in ["passkey.png", "perplexity.png", "heatmap_fot.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_experiment_trains_in_stages_skipping_finished_ones(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(context_scaling, "run", commands.append)
    size = context_scaling.SIZES["cpu-long"]
    first = tmp_path / "fot_stage1"
    first.mkdir()
    (first / "tokenizer.model").write_bytes(b"")
    (first / "train_state.json").write_text(json.dumps({"step": 8000}))
    context_scaling.train(tmp_path, "fot", 3, size)
    (command,) = commands  # stage 1 is finished: only stage 2 runs, from stage 1's weights, into OUT/fot
    assert command[command.index("--init") + 1] == str(first) and command[command.index("--out") + 1] == str(
        tmp_path / "fot") and "--resume" not in command and command[command.index("--cross-batch-range") + 1] == "3"

    commands.clear()
    (tmp_path / "d0").mkdir()
    (tmp_path / "d0" / "train_state.json").write_text(json.dumps({"step": 100}))  # stopped part way
    context_scaling.train(tmp_path, "d0", 0, size)
    stage1, stage2 = commands  # the other setups read the first one's tokenizer; an unfinished stage resumes
    assert stage1[stage1.index("--tokenizer") + 1] == str(first / "tokenizer.model") and "--resume" not in stage1
    assert stage2[stage2.index("--init") + 1] == str(tmp_path / "d0_stage1") and "--resume" in stage2


@pytest.mark.parametrize("run", ["context_scaling_cpu", "context_scaling_cpu_long"])
def test_the_readme_states_each_cpu_run_as_its_results_file_holds_it(run):
    results = json.loads((ROOT / "docs" / run / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for name, setup in results["setups"].items():
        passkey_cells = " / ".join(f"{a:.0%}" for a in setup["passkey"]["accuracy"].values())
        perplexities = " / ".join(f"{p:.2f}" for p in setup["perplexity"].values())
        change = setup["perplexity"]["16"] / setup["perplexity"]["0"] - 1
        row = f"| {context_scaling.LABELS[name]} | {passkey_cells} | {perplexities} | {change:+.1%} |"
        assert row in readme, row


def test_the_readme_states_the_fot_models_depths_as_its_trials_file_holds_them():
    report = json.loads((ROOT / "docs" / "context_scaling_cpu_long" / "passkey_fot.json").read_text())
    assert passkey.table(report) in (ROOT / "README.md").read_text()
