"""Sessions: a document read once answers many questions, from Python, the command line, stdin and memory files.

Every answer is compared with one computed independently: the document read again with the model API and decoded
greedily by hand, or each document of a batch run alone. The model is tiny and random, with bfloat16 memory (so
memory files hold it in half the bytes of the float32 compute).
"""

import itertools
import json
import os
import select
import subprocess
import sys
import time
from types import SimpleNamespace

import jinja2
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import generate
import checkpoint
import longllama
from conftest import ROOT
from test_bad_input import exits_with_one_error_line
from test_train import synthetic_text
from tokenizer import checkpoint_tokenizer, train_tokenizer

QUESTIONS = ["def alpha", "return x +", "what does beta_3 return?"]
# LongLLaMA-Instruct's chat prompt (from LongChat), written as a chat template (newlines inside expressions: Jinja's
# trim_blocks drops a newline right after a tag)
LONGCHAT = ("{{ bos_token }}A chat between a user (denoted as USER:) and an artificial intelligence assistant (denoted "
            "as ASSISTANT:). The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
            "{% for message in messages %}{% if message['role'] == 'user' %}{{ '\\nUSER: ' + message['content'] }}"
            "{% else %}{{ '\\nASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '\\nASSISTANT: ' }}{% endif %}")
# Meta Llama-3-Instruct's chat template, as its tokenizer_config.json holds it
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """A small tokenizer, a tiny checkpoint (window 32, last context 16, bfloat16 memory) with a chat template,
    another model of the same shape, a document of several windows and a memory file of it read with --template
    instruct."""
    root = tmp_path_factory.mktemp("sessions")
    tok = train_tokenizer([synthetic_text(i) for i in range(20)], root / "tok.model", vocab_size=320)
    for seed, name in [(0, "ckpt"), (1, "other")]:
        torch.manual_seed(seed)
        config = longllama.LongLlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                           mem_layers=[1], last_context_length=16, mem_dtype="bfloat16")
        longllama.save(longllama.LongLlama(config), root / name)
        (root / name / "tokenizer.model").write_bytes((root / "tok.model").read_bytes())
    (root / "ckpt" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": LONGCHAT}))
    document = root / "paper.txt"
    document.write_text(synthetic_text(4, lines=14))
    model = longllama.load(root / "ckpt")  # float32: the command lines below say --dtype float32
    memory = root / "paper.mem"
    documents = generate.read(model, tok, document.read_text(), generate.INSTRUCT)
    fingerprint = generate.memory_fingerprint(model, checkpoint_tokenizer(root / "ckpt"), generate.INSTRUCT)
    generate.save_memory(memory, documents, fingerprint, [str(document)])
    return SimpleNamespace(ckpt=root / "ckpt", other=root / "other", document=document, memory=memory, tok=tok,
                           model=model)


def greedy_after_rereading(model, document_ids, question_ids, steps, eos_id):
    """The document read afresh, then the question, then greedy tokens one by one, with the model API alone."""
    _, cache = model(torch.tensor([document_ids]), use_cache=True)
    logits, cache = model(torch.tensor([question_ids]), cache=cache, use_cache=True)
    answer = []
    while len(answer) < steps and eos_id not in answer:
        answer.append(int(logits[0, -1].argmax()))
        logits, cache = model(torch.tensor([answer[-1:]]), cache=cache, use_cache=True)
    return answer


def checkpoint_with_chat_template(session, tmp_path, template):
    """The session's checkpoint (linked) with this chat template in its tokenizer_config.json, or None: none."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        (ckpt / name).symlink_to(session.ckpt / name)
    if template is not None:
        (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return ckpt


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------------- read once


def test_answers_from_one_reading_equal_answers_after_reading_the_document_again(session):
    model, tok = session.model, session.tok
    text = session.document.read_text()
    documents = generate.read(model, tok, text, generate.INSTRUCT)
    sampling = generate.Sampling(max_new_tokens=40, temperature=0)  # 40 tokens: the local window fills and evicts
    answers = [generate.answer(model, tok, documents, question, sampling).tokens[0] for question in QUESTIONS]

    system = ("You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully "
              "as you can.\n")
    document_ids = tok.encode(system + text)
    assert len(document_ids) > 4 * model.config.max_position_embeddings
    for question, answer in zip(QUESTIONS, answers):
        asked = (f"\nAnswer the following question briefly using information from the text above.\nQuestion: "
                 f"{question}\nAnswer: ")
        assert answer == greedy_after_rereading(model, document_ids, tok.encode(asked, bos=False), 40, tok.eos_id)
    assert len(set(map(tuple, answers))) > 1  # the questions do make a difference


def test_a_saved_memory_answers_in_a_later_process_as_the_run_that_read_it(session, tmp_path):
    memory = tmp_path / "paper.mem"
    asking = ["--ckpt", session.ckpt, "--template", "instruct", "--temperature", "0", "--max-new-tokens", "30",
              *itertools.chain(*(["--question", question] for question in QUESTIONS))]
    read = run_cli(*asking, "--prompt-file", session.document, "--save-memory", memory)
    loaded = run_cli(*asking, "--load-memory", memory, "--mem-attention-grouping", "2,4")  # grouping: same values
    assert read.returncode == 0 and loaded.returncode == 0, read.stderr + loaded.stderr
    assert loaded.stdout == read.stdout and read.stdout.count("\nA: ") == len(QUESTIONS)
    assert " | read in " in read.stderr and " | loaded in " in loaded.stderr
    assert sorted(os.listdir(tmp_path)) == ["paper.mem"]  # no temporary file left beside it


def test_memory_goes_to_a_file_in_mem_dtype_and_comes_back_exactly(session):
    documents = generate.read(session.model, session.tok, session.document.read_text())
    tensors = checkpoint.cache_tensors(documents.cache)
    assert tensors["memory.1.keys"].dtype == torch.bfloat16 and tensors["local.0.keys"].dtype == torch.float32
    restored = checkpoint.cache_from_tensors(session.model, tensors, 1, documents.cache.position, documents.cache.padding)
    for original, back in [(documents.cache.memory[1].view(), restored.memory[1].view()),
                           ([c.keys for c in documents.cache.local], [c.keys for c in restored.local])]:
        assert all(torch.equal(a, b) for a, b in zip(original, back))
    assert (restored.local_length, restored.position) == (documents.cache.local_length, documents.cache.position)


def mapped_from(path, address: int) -> bool:
    """Whether address lies in a memory mapping of the file at path (Linux: /proc/self/maps)."""
    for line in open("/proc/self/maps"):
        span, *_, name = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if name.strip() == str(path.resolve()) and start <= address < end:
            return True
    return False


def test_a_top_k_memory_file_is_used_in_place_and_answers_as_the_reading_did(session, tmp_path):
    """With mem_topk, memory is held in mem_dtype, so a memory file's entries are used as they lie in the file
    (mapped, read where attention looks) rather than copied; answers that evict into memory move it to buffers of
    its own, and equal those from the cache that read the document."""
    model = longllama.load(session.ckpt, mem_topk=8, mem_block_size=4)
    documents = generate.read(model, session.tok, session.document.read_text(), generate.INSTRUCT)
    fingerprint = generate.memory_fingerprint(model, checkpoint_tokenizer(session.ckpt), generate.INSTRUCT)
    generate.save_memory(tmp_path / "paper.mem", documents, fingerprint, ["paper"])
    loaded, _ = generate.load_memory(tmp_path / "paper.mem", model, fingerprint, generate.INSTRUCT)
    memory = loaded.cache.memory[1]
    assert memory.keys.dtype == torch.bfloat16 and not memory.owned  # the file's tensors, not a copy
    assert mapped_from(tmp_path / "paper.mem", memory.keys.data_ptr())  # where they lie in the file
    assert memory.length > 8 * model.config.mem_topk
    sampling = generate.Sampling(max_new_tokens=40, temperature=0)  # the local window fills and evicts
    for question in QUESTIONS:
        read, again = (generate.answer(model, session.tok, docs, question, sampling).tokens[0]
                       for docs in (documents, loaded))
        assert read == again


# ---------------------------------------------------------------------------------------------------- memory files


def tampered(session, tmp_path):
    """The memory file without one of its tensors, its metadata intact."""
    with safe_open(str(session.memory), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(session.memory)
    del tensors["cache.memory.1.keys"]
    save_file(tensors, tmp_path / "tampered.mem", metadata=metadata)
    return tmp_path / "tampered.mem"


def other_tokenizer(session, tmp_path):
    train_tokenizer([synthetic_text(50 + i) for i in range(5)], tmp_path / "other.model", vocab_size=300)
    return ["--tokenizer", tmp_path / "other.model"]


@pytest.mark.parametrize("change,message", [
    (lambda s, tmp: ["--ckpt", s.other], "read by another model (its weights differ from this checkpoint's)"),
    (lambda s, tmp: ["--last-context-length", "8"], "read with last_context_length=16, this run has last_context_le"),
    (lambda s, tmp: ["--mem-dtype", "float32"], "read with mem_dtype='bfloat16', this run has mem_dtype='float32'"),
    (lambda s, tmp: ["--dtype", "bfloat16"], "read in float32, this run computes in bfloat16"),
    (lambda s, tmp: ["--template", "none"], "read with --template instruct, this run has --template none"),
    (other_tokenizer, "read with another tokenizer"),
    (lambda s, tmp: ["--load-memory", tampered(s, tmp)], "missing tensors ['memory.1.keys']"),
    (lambda s, tmp: ["--load-memory", s.ckpt / "model.safetensors"], "not a memory file"),
    (lambda s, tmp: ["--load-memory", s.document], "cannot read it"),
    (lambda s, tmp: ["--load-memory", tmp / "missing.mem"], "cannot read it"),
], ids=["another model", "last_context_length", "mem_dtype", "dtype", "template", "tokenizer", "tampered",
        "weights file", "text file", "missing"])
def test_a_memory_file_read_otherwise_or_damaged_is_refused_in_one_line(session, tmp_path, capsys, change, message):
    flags = ["--ckpt", session.ckpt, "--load-memory", session.memory, "--template", "instruct", "--question", "x",
             "--dtype", "float32", *change(session, tmp_path)]  # the memory file was read in float32
    line = exits_with_one_error_line(capsys, generate.main, list(map(str, flags)))
    assert line.startswith("error: memory file ") and message in line


def test_a_truncated_memory_file_is_refused_in_one_line(session, tmp_path, capsys):
    data = session.memory.read_bytes()
    for size in (10, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.mem").write_bytes(data[:size])
        line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", str(session.ckpt), "--load-memory",
                                                                 str(tmp_path / "cut.mem"), "--question", "x"])
        assert line.startswith(f"error: memory file {tmp_path / 'cut.mem'}: cannot read it")


# ---------------------------------------------------------------------------------------------------- stop strings


@pytest.mark.parametrize("stop", [["\nQ:"], ["Q:", "\nQ"], ["zzz", "\nQ:"]])
def test_a_stop_string_never_shows_whatever_the_chunks_it_arrives_in(stop):
    text = "Yes, \nQ and \nQ... so\nQ: the next question"
    expected = text[:min(text.find(s) for s in stop if s in text)]
    for a, b in itertools.combinations(range(1, len(text)), 2):  # every split of the text into three chunks
        stops, shown = generate.StopStrings(stop), ""
        for chunk in (text[:a], text[a:b], text[b:]):
            shown += stops.push(chunk)
            assert expected.startswith(shown)  # never a character past the answer
        assert shown + stops.push("", final=True) == expected and stops.stopped


def test_text_held_back_for_a_stop_string_that_never_completes_is_shown_at_the_end():
    stops = generate.StopStrings(["\nQ:"])
    assert stops.push("an answer\n") == "an answer" and stops.push("Q") == ""
    assert stops.push(" and more\nQ", final=True) == "\nQ and more\nQ" and not stops.stopped


def test_a_stop_string_split_across_tokens_ends_the_streamed_answer_before_it(session):
    model, tok = session.model, session.tok
    documents = generate.read(model, tok, session.document.read_text())
    pieces = []
    generate.answer(model, tok, documents, "def", generate.Sampling(30, temperature=0), on_text=pieces.append)
    text = "".join(pieces)
    # a stop string made of the last character of one token's text and the first of the next
    boundary = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i]
                    and text.find(pieces[i - 1][-1] + pieces[i][0]) == len("".join(pieces[:i])) - 1)
    stop = pieces[boundary - 1][-1] + pieces[boundary][0]
    streamed = []
    result = generate.answer(model, tok, documents, "def", generate.Sampling(30, temperature=0, stop=(stop,)),
                             on_text=streamed.append)
    assert "".join(streamed) == result.texts[0] == text[:text.find(stop)]


# ---------------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("lines,questions,max_new_tokens", [
    # documents of different numbers of memory windows, each last window of another length: equal through evictions
    ([14, 5, 9], QUESTIONS, 30),
    # one document shorter than the last context: equal while question and answer stay within the window
    ([14, 0, 5], QUESTIONS[:2], 8),
], ids=["long documents", "with a short one"])
def test_a_batch_answers_each_document_as_its_single_run(session, lines, questions, max_new_tokens):
    model, tok = session.model, session.tok
    texts = [synthetic_text(10 + n, lines=n) if n else "def f(x):" for n in lines]
    window, last_context = model.config.max_position_embeddings, model.config.last_context_length
    memory_parts = [len(tok.encode(text)) - last_context for text in texts]
    assert (min(memory_parts) < 0) == (0 in lines)
    if 0 in lines:
        assert all(last_context + len(tok.encode(q, bos=False)) + max_new_tokens <= window + 1 for q in questions)
    batch = generate.generate(model, tok, generate.read(model, tok, texts), questions, max_new_tokens, temperature=0)
    for i, text in enumerate(texts):
        alone = generate.generate(model, tok, generate.read(model, tok, text), questions, max_new_tokens,
                                  temperature=0)
        assert [answers[i] for answers in batch] == alone


def test_a_batch_from_the_command_line_prints_each_answer_under_its_document(session, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(synthetic_text(20, lines=3))
    result = run_cli("--ckpt", session.ckpt, "--prompt-file", session.document, "--prompt-file", short,
                     "--question", QUESTIONS[0], "--temperature", "0", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    model, tok = session.model, session.tok
    answers = [generate.generate(model, tok, generate.read(model, tok, path.read_text()), QUESTIONS[:1], 8,
                                 temperature=0)[0] for path in (session.document, short)]
    assert result.stdout == (f"Q: {QUESTIONS[0]}\n==> {session.document} <==\n{answers[0]}\n==> {short} <==\n"
                             f"{answers[1]}\n\n")
    assert "2 documents " in result.stderr


# ---------------------------------------------------------------------------------------------------- interactive


def read_until(pipe, marker: bytes, timeout: float = 60) -> bytes:
    """What a pipe gives until `marker` has come, failing the test after timeout seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        ready, _, _ = select.select([pipe], [], [], max(deadline - time.monotonic(), 0))
        chunk = os.read(pipe.fileno(), 4096) if ready else b""
        if not chunk:
            pytest.fail(f"no {marker!r} after {data!r}")
        data += chunk
    return data


def test_interactive_mode_answers_each_question_piped_on_stdin_as_it_comes(session):
    command = [sys.executable, str(ROOT / "generate.py"), "--ckpt", str(session.ckpt), "--prompt-file",
               str(session.document), "--interactive", "--template", "chat", "--temperature", "0",
               "--max-new-tokens", "10", "--device", "cpu"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        process.stdin.write(f"{QUESTIONS[0]}\n\n".encode())  # a blank line asks nothing
        process.stdin.flush()
        first = read_until(process.stdout, b"\n\n")  # answered while stdin is still open
        process.stdin.write(f"  {QUESTIONS[1]}  \n".encode())
        rest, err = process.communicate(timeout=60)  # EOF ends the session
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err.decode()
    model, tok = session.model, session.tok
    template = generate.prompt_format("chat", session.ckpt, tok)
    documents = generate.read(model, tok, session.document.read_text(), template)
    answers = generate.generate(model, tok, documents, QUESTIONS[:2], 10, temperature=0)
    expected = [f"Q: {question}\nA: {answer}\n\n" for question, answer in zip(QUESTIONS, answers)]
    assert first.decode() == expected[0] and (first + rest).decode() == "".join(expected)
    assert err.decode().count("\nanswer ") == 2


# ---------------------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("template,bos,eos,by_hand,eos_in_prompt", [
    (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
     "{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", 1),
    (LONGCHAT, "<s>", "</s>", "<s>A chat between a user (denoted as USER:) and an artificial intelligence assistant "
     "(denoted as ASSISTANT:). The assistant gives helpful, detailed, and polite answers to the user's questions.\n\n"
     "\nUSER: {content}\nASSISTANT: ", 0),
], ids=["llama-3", "longllama-instruct"])
def test_the_chat_template_renders_as_jinja_renders_it(session, tmp_path, template, bos, eos, by_hand, eos_in_prompt):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": bos,
                                                                "eos_token": eos}))
    chat = generate.prompt_format("chat", tmp_path, session.tok)
    document, question = "The sky is blue.", "What colour is the sky?"
    content = f"{document}\n\n{question}"
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template).render(
        messages=[{"role": "user", "content": content}], bos_token=bos, eos_token=eos, add_generation_prompt=True)
    assert chat.head + document + chat.middle + question + chat.tail == rendered == by_hand.format(content=content)
    # the special tokens it writes as text are read as their ids, and BOS is not added twice
    ids = chat.document_ids(session.tok, document) + chat.question_ids(session.tok, question)
    assert ids[0] == session.tok.bos_id and ids.count(session.tok.bos_id) == 1
    assert ids.count(session.tok.eos_id) == eos_in_prompt


@pytest.mark.parametrize("template,message", [
    ("{{ raise_exception('only user messages') }}", "chat template: only user messages"),
    ("{{ ''.__class__.__mro__ }}", "chat template: access to attribute '__class__' of 'str' object is unsafe"),
    ("{% for %}", "chat template: "),
    ("{{ messages[0]['content'] | upper }}", "does not write the user's message as it is given"),
], ids=["raise_exception", "sandbox", "syntax", "content changed"])
def test_a_chat_template_that_fails_is_one_error_line(session, tmp_path, capsys, template, message):
    ckpt = checkpoint_with_chat_template(session, tmp_path, template)
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", str(ckpt), "--prompt", "x", "--template",
                                                             "chat", "--question", "y"])
    assert message in line


# ---------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags,message", [
    ([], "one of --prompt, --prompt-file or --load-memory is required"),
    (["--prompt", "x", "--load-memory", "m"], "argument --load-memory: not allowed with argument --prompt"),
    (["--load-memory", "m", "--save-memory", "n"], "--save-memory and --load-memory together"),
    (["--prompt-file", "-", "--prompt-file", "-"], "--prompt-file - reads stdin, which can be read once"),
    (["--prompt-file", "-", "--interactive"], "--interactive reads questions from stdin"),
    (["--prompt", "x", "--template", "instruct"], "--template instruct frames questions: add --question or"),
    (["--prompt", "x", "--echo", "--question", "y"], "--echo prints one document before its continuation"),
    (["--prompt", "x", "--stop", ""], "--stop must be non-empty strings"),
    (["--prompt", "x", "--question", " "], "--question must be non-empty questions"),
    (["--prompt", "x", "--template", "chat", "--question", "y"], "has no tokenizer_config.json with a chat_template"),
    (["--prompt", "x", "--save-memory", "/no/such/dir/m.mem"], "cannot write memory file /no/such/dir/m.mem: no dir"),
])
def test_sessions_refuse_flags_that_do_not_go_together_in_one_line(session, tmp_path, capsys, flags, message):
    ckpt = checkpoint_with_chat_template(session, tmp_path, None)
    line = exits_with_one_error_line(capsys, generate.main, ["--ckpt", str(ckpt), *flags])
    assert message in line
