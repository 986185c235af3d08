"""GGUF byte-level BPE pre-tokenizers (tokenizer.ggml.pre): a converted vocabulary tokenizes exactly as llama.cpp does.

tests/data/llama_cpp_token_ids.json holds the ids llama.cpp gave a set of texts (code, English, Cyrillic, Japanese,
emoji, ChatML tags, runs of whitespace, ...) under every pre-tokenizer name tokenizer.py supports, all on
SmolLM2-135M-Instruct's vocabulary (tests/data/smollm2_vocab.json.gz); its note and tests/data/record_llama_cpp_ids.py
say how they were recorded. llama.cpp itself is not needed here.
"""
import gzip
import json
from types import SimpleNamespace

import gguf
import pytest
import tokenizers

import convert_weights
import tokenizer
from conftest import TEST_DATA
from tokenizer import BPE_PRE_TOKENIZERS, NORMAL, bpe_tokenizer_json, bpe_vocabulary, open_tokenizer

RECORDED = json.loads((TEST_DATA / "llama_cpp_token_ids.json").read_text(encoding="utf-8"))
TEXTS, PROBE = RECORDED["texts"], RECORDED["probe"]
LLAMA_CPP = {name: group for group in RECORDED["recorded"] for name in group["names"]}


@pytest.fixture(scope="module")
def vocabulary() -> dict:
    with gzip.open(TEST_DATA / "smollm2_vocab.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


def without_specials(text: str, vocabulary: dict) -> str:
    """text as decode() gives it back: special tokens (SmolLM2's are all control tokens) are dropped."""
    for token, kind in zip(vocabulary["tokens"], vocabulary["token_type"]):
        if kind != NORMAL:
            text = text.replace(token, "")
    return text


def gguf_vocabulary(path, vocabulary: dict, pre: str):
    """A GGUF holding only tokenizer.ggml.*, as llama.cpp's converter writes SmolLM2's."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["token_type"])
    writer.add_token_merges(vocabulary["merges"])
    writer.add_bos_token_id(vocabulary["bos_token_id"])
    writer.add_eos_token_id(vocabulary["eos_token_id"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def converted_tokenizer(directory, vocabulary: dict, pre: str):
    """The tokenizer convert_weights rebuilds from a GGUF's vocabulary (tokenizer.json + tokenizer_config.json)."""
    directory.mkdir()
    gguf_vocabulary(directory / "vocabulary.gguf", vocabulary, pre)
    config = SimpleNamespace(vocab_size=len(vocabulary["tokens"]), bos_token_id=vocabulary["bos_token_id"],
                             eos_token_id=vocabulary["eos_token_id"])
    reader = gguf.GGUFReader(directory / "vocabulary.gguf")
    for name, data in convert_weights.gguf_tokenizer_files(reader, config, directory / "vocabulary.gguf").items():
        (directory / name).write_bytes(data)
    return open_tokenizer(directory / "tokenizer.json")


def probe_vocabulary(vocabulary: dict) -> dict:
    """SmolLM2's vocabulary less the merges building " capital", " France" and " Paris" (so that ignore_merges shows),
    with tokens of several digits and tokens joining a character to the whitespace after it added (so that how digits
    are grouped, and where whitespace is kept apart, show)."""
    added, dropped = [merge.replace(" ", "") for merge in PROBE["added_merges"]], set(PROBE["dropped_merges"])
    return {**vocabulary, "tokens": vocabulary["tokens"] + added,
            "token_type": vocabulary["token_type"] + [NORMAL] * len(added),
            "merges": [m for i, m in enumerate(vocabulary["merges"]) if i not in dropped] + PROBE["added_merges"]}


@pytest.fixture(scope="module")
def smollm2(vocabulary, tmp_path_factory):
    """SmolLM2's vocabulary converted with its own pre-tokenizer (smollm), and the probe vocabulary (llama-bpe)."""
    return SimpleNamespace(
        tokenizer=converted_tokenizer(tmp_path_factory.mktemp("smollm") / "ckpt", vocabulary, "smollm"),
        probe=converted_tokenizer(tmp_path_factory.mktemp("probe") / "ckpt", probe_vocabulary(vocabulary),
                                  "llama-bpe"))


def test_every_supported_pre_tokenizer_has_ids_recorded_from_llama_cpp():
    assert sorted(LLAMA_CPP) == sorted(BPE_PRE_TOKENIZERS)


def test_smollm2_gguf_vocabulary_converts_to_a_tokenizer_that_encodes_as_llama_cpp(smollm2, vocabulary):
    tok = smollm2.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    for text, ids in zip(TEXTS, LLAMA_CPP["smollm"]["ids"]):
        assert tok.encode(text, bos=False) == ids, text
        assert tok.decode(tok.encode(text)) == without_specials(text, vocabulary), text
    assert smollm2.probe.encode(PROBE["text"], bos=False) == LLAMA_CPP["llama-bpe"]["probe_ids"]  # converted too


def pre_tokenizer(name: str):
    """The pre-tokenizer and ignore_merges of the tokenizer.json bpe_tokenizer_json writes for this GGUF name."""
    spec = bpe_tokenizer_json(["a"], [NORMAL], [], name, "test")
    return tokenizers.Tokenizer.from_str(spec).pre_tokenizer, json.loads(spec)["model"]["ignore_merges"]


def test_every_supported_pre_tokenizer_encodes_as_llama_cpp(smollm2, vocabulary):
    """Each name's pre-tokenizer and ignore_merges, on the converted SmolLM2 vocabulary (swapped in: rebuilding
    49152 tokens for each of the names would be slow)."""
    tokenizers_ = {"ids": smollm2.tokenizer, "probe_ids": smollm2.probe}
    saved = {key: (tok.hf.pre_tokenizer, tok.hf.model.ignore_merges) for key, tok in tokenizers_.items()}
    try:
        for name in BPE_PRE_TOKENIZERS:
            for tok in tokenizers_.values():
                tok.hf.pre_tokenizer, tok.hf.model.ignore_merges = pre_tokenizer(name)
            recorded = LLAMA_CPP[name]
            for text, ids in zip(TEXTS, recorded["ids"]):
                assert smollm2.tokenizer.encode(text, bos=False) == ids, (name, text)
                assert smollm2.tokenizer.decode(ids) == without_specials(text, vocabulary), (name, text)
            assert smollm2.probe.encode(PROBE["text"], bos=False) == recorded["probe_ids"], name
    finally:
        for key, tok in tokenizers_.items():
            tok.hf.pre_tokenizer, tok.hf.model.ignore_merges = saved[key]


def test_the_probe_vocabulary_shows_ignore_merges_digit_groups_and_whitespace_kept_apart(vocabulary):
    """What the probe vocabulary makes visible in the ids, so that the test above checks it: it lacks the merges
    building " capital", " France" and " Paris", which llama.cpp then makes one token each only where the name's type
    sets ignore_merges (llama-bpe, not smaug-bpe, though both split text alike); its tokens of digits tell apart
    digits split one by one, in threes or not at all; and its tokens joining a character to the whitespace after it
    show where llama.cpp keeps the two in one word (never in DeepSeek's classes of characters, see tokenizer.py)."""
    whole_words = {vocabulary["tokens"].index(vocabulary["merges"][i].replace(" ", "", 1))
                   for i in PROBE["dropped_merges"]}
    assert len(whole_words) == 3
    for name, (_, ignore_merges) in BPE_PRE_TOKENIZERS.items():
        assert (whole_words <= set(LLAMA_CPP[name]["probe_ids"])) == ignore_merges, name
        assert not whole_words & set(LLAMA_CPP[name]["probe_ids"]) or ignore_merges, name
    added = {merge.replace(" ", ""): len(vocabulary["tokens"]) + i for i, merge in enumerate(PROBE["added_merges"])}
    digits = {name: [i for i in LLAMA_CPP[name]["probe_ids"] if i in (added["12"], added["34"], added["123"],
                                                                      added["45"])] for name in BPE_PRE_TOKENIZERS}
    assert digits["smollm"] == digits["qwen2"] == []  # 1 2 3 4 5, 1 2 3 4
    assert digits["llama-bpe"] == [added["123"], added["45"], added["123"]]  # 123 45, 123 4
    assert digits["gpt-2"] == digits["deepseek-llm"] == [added["12"], added["34"]] * 2  # 12 34 5, 12 34
    with_whitespace = {added[token] for token in ("äº¬ãĢĢ", "ãĢĤãĢĢ", "ªâĢĥ", "!ãĢĢ")}  # 京　 。　 阪  !　
    assert not with_whitespace & set(LLAMA_CPP["deepseek-llm"]["probe_ids"] + LLAMA_CPP["deepseek-coder"]["probe_ids"])
    assert with_whitespace & set(LLAMA_CPP["viking"]["probe_ids"])  # which splits at no CJK class


@pytest.mark.parametrize("name", ["kimi-k2", "gemma4", "superbpe", "no-such-thing"])
def test_a_pre_tokenizer_llama_cpp_splits_otherwise_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=rf"^model.gguf: BPE pre-tokenizer '{name}' is not supported "
                                         r"\(only llama-bpe, gpt-2, smollm, [^\n]* and llama.cpp's other names for "
                                         r"these\)$"):
        bpe_tokenizer_json(["a"], [NORMAL], [], name, "model.gguf")


def small_tokenizer_json(directory, pre_tokenizer: dict, ignore_merges: bool):
    """A tokenizer.json as Hugging Face writes one, with this pre-tokenizer (and a tokenizer_config.json)."""
    directory.mkdir()
    spec = json.loads(bpe_tokenizer_json(["<s>", "a", "b", "ab"], [3, NORMAL, NORMAL, NORMAL], ["a b"], "gpt-2", "x"))
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre_tokenizer, ignore_merges
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<s>"}))
    return open_tokenizer(directory / "tokenizer.json")


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def hf_spelling(regex: str) -> str:
    """regex as Llama-3's and Qwen2's tokenizer.json spell it, (?i:'s|'t|'re|'ve|'m|'ll|'d) for llama.cpp's
    (?:'[sS]|...)."""
    return regex.replace(tokenizer.CONTRACTIONS, "(?i:'s|'t|'re|'ve|'m|'ll|'d)")


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, name", [
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTES, "use_regex": True}]}, False, "smollm"),  # SmolLM2's own
    ({"type": "Sequence", "pretokenizers": [split(hf_spelling(tokenizer.LLAMA3_SPLIT)),
                                            BYTES]}, True, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [split(hf_spelling(tokenizer.LLAMA3_SPLIT)),
                                            BYTES]}, False, "smaug-bpe"),
    ({"type": "Sequence", "pretokenizers": [split(hf_spelling(tokenizer.QWEN2_SPLIT)),
                                            BYTES]}, False, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTES, "use_regex": True}]}, True, "smollm"),  # none exactly: alike
])
def test_a_tokenizer_json_is_written_to_gguf_under_the_name_llama_cpp_splits_it_by(tmp_path, pre_tokenizer,
                                                                                   ignore_merges, name):
    tok = small_tokenizer_json(tmp_path / "tok", pre_tokenizer, ignore_merges)
    assert bpe_vocabulary(tok)[3] == name


def test_a_tokenizer_json_no_llama_cpp_pre_tokenizer_splits_alike_is_refused(tmp_path):
    tok = small_tokenizer_json(tmp_path / "tok", {"type": "Whitespace"}, False)
    with pytest.raises(ValueError, match=r"only byte-level BPE splitting text as a llama.cpp pre-tokenizer does "
                                         r"\(llama-bpe, gpt-2, smollm, [^\n]*\) can be written to GGUF$"):
        bpe_vocabulary(tok)
