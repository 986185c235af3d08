"""passkey.py and context_scaling.py: prompts checked by re-tokenizing them, greedy answers against a full
recomputation, training documents that put the answer a window after the passkey, the CLI, and the plots."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checks
import context_scaling
import documents
import longllama
import passkey
import train
from conftest import ROOT, openllama_tokenizer
from test_generate import checkpoint, greedy_by_hand  # noqa: F401 (checkpoint: tiny, random, window 32)
from test_train import assets, small_run  # noqa: F401 (assets: test_train's tiny corpus and checkpoint)
from tokenizer import Tokenizer, checkpoint_tokenizer


@pytest.fixture(scope="module", params=["open_llama_v1.model", "open_llama_v2.model"])
def tokenizer(request):
    return Tokenizer(openllama_tokenizer(request.param))


@pytest.mark.parametrize("length", [200, 1000, 5000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_prompt_has_the_requested_length_and_the_passkey_at_its_depth(tokenizer, length, depth):
    builder = passkey.PromptBuilder(tokenizer)
    prompt, answer = builder.build(length, depth, 31415)[1:]
    assert abs(len(prompt) - length) <= builder.haystack.cost(0)
    text = tokenizer.decode(prompt)
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    assert tokenizer.decode(answer).strip() == "31415"
    before, after = text.split(passkey.passkey_line(31415))
    fillers = before.count(documents.FILLER) + after.count(documents.FILLER)
    assert abs(before.count(documents.FILLER) - depth * fillers) <= 0.5


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_a_file_haystack_hides_the_passkey_between_its_lines_taken_in_turn(tokenizer, depth):
    lines = [f"line_{i} = compute({i} * 7)" for i in range(300)]
    builder = passkey.PromptBuilder(tokenizer, passkey.Haystack.from_text(tokenizer, "\n\n".join(lines), "f"))
    text, prompt, answer = builder.build(2000, depth, 4242, start=290)
    assert abs(len(prompt) - 2000) <= max(map(builder.haystack.cost, range(300)))
    assert tokenizer.encode(text) == prompt and tokenizer.decode(answer).strip() == "4242"
    body = [line for line in text.split("\n")[1:-1] if line]  # between the task line and the question
    key_line = body.index(passkey.passkey_line(4242))
    hay = body[:key_line] + body[key_line + 1:]
    assert hay == [lines[(290 + i) % 300] for i in range(len(hay))]  # from line 290 on, round again
    assert abs(key_line - depth * len(hay)) <= 1


def test_the_wilson_interval_is_the_published_one():
    """Values from Wilson (1927) / Newcombe (1998), table I: 95% intervals."""
    for (correct, trials), expected in [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)),
                                        ((0, 20), (0.0, 0.1611)), ((20, 20), (0.8389, 1.0))]:
        low, high = passkey.wilson_interval(correct, trials)
        assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


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


def said_at(text: str, key: int) -> list[int]:
    return [i for i in range(len(text)) if text.startswith(f" {key}", i)]


@pytest.mark.parametrize("window", [64, 128, 512])
def test_far_training_gaps_span_up_to_three_windows_and_the_last_at_least_one(tokenizer, window):
    """Tokens between consecutive mentions of the passkey, counted by the tokenizer itself."""
    haystacks = [passkey.Haystack.filler(tokenizer)]
    question = len(tokenizer.encode(f"\n{passkey.QUESTION}", bos=False))
    rng = random.Random(window)
    for _ in range(20):
        text = documents.training_document(rng, window, haystacks, "far")
        key = int(text.split("The pass key is ")[1].split(".")[0])
        said = said_at(text, key)
        assert len(said) == 2 + documents.TRAINING_QUESTIONS  # the passkey line says it twice, then the answers
        gaps = [len(tokenizer.encode(text[a:b], bos=False)) for a, b in zip(said[1:], said[2:])]
        assert gaps[-1] >= window - documents.FILLER.count(" ")
        # a gap's tokens besides filler: the question, the number and the end of the line said before it
        assert all(gap <= documents.TRAINING_GAP_WINDOWS * window + question + 16 for gap in gaps)


CHATML = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template":
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}


def test_a_chat_training_document_asks_in_the_template_and_is_answered_a_window_or_more_after_the_passkey(
        tokenizer, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(CHATML))
    chat = train.chat_frame(tmp_path, tokenizer)
    window = 64
    for doc in documents.passkey_documents(8, seed=3, window=window, tokenizer=tokenizer, layout="chat", chat=chat):
        text = documents.read_document(doc)[1]
        key = int(text.split("The pass key is ")[1].split(".")[0])
        assert text.startswith(f"<|im_start|>user\n{documents.TASK}\n")
        question = "\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n"
        assert text.endswith(f"{question}The pass key is {key}.<|im_end|>")
        gap = text[text.index(passkey.passkey_line(key)) + len(passkey.passkey_line(key)):text.index(question)]
        assert len(tokenizer.encode(gap, bos=False)) >= window - documents.FILLER.count(" ")
        ids, mask = documents.tokenize(doc, tokenizer)  # the template's special tokens as tokens, not as letters
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and sum(mask) == len(ids)
        assert ids.count(tokenizer.bos_id) == 2 and ids.count(tokenizer.eos_id) == 2  # the user's turn, the reply
        reply = ids[len(ids) - 1 - ids[::-1].index(tokenizer.bos_id) + 1:-1]
        assert tokenizer.decode(reply).split() == ["assistant", "The", "pass", "key", "is", f"{key}."]


def test_train_takes_chat_passkey_documents_from_the_checkpoints_chat_template(assets, tmp_path):
    init = tmp_path / "init"
    shutil.copytree(assets["init"], init)
    (init / "tokenizer_config.json").write_text(json.dumps(CHATML))
    train.main(small_run(assets, tmp_path / "run", "--init", str(init), "--max-steps", "1",
                         "--passkey-docs", "4", "--passkey-layout", "chat"))
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 1


@pytest.mark.parametrize("layout", ["near", "decoy"])
def test_every_training_question_is_answered_with_the_pass_key_said_before_it(tokenizer, layout):
    """Parsed back from the text: each answer is the last pass key said (near: within a window), never a decoy's."""
    haystacks = [passkey.Haystack.filler(tokenizer)]
    rng = random.Random(layout)
    for _ in range(10):
        text = documents.training_document(rng, 128, haystacks, layout)
        key, given_at, asked, decoys = None, None, 0, set()
        lines = text.split("\n")
        for number, line in enumerate(lines):
            if line.startswith("The pass key is "):
                key, given_at = int(line.split(" is ")[1].split(".")[0]), number
            elif any(line.startswith(f"The {decoy} is ") for decoy in documents.DECOYS):
                name = line.split(" is ")[0][len("The "):]
                decoys.add(name)
                number_said = int(line.split(" is ")[1].split(".")[0])
                assert line == passkey.passkey_line(number_said).replace("pass key", name)  # said as the pass key is
            elif line.startswith(passkey.QUESTION):
                assert line == f"{passkey.QUESTION} {key}."
                if layout == "near":  # at most two gaps of half a window, and the question between them
                    assert len(tokenizer.encode("\n".join(lines[given_at + 1:number]), bos=False)) <= 128 + 32
                asked += 1
        assert asked >= 1 and (len(decoys) >= 2) == (layout == "decoy")


def test_a_decoy_trial_reads_its_passkey_prompt_after_a_copy_of_the_decoys_cache(checkpoint):
    """answer_after() reads the document after a copy of the decoys' cache; reading the same tokens in one call and
    decoding greedily by hand must give the same answer."""
    model = longllama.load(checkpoint)
    rng = random.Random(0)
    distractors, document, question = ([rng.randrange(3, 32000) for _ in range(n)] for n in (100, 40, 7))
    _, cache = model(torch.tensor([distractors]), last_logits_only=True)
    got, share = passkey.answer_after(model, cache, document, question, 5)
    logits, fresh = model(torch.tensor([distractors + document + question]), use_cache=True,
                          last_context_length=len(question))
    expected = [int(logits[0, -1].argmax())]
    for _ in range(4):
        logits, fresh = model(torch.tensor([expected[-1:]]), cache=fresh, use_cache=True)
        expected.append(int(logits[0, -1].argmax()))
    assert got == expected and 0 < share < 1
    assert cache.memory_size == 100  # the decoys' cache itself is left as it was


def test_prompts_that_share_their_start_read_it_once_and_answer_as_each_read_alone(checkpoint):
    """A cell's prompts in the filler are the same text up to their passkey lines: the whole windows each shares
    with another are read once, in one reading that grows, and each prompt continues a copy. Every answer must be
    the one greedy decoding gives the prompt read alone."""
    model = longllama.load(checkpoint)
    builder = passkey.PromptBuilder(Tokenizer(checkpoint / "tokenizer.model"))
    window = model.config.max_position_embeddings
    prompts = [builder.build(400, depth, key) for depth, key in ((0.9, 7), (0.3, 31415), (0.6, 2718), (0.9, 99))]
    seen = []
    for i, start in passkey.shared_starts(model, [prompt.ids for prompt in prompts]):
        seen.append((i, start.tokens))
        assert start.tokens % window == 0 and start.cache.memory_size >= start.tokens
        got = passkey.answer(model, builder.tokenizer, prompts[i], 12, start)
        assert got == greedy_by_hand(model, prompts[i].ids, 12) == passkey.answer(model, builder.tokenizer,
                                                                                   prompts[i], 12)
        assert start.cache.memory_size == start.tokens  # the prompt continued a copy
    assert [i for i, _ in seen] == [1, 2, 0, 3] and [t for _, t in seen] == sorted(t for _, t in seen)
    assert seen[0][1] >= 0.3 * 400 - 2 * window and seen[-1][1] >= 300  # the deepest share nearly all


def test_only_prompts_that_share_whole_windows_share_a_reading(checkpoint):
    model = longllama.load(checkpoint)
    builder = passkey.PromptBuilder(Tokenizer(checkpoint / "tokenizer.model"))
    assert list(passkey.shared_starts(model, [builder.build(400, 0.9, 7).ids])) == [(0, (0, None))]  # no other
    code = passkey.PromptBuilder(builder.tokenizer, passkey.Haystack.from_text(
        builder.tokenizer, (ROOT / "passkey.py").read_text(), "code"))
    results = passkey.run_trials(model, code, [300], [0.9], 2, seed=0, log=lambda _: None)
    # each trial's haystack starts at its own line, so only the task line's window (31 tokens and a few more) is common
    assert [r["shared_tokens"] for r in results] == [model.config.max_position_embeddings] * 2


@pytest.mark.parametrize("topk", [{}, dict(mem_topk=5, mem_retrieval="exact"),
                                  dict(mem_topk=6, mem_retrieval="blocks", mem_block_size=4)],
                         ids=["all of memory", "exact top-k", "top-k blocks"])
def test_attention_weights_rebuild_the_memory_layer_output_of_a_decode_step(topk):
    """The weights passkey.py reads (local window, then memory: the entries the layer attends to) times the values
    give the memory layer's attention output for the step's token, as the model computed it."""
    torch.manual_seed(0)
    config = longllama.LongLlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                       mem_layers=[1], last_context_length=6, mem_dtype="float32", **topk)
    model = longllama.LongLlama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # attention far from uniform
    _, cache = model(torch.randint(0, 61, (1, 70)), use_cache=True)
    seen = {}
    attention = model.layers[1].attention
    hooks = [attention.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0])),
             attention.register_forward_hook(lambda module, args, out: seen.__setitem__("out", out))]
    _, cache = model(torch.tensor([[7]]), cache=cache, use_cache=True)
    for hook in hooks:
        hook.remove()
    local_length = cache.local_length
    weights = passkey.attention_weights(model, 1, seen["x"], cache, local_length)  # [1, H, S + M]
    mem_values = cache.memory[1].view()[1]
    values = torch.cat([cache.local[1].values[:, :, :local_length], mem_values], dim=2).repeat_interleave(2, dim=1)
    heads = (weights[:, :, None] @ values.float()).squeeze(2)  # [1, H, D]
    rebuilt = attention.wo(heads.reshape(1, 1, -1))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)
    if topk:  # only the chosen entries have weight
        chosen = (weights[0, :, local_length:] > 0).sum(-1)
        assert (chosen <= 8).all() and cache.memory_size > 40


def test_decoy_documents_say_keys_as_the_pass_key_is_said_and_never_the_pass_key(tokenizer):
    text = passkey.decoy_document(random.Random(3), 256, passkey.Haystack.filler(tokenizer))
    said = [line for line in text.split("\n") if " is " in line and line.split(" is ")[1][:1].isdigit()]
    assert len(said) == passkey.DECOYS_PER_WINDOW and "pass key" not in text
    stream = passkey.decoy_stream(tokenizer, 256, 1000, seed=3)
    assert len(stream) == 1000 and stream[0] == tokenizer.bos_id and "pass key" not in tokenizer.decode(stream)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_other_documents_are_the_haystack_text_from_its_start_and_again_when_it_runs_out(tokenizer, tokens):
    lines = ["def first(a):", "    return a + 1", "", "x = first(41)  # 42"]
    haystack = passkey.Haystack.from_text(tokenizer, "\n".join(lines), "code")
    stream = passkey.document_stream(haystack, tokens)
    text = "\n".join(line for line in lines if line)
    expected = [tokenizer.bos_id] + tokenizer.encode("\n".join([text] * 40), bos=False)
    assert stream == expected[:tokens]


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
                                   ["--lengths", "4000m"],  # more memory than the machine has
                                   ["--lengths", "0"], ["--haystack", "/nonexistent"], ["--haystack", "/dev/null"],
                                   ["--task", "other"], ["--task", "decoys", "--depths", "0.5"],
                                   ["--task", "decoys", "--haystack", "README.md"], ["--task", "documents"],
                                   ["--task", "documents", "--haystack", "README.md", "--depths", "0.5"]])
def test_bad_input_is_one_error_line(checkpoint, flags):
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), *flags], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_passkey_documents_are_the_same_text_on_every_read_and_differ_from_each_other(tokenizer):
    docs = documents.passkey_documents(3, seed=5, window=64, tokenizer=tokenizer)
    again = documents.passkey_documents(3, seed=5, window=64, tokenizer=tokenizer)
    assert documents.read_document(docs[1]) == documents.read_document(again[1])
    assert len({documents.read_document(doc)[1] for doc in docs}) == 3


def test_a_training_run_reads_passkey_documents_beside_the_corpus(assets, tmp_path):
    tok = Tokenizer(assets["tokenizer"])
    docs = (documents.scan_paths([assets["corpus"]])
            + documents.passkey_documents(6, seed=0, window=16, tokenizer=tok))
    batches = documents.Batches(docs, tok, batch_size=4, seq_len=16, packing=2, seed=0)
    text = "".join(tok.decode(batches.next()[0].flatten().tolist()) for _ in range(40))
    assert "important info" in text and "def " in text  # the task line of a passkey document, and code
    train.main(small_run(assets, tmp_path / "run", "--max-steps", "2", "--passkey-docs", "6"))
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_experiment_plots_draw_from_a_small_results_file(tmp_path):
    passkey_summary = dict(accuracy={"1024": 1.0, "4096": 0.5}, interval={"1024": [0.8, 1.0], "4096": [0.3, 0.7]},
                           trials={"1024": 20, "4096": 20}, by_depth={"1024": {"0.5": 1.0}, "4096": {"0.5": 0.5}})
    decoy_summary = dict(accuracy={"0": 1.0, "4096": 0.5}, interval={"0": [0.8, 1.0], "4096": [0.3, 0.7]},
                          trials={"0": 20, "4096": 20}, relevant_attention={"0": 0.9, "4096": 0.2},
                          by_depth={"0": {"all": 1.0}, "4096": {"all": 0.5}})
    results = dict(size="cpu", window=256, train_tokens=256, setups={
        name: dict(cross_batch_range=d, passkey=passkey_summary, passkey_code=passkey_summary, decoys=decoy_summary,
                   documents=decoy_summary, perplexity={"0": 30.0, "4": 29.0 - d, "16": 28.0 - d})
        for name, d in context_scaling.SETUPS.items()})
    (tmp_path / "results.json").write_text(json.dumps(results))
    context_scaling.main(["--out", str(tmp_path), "--only-draw"])
    for name in ["passkey.png", "passkey_code.png", "distraction.png", "attention.png", "decoys_distraction.png",
                 "decoys_attention.png", "perplexity.png", f"heatmap_{next(iter(context_scaling.SETUPS))}.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_experiment_trains_the_base_once_then_every_setup_from_it_skipping_finished_runs(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(context_scaling, "run", lambda batch, side_by_side=1: commands.extend(batch))
    size = context_scaling.SIZES["cpu"]
    base_steps = size["base"][size["base"].index("--max-steps") + 1]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "train_state.json").write_text(json.dumps({"step": int(base_steps)}))  # finished
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / "train_state.json").write_text(json.dumps({"step": 100}))  # stopped part way
    context_scaling.train_all(tmp_path, size)
    assert len(commands) == len(context_scaling.SETUPS)  # the base is not trained again
    for command, (name, d) in zip(commands, context_scaling.SETUPS.items()):
        assert command[command.index("--out") + 1] == str(tmp_path / name)
        assert command[command.index("--cross-batch-range") + 1] == str(d)
        if name == "d1":  # an unfinished run resumes (its --init is in its saved settings)
            assert "--resume" in command and "--init" not in command
        else:
            assert command[command.index("--init") + 1] == str(tmp_path / "base") and "--resume" not in command


def test_the_experiment_runs_only_the_trials_whose_results_are_missing(tmp_path):
    (tmp_path / "decoys_fot7.json").write_text("{}")
    commands = context_scaling.trial_commands(tmp_path, context_scaling.SIZES["cpu"])
    outs = [c[c.index("--out") + 1] for c in commands]
    orders = context_scaling.SIZES["cpu"]["document_orders"]
    assert str(tmp_path / "decoys_fot7.json") not in outs
    assert len(outs) == (4 + orders) * len(context_scaling.SETUPS) - 1
    kind = lambda out: "_".join(part for part in Path(out).stem.split("_") if part not in context_scaling.SETUPS)
    haystacks = {(kind(out), c[c.index("--haystack") + 1] if "--haystack" in c else None)
                 for c, out in zip(commands, outs)}
    held_out = str(tmp_path / "haystack_held_out.py")  # passkey in code, other documents in memory
    training_code = {k: tmp_path / f"documents_order{k}_256k.py" for k in range(orders)}  # the largest memory
    assert haystacks == {("passkey", None), ("passkey_code", held_out), ("documents", held_out), ("decoys", None),
                         *((f"documents_order{k}", str(path)) for k, path in training_code.items())}
    assert "def " in (tmp_path / "haystack_held_out.py").read_text()  # held-out standard-library code
    _, held_out_documents = documents.split_held_out(documents.stdlib_documents(), train.Settings().holdout)
    held_out_texts = [documents.read_document(doc)[1] for doc in held_out_documents]
    for k, path in training_code.items():  # a different text in each order, enough for the largest memory
        text = path.read_text()
        assert len(text) >= 4 * 262144 and not any(held in text for held in held_out_texts)
        assert text[:1000] != training_code[(k + 1) % orders].read_text()[:1000]


def test_the_top_k_comparison_runs_each_setting_once_with_its_own_flags(tmp_path):
    (tmp_path / "passkey_fot3_blocks128.json").write_text("{}")  # finished: not run again
    commands = context_scaling.topk_commands(ROOT / "models", tmp_path, context_scaling.SIZES["cpu"])
    runs = {c[c.index("--out") + 1]: c for c in commands}
    settings = len(context_scaling.TOPK) * len(checks.MEM_RETRIEVALS) + 1  # and all of memory
    fot, setups = len(context_scaling.FOT), len(context_scaling.SETUPS)
    distractions = setups * 2 * len(context_scaling.DISTRACTIONS)  # all of memory and K = 128 (blocks)
    assert len(runs) == len(commands) == fot * settings - 1 + (setups - fot) * 2 + fot * 3 + distractions
    assert str(tmp_path / "passkey_fot3_blocks128.json") not in runs
    for out, command in runs.items():
        setting = out.rsplit("_", 1)[1].removesuffix(".json")
        flags = command[command.index("--mem-topk"):command.index("--mem-topk") + 4] if "--mem-topk" in command else []
        assert flags == context_scaling.topk_settings()[setting]
        assert command[command.index("--ckpt") + 1] == str(ROOT / "models" / out.split("_")[-2])


def test_the_top_k_comparison_without_trained_models_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        context_scaling.main(["--topk", "--models", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--topk compares trained models" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_top_k_tables_show_every_setting_measured():
    part = lambda accuracy: dict(accuracy={"16384": accuracy}, interval={"16384": [0.5, 1.0]})
    results = {"fot7": {"all": dict(passkey=part(0.75), perplexity={"0": 2.0, "16": 1.9}),
                        "blocks128": dict(passkey=part(1.0),
                                          decoys=dict(accuracy={"0": 1.0}, interval={"0": [0.8, 1]}))},
               "fot3": {}, "d1": {}, "d0": {}}
    text = context_scaling.topk_tables(results)
    assert "| FoT (d = 7) | all of memory | 75% (50-100%) | - | - | - | -5.0% |" in text
    assert "| FoT (d = 7) | top 128 (blocks) | 100% (50-100%) | - | - | - | - |" in text
    assert "| FoT (d = 7) | top 128 (blocks) | 100% (80-100%) |" in text  # the decoys table


def test_decoy_and_haystack_commands_write_their_reports(checkpoint, tmp_path):
    (tmp_path / "hay.txt").write_text("alpha = 1\nbeta = 2\n\ngamma = alpha + beta\n")
    out = tmp_path / "code.json"
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), "--lengths", "200", "--trials",
                             "2", "--haystack", str(tmp_path / "hay.txt"), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["haystack"] == str(tmp_path / "hay.txt") and len(report["results"]) == 2
    out = tmp_path / "decoys.json"
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), "--task", "decoys", "--lengths",
                             "0,100", "--trials", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["task"] == "decoys" and set(report["relevant_attention"]) == {"0", "100"}
    assert "| 100 |" in result.stdout and "attention on the document" in result.stdout
    out = tmp_path / "documents.json"
    result = subprocess.run([sys.executable, "passkey.py", "--ckpt", str(checkpoint), "--task", "documents",
                             "--haystack", str(tmp_path / "hay.txt"), "--lengths", "0,300,0", "--trials", "2", "--out",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["task"] == "documents" and report["haystack"] == str(tmp_path / "hay.txt")
    assert [r["length"] for r in report["results"]] == [0, 0, 300, 300]  # a length given twice runs once


@pytest.mark.parametrize("run", ["context_scaling_cpu", "context_scaling_cpu_long"])
def test_the_exploration_log_states_each_earlier_run_as_its_results_file_holds_it(run):
    results = json.loads((ROOT / "docs" / run / "results.json").read_text())
    log = (ROOT / "docs" / "exploration.md").read_text()
    labels = {"fot": "FoT (d = 3)", "d1": "d = 1", "d0": "d = 0 (no cross-batch)"}  # the earlier recipe's setups
    for name, setup in results["setups"].items():
        passkey_cells = " / ".join(f"{a:.0%}" for a in setup["passkey"]["accuracy"].values())
        perplexities = " / ".join(f"{p:.2f}" for p in setup["perplexity"].values())
        change = setup["perplexity"]["16"] / setup["perplexity"]["0"] - 1
        row = f"| {labels[name]} | {passkey_cells} | {perplexities} | {change:+.1%} |"
        assert row in log, row


FOT_RUN = ROOT / "docs" / "fot_cpu"  # docs/results.md's CPU run: results.json and every trial
MODELS = ROOT / "models"


def test_the_readme_states_the_cpu_run_as_its_results_file_holds_it():
    results = json.loads((FOT_RUN / "results.json").read_text())
    readme = (ROOT / "docs" / "results.md").read_text()
    for line in context_scaling.tables(results).splitlines():
        assert line in readme, line
    for name, setup in results["setups"].items():  # and each summary is what its trials say
        parts = {f"{key}_{name}": setup[key] for key in ("passkey", "passkey_code", "documents", "decoys")}
        parts |= {f"documents_{name}_order{k}": part for k, part in setup["documents_orders"].items()}
        for file, part in parts.items():
            trials = json.loads((FOT_RUN / f"{file}.json").read_text())["results"]
            for length, accuracy in part["accuracy"].items():
                cell = [t for t in trials if t["length"] == int(length)]
                assert len(cell) >= 20 and accuracy == sum(t["correct"] for t in cell) / len(cell)
                if "relevant_attention" in part:
                    share = sum(t["relevant_attention"] for t in cell) / len(cell)
                    assert part["relevant_attention"][length] == pytest.approx(share)


def test_the_readme_states_the_quantized_quality_as_its_results_files_hold_it():
    runs = ROOT / "docs" / "quantized"
    perplexity = json.loads((runs / "perplexity_fot3.json").read_text())
    readme = (ROOT / "docs" / "quantization.md").read_text()
    bf16 = perplexity["bfloat16"]["16"]
    for weights, file in [("float32", "none"), ("int8", "int8"), ("int4", "int4")]:
        report = json.loads((runs / f"passkey_fot3_{file}.json").read_text())
        assert report["quantize"] == (None if file == "none" else file)
        cells = [passkey.with_interval(report["accuracy"][n], report["interval"][n]) for n in report["accuracy"]]
        ppl = perplexity[weights]["16"]
        row_start = f"| {weights} | {ppl:.3f}"
        assert row_start in readme and " | ".join(cells) in readme, (row_start, cells)
    assert f"| bfloat16 compute | {bf16:.3f} |" in readme
    gguf_perplexity = json.loads((runs / "perplexity_fot3_gguf.json").read_text())
    for label, name in [("GGUF Q8_0, kept as int8", "q8_0"), ("GGUF Q4_0, kept as int4", "q4_0"),
                        ("GGUF Q4_K_M (here Q5_0 and Q8_0), kept as int8", "q4_k_m")]:
        report = json.loads((runs / f"passkey_fot3_gguf_{name}.json").read_text())
        assert report["quantize"] == label.rsplit(" ", 1)[-1]
        cells = [passkey.with_interval(report["accuracy"][n], report["interval"][n]) for n in report["accuracy"]]
        ppl = gguf_perplexity[name]["16"]
        row = f"| {label} | {ppl:.3f} ({(ppl / bf16 - 1) * 100:+.2f}% on bfloat16) | {' | '.join(cells)} |"
        assert row in readme, row


def test_the_readme_states_the_top_k_comparison_as_its_results_files_hold_it():
    results = json.loads((ROOT / "docs" / "topk" / "topk.json").read_text())
    readme = (ROOT / "docs" / "topk_memory.md").read_text()
    for line in context_scaling.topk_tables(results).splitlines():
        assert line in readme, line
    for name, settings in results.items():  # and each summary is what its trials say
        for setting, found in settings.items():
            for key in ("passkey", "passkey_code", *context_scaling.DISTRACTIONS):
                if key in found:
                    trials = json.loads((ROOT / "docs" / "topk" / f"{key}_{name}_{setting}.json").read_text())
                    flags = context_scaling.topk_settings()[setting]  # the run was read as its name says
                    assert [trials["mem_topk"], trials.get("mem_retrieval")] == ([int(flags[1]), flags[3]] if flags
                                                                                 else [None, None])
                    for length, accuracy in found[key]["accuracy"].items():
                        hits = [t["correct"] for t in trials["results"] if t["length"] == int(length)]
                        assert len(hits) >= 20 and accuracy == sum(hits) / len(hits)


@pytest.mark.parametrize("name", list(context_scaling.SETUPS))
def test_a_shipped_checkpoint_gives_the_answers_its_trials_file_recorded(name):
    """The first trials of each cell up to 4k tokens, rerun on models/NAME, answer as the run recorded."""
    report = json.loads((FOT_RUN / f"passkey_{name}.json").read_text())
    model = longllama.load(MODELS / name)
    builder = passkey.PromptBuilder(checkpoint_tokenizer(MODELS / name))
    depths = [float(d) for d in dict.fromkeys(r["column"] for r in report["results"])]
    rerun = passkey.run_trials(model, builder, [1024, 4096], depths, 1, report["seed"], log=lambda _: None)
    recorded = {(r["length"], r["column"]): r for r in reversed(report["results"])}  # each cell's first trial
    for trial in rerun:
        expected = recorded[(trial["length"], trial["column"])]
        assert (trial["passkey"], trial["answer"]) == (expected["passkey"], expected["answer"])


@pytest.mark.parametrize("task", context_scaling.DISTRACTIONS)
def test_a_shipped_checkpoint_answers_after_other_material_as_its_trials_file_recorded(task, tmp_path):
    """The first two trials with 0 and 4k tokens of other documents (held-out code) or decoys in memory, rerun on
    models/fot3, answer as the run recorded, with the same attention share."""
    report = json.loads((FOT_RUN / f"{task}_fot3.json").read_text())
    model = longllama.load(MODELS / "fot3")
    tokenizer = checkpoint_tokenizer(MODELS / "fot3")
    if task == "documents":
        text = context_scaling.held_out_code(tmp_path).read_text()
        distractors = passkey.document_stream(passkey.Haystack.from_text(tokenizer, text, "code"), 4096)
    else:
        distractors = passkey.decoy_stream(tokenizer, 256, 4096, report["seed"])
    rerun = passkey.distraction_trials(model, tokenizer, distractors, [0, 4096], 2, report["seed"], lambda _: None)
    for size in (0, 4096):
        recorded = [r for r in report["results"] if r["length"] == size][:2]
        got = [r for r in rerun if r["length"] == size]
        assert [(r["passkey"], r["answer"]) for r in got] == [(r["passkey"], r["answer"]) for r in recorded]
        assert [r["relevant_attention"] for r in got] == pytest.approx([r["relevant_attention"] for r in recorded])


def test_the_shipped_checkpoints_have_the_shape_the_cpu_recipe_trains():
    """models/ is what `context_scaling.py --size cpu` builds: its preset's shape, its vocabulary, its steps."""
    base, fot = context_scaling.SIZES["cpu"]["base"], context_scaling.SIZES["cpu"]["fot"]
    vocab_size = int(context_scaling.flag(base, "--vocab-size"))
    shape = longllama.PRESETS[context_scaling.flag(base, "--preset")] | {"vocab_size": vocab_size}
    for name in ["base", *context_scaling.SETUPS]:
        config = longllama.LongLlamaConfig.from_json(MODELS / name / "config.json")
        assert {key: getattr(config, key) for key in shape} == shape
        steps = [json.loads(line)["step"] for line in (MODELS / name / "log.jsonl").read_text().splitlines() if line]
        flags = base if name == "base" else fot
        assert steps[-1] == int(context_scaling.flag(flags, "--max-steps"))


def test_generate_runs_on_a_shipped_checkpoint():
    result = subprocess.run([sys.executable, "generate.py", "--ckpt", str(MODELS / "fot7"), "--prompt",
                             passkey.prompt_text(documents.FILLER, documents.FILLER, 31415), "--temperature", "0",
                             "--max-new-tokens", "6"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("31415")
