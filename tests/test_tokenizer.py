"""tokenizer.py: encoding equals SentencePiece's own, streaming decode adds up to decode(), trained tokenizers
round-trip source code exactly, bad files give one-line errors.

Expected values come from SentencePiece called directly or from the text itself (round trips), never from
tokenizer.py's own output.
"""
import argparse
import dataclasses
import heapq
import inspect
import json.decoder
import os
import random
import re
import sysconfig
import textwrap
import tokenize
from pathlib import Path

import pytest
import sentencepiece as spm

from conftest import openllama_tokenizer
import tokenizer
from tokenizer import Tokenizer, train_tokenizer

OPEN_LLAMA = ["open_llama_v1.model", "open_llama_v2.model"]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n\n\n",
    "Emoji 😀🎉 and CJK 日本語のテキスト, accents: café naïve Ωμέγα",
    "  leading, trailing and  double  spaces   ",
    "\n",
    "x",
    "",
]

# Fragments random test texts are glued from: multi-byte characters, runs of spaces, code, a literal U+FFFD.
FRAGMENTS = [
    "Hello", " world", "the", " cat", "  ", "   ", "    ", "\t", "\n", "\n\n", "😀", "🇫🇷", "日本語", "中文",
    "é", "ñandú", "Ωμέγα", "€", "123", " 4.5", "def f(x):\n    return x\n", "\ufffd", "a", ".", ", ", "\u200b",
]

CODE = (
    "#!/usr/bin/env python3\n"
    "\"\"\"Docstring with non-ASCII: naïve café, Ω, 日本, 😀.\"\"\"\n"
    "\n"
    "\n"
    "class Point:   \n"  # trailing spaces
    "\tdef __init__(self, x, y):\n"  # tab indentation
    "\t\tself.x, self.y = x,  y\n"
    "\n"
    "    def norm(self):        # aligned   comment\n"
    "        return (self.x ** 2 + self.y ** 2) ** 0.5\r\n"  # a CRLF line
    "   \n"  # a line of spaces only
    "\n"
    "s = 'tab\\there'  \t \n"
    "   leading spaces\n"
    "no newline at end"
)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 15)))


def stream(decoder, ids) -> list[str]:
    """Every chunk a decoder emits for ids, the flush included."""
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.fixture(params=OPEN_LLAMA)
def llama_path(request) -> Path:
    return openllama_tokenizer(request.param)


@pytest.fixture
def llama(llama_path) -> tuple[Tokenizer, spm.SentencePieceProcessor]:
    return Tokenizer(llama_path), spm.SentencePieceProcessor(model_file=str(llama_path))


# --- OpenLLaMA tokenizers: encode / decode


def test_special_ids_follow_llama(llama):
    tok, _ = llama
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 32000)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_is_sentencepiece_ids_with_bos_in_front(llama, text):
    tok, sp = llama
    assert tok.encode(text) == [1] + sp.EncodeAsIds(text)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_bos_and_eos_flags(llama, text):
    tok, sp = llama
    ids = sp.EncodeAsIds(text)
    assert tok.encode(text, bos=False) == ids
    assert tok.encode(text, eos=True) == [1] + ids + [2]
    assert tok.encode(text, bos=False, eos=True) == ids + [2]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_is_sentencepiece_decode(llama, text):
    tok, sp = llama
    ids = sp.EncodeAsIds(text)
    assert tok.decode(ids) == sp.DecodeIds(ids)


def test_decode_drops_bos_eos_and_pad(llama):
    tok, sp = llama
    ids = sp.EncodeAsIds("Hello world")
    assert tok.decode([1] + ids + [2, 0, 0]) == "Hello world"
    assert tok.decode([0, 1] + ids[:1] + [2, 1] + ids[1:]) == "Hello world"


# --- streaming decode


def test_streaming_adds_up_to_decode_without_broken_characters(llama):
    tok, sp = llama
    rng = random.Random(0)
    for _ in range(300):
        text = random_text(rng)
        ids = sp.EncodeAsIds(text)
        chunks = stream(tok.decoder(), [1] + ids)
        assert "".join(chunks) == sp.DecodeIds(ids), text
        if "\ufffd" not in text:
            assert not any("\ufffd" in chunk for chunk in chunks), (text, chunks)


def test_streaming_keeps_the_leading_space_of_words(llama):
    tok, sp = llama
    decoder = tok.decoder()
    assert [decoder.push(i) for i in [1] + sp.EncodeAsIds("Hello world")] == ["", "Hello", " world"]


def test_streaming_holds_a_byte_spelled_character_until_complete(llama):
    tok, sp = llama
    ids = [sp.PieceToId(p) for p in ["▁the", "<0xE2>", "<0x82>", "<0xAC>", "▁cat"]]  # "€" is E2 82 AC
    decoder = tok.decoder()
    assert [decoder.push(i) for i in ids] == ["the", "", "", "€", " cat"]


def test_flush_writes_an_unfinished_character_as_decode_does(llama):
    tok, sp = llama
    ids = [sp.PieceToId(p) for p in ["▁the", "<0xE2>", "<0x82>"]]
    assert "".join(stream(tok.decoder(), ids)) == sp.DecodeIds(ids) == "the\ufffd\ufffd"


def test_decoder_after_prompt_emits_only_the_continuation(llama):
    tok, sp = llama
    ids = sp.EncodeAsIds("The capital of France is Paris, of course.")
    split = [sp.IdToPiece(i) for i in ids].index("▁Paris")
    chunks = stream(tok.decoder([1] + ids[:split]), ids[split:])
    assert chunks[0] == " Paris"
    assert "".join(chunks) == " Paris, of course."


def test_decoder_after_bos_only_prompt_starts_like_decode(llama):
    tok, sp = llama
    ids = sp.EncodeAsIds(" Hello world")
    assert "".join(stream(tok.decoder([1]), ids)) == sp.DecodeIds(ids)


def test_decoder_after_prompt_ending_in_spaces_keeps_the_next_space(llama):
    # The prompt's last pieces decode to nothing on their own; after "Hello" they are spaces.
    tok, sp = llama
    prompt = [sp.PieceToId(p) for p in ["▁Hello", "▁", "▁", "▁", "▁"]]
    the = sp.PieceToId("▁the")
    expected = sp.DecodeIds(prompt + [the])[len(sp.DecodeIds(prompt)):]
    assert expected == " the"
    assert "".join(stream(tok.decoder([1] + prompt), [the])) == expected


def test_decoder_after_prompt_that_decodes_to_nothing(llama):
    # A lone "▁" is stripped as the start of the text; whether the next word shows its space is the
    # tokenizer's rule (OpenLLaMA v1: no, v2: yes), and the stream must follow it.
    tok, sp = llama
    space, the = sp.PieceToId("▁"), sp.PieceToId("▁the")
    assert sp.DecodeIds([space]) == ""
    assert "".join(stream(tok.decoder([1, space]), [the])) == sp.DecodeIds([space, the])


def test_streaming_spaces_after_the_first_word(llama):
    tok, sp = llama
    ids = [sp.PieceToId(p) for p in ["▁Hello", "▁", "▁", "▁the"]]
    assert "".join(stream(tok.decoder(), ids)) == sp.DecodeIds(ids) == "Hello   the"


def test_decoder_after_random_prompts_emits_the_continuation(llama):
    tok, sp = llama
    rng = random.Random(1)
    checked = 0
    for _ in range(300):
        ids = sp.EncodeAsIds(random_text(rng))
        split = rng.randrange(len(ids) + 1)
        full, prompt = sp.DecodeIds(ids), sp.DecodeIds(ids[:split])
        if not full.startswith(prompt):  # the split cut a byte-spelled character: no continuation text exists
            continue
        assert "".join(stream(tok.decoder([1] + ids[:split]), ids[split:])) == full[len(prompt):]
        checked += 1
    assert checked > 200


def test_streaming_random_ids_adds_up_to_decode(llama):
    # Generated ids need not spell valid text: stray bytes, lone "▁", specials anywhere.
    tok, sp = llama
    rng = random.Random(2)
    odd = [sp.PieceToId("▁"), sp.PieceToId("<0xE2>"), sp.PieceToId("<0x82>"), sp.PieceToId("<0xF0>"), 0, 1, 2]
    for _ in range(300):
        ids = [rng.choice(odd) if rng.random() < 0.4 else rng.randrange(32000) for _ in range(rng.randrange(20))]
        expected = sp.DecodeIds([i for i in ids if i not in (0, 1, 2)])
        assert "".join(stream(tok.decoder(), ids)) == expected, [sp.IdToPiece(i) for i in ids]


def test_streaming_window_stays_short(llama):
    tok, sp = llama
    ids = sp.EncodeAsIds(random_text(random.Random(3)) * 200)
    decoder = tok.decoder([1] + ids[:1000])
    longest = 0
    for i in ids:
        decoder.push(i)
        longest = max(longest, len(decoder.ids))
    assert longest <= 12


# --- training a tokenizer


def stdlib_sources(*modules) -> list[str]:
    return [Path(inspect.getsourcefile(module)).read_text(encoding="utf-8") for module in modules]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_sources(argparse, dataclasses, heapq, json.decoder, textwrap) + [CODE]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Tokenizer, Path]:
    path = tmp_path_factory.mktemp("trained") / "tok.model"
    return train_tokenizer(corpus, path, vocab_size=1000), path


ROUND_TRIP = [
    CODE,
    "",
    " ",
    "\n",
    "\n\n\n",
    "\t\t\tdeep tabs\t\n",
    "trailing spaces   \n   \n",
    "    indented first line",
    "Unseen characters: ß ø Ж ק 中文 🐍 🇫🇷 \u200b \ufffd \x00 \x0c",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_trained_tokenizer_round_trips_code_exactly(trained, text):
    tok, _ = trained
    assert tok.decode(tok.encode(text)) == text


def test_trained_tokenizer_round_trips_its_corpus_and_unseen_source(trained, corpus):
    tok, _ = trained
    for text in corpus + stdlib_sources(tokenize):
        assert tok.decode(tok.encode(text, eos=True)) == text


def test_trained_tokenizer_follows_llama_conventions(trained):
    tok, path = trained
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.vocab_size == sp.GetPieceSize() <= 1000


def test_trained_tokenizer_ids_are_in_range_and_never_unk(trained):
    tok, path = trained
    sp = spm.SentencePieceProcessor(model_file=str(path))
    for text in ROUND_TRIP:
        ids = sp.EncodeAsIds(text)
        assert tok.encode(text) == [1] + ids
        assert all(0 < i < tok.vocab_size for i in ids)


def test_trained_tokenizer_learns_indentation_pieces(trained):
    tok, path = trained
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.EncodeAsPieces("        return") == ["▁▁▁▁▁▁▁▁", "return"]


def test_training_is_deterministic(corpus, trained, tmp_path):
    _, first = trained
    second = train_tokenizer(corpus, tmp_path / "again.model", vocab_size=1000)
    assert (tmp_path / "again.model").read_bytes() == first.read_bytes()
    assert second.encode(CODE) == Tokenizer(first).encode(CODE)


def test_training_is_quiet(corpus, tmp_path, capfd):
    train_tokenizer(corpus[:1], tmp_path / "quiet.model", vocab_size=500)
    assert capfd.readouterr() == ("", "")


def test_streaming_with_trained_tokenizer_adds_up_to_decode(trained):
    tok, path = trained
    sp = spm.SentencePieceProcessor(model_file=str(path))
    rng = random.Random(4)
    for _ in range(200):
        ids = sp.EncodeAsIds(random_text(rng))
        assert "".join(stream(tok.decoder([1]), ids)) == sp.DecodeIds(ids)


@pytest.mark.parametrize("texts", [[], ["", "\n\n"]])
def test_training_without_text_raises_and_writes_nothing(tmp_path, texts):
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(texts, tmp_path / "tok.model")
    assert list(tmp_path.iterdir()) == []


def test_failed_training_keeps_the_previous_file(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        train_tokenizer(["some text"], path, vocab_size=5)  # fewer pieces than the 259 specials and bytes
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    path = tmp_path / "tok.model"
    path.write_bytes(b"previous")
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(["some text"], path, vocab_size=300)
    assert path.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [path]


def test_training_on_megabytes_of_stdlib_round_trips_its_files(tmp_path):
    # train.py's default run: the standard library's top-level modules, a few MB of Python.
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    assert sum(map(len, texts)) > 2_000_000
    tok = train_tokenizer(texts, tmp_path / "tok.model", vocab_size=4096)
    assert tok.vocab_size == 4096
    assert all(tok.decode(tok.encode(text)) == text for text in texts[:40])


# --- bad files


def bad_file_error(path) -> str:
    with pytest.raises(ValueError) as error:
        Tokenizer(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_file_is_a_one_line_error(tmp_path):
    bad_file_error(tmp_path / "missing.model")


def test_directory_is_a_one_line_error(tmp_path):
    bad_file_error(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a model\n", bytes(range(256)) * 4, b"\x08\x01"])
def test_non_sentencepiece_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    bad_file_error(path)
