"""Tokenizers for LongLLaMA and the Llama-3 family: SentencePiece or byte-level BPE behind one interface, a streaming
decoder, the two file formats rebuilt from vocabulary lists (GGUF), and training a small tokenizer.

    tok = checkpoint_tokenizer("ckpt/")        # its tokenizer.model (SentencePiece) or tokenizer.json (BPE)
    ids = tok.encode("def f():")               # BOS, then exactly the underlying tokenizer's ids
    text = tok.decode(ids)                     # bos/eos/pad (BPE: every special token) dropped
    stream = tok.decoder(prompt_ids)           # generate.py: .push(id) -> new text, .flush() at the end
    tok = train_tokenizer(texts, "tok.model")  # train.py's default run: a small BPE tokenizer for code
    text = utf8_text(data)                     # bytes read from a file or stdin, refused unless UTF-8 text
    template, bos, eos = read_chat_template("ckpt/tokenizer_config.json")   # a checkpoint's own chat template
    text = render_chat(template, [{"role": "user", "content": "Hi"}], bos, eos)

Thin wrappers: SentencePiece (LongLLaMA, LLaMA, Code Llama) and Hugging Face `tokenizers` (Llama-3's tokenizer.json,
imported only when one is opened) do the encoding; this file adds the LLaMA conventions (BOS in front), clean
one-line errors for bad files, a streaming decoder that never splits a character or loses a space, trainer
settings under which source code round-trips exactly, and chat templates rendered as Hugging Face renders them.
"""
import io
import json
import random
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm

from checkpoint import write_atomically

# A checkpoint's tokenizer is whichever of these files it has (looked for in this order), with the Hugging Face
# tokenizer_config.json beside it when there is one (BPE special tokens, chat template).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_file(ckpt_dir) -> Optional[Path]:
    """The checkpoint's tokenizer.model or tokenizer.json, or None."""
    return next((Path(ckpt_dir) / name for name in TOKENIZER_FILES if (Path(ckpt_dir) / name).is_file()), None)


def open_tokenizer(path) -> "Tokenizer":
    """A tokenizer file by its kind: tokenizer.json (or any .json) is BPE, anything else SentencePiece."""
    return BPETokenizer(path) if Path(path).suffix == ".json" else Tokenizer(path)


def checkpoint_tokenizer(ckpt_dir, override=None) -> "Tokenizer":
    """The tokenizer generate.py and train.py use: `override` (a --tokenizer flag) when given, else the checkpoint's."""
    path = override or tokenizer_file(ckpt_dir)
    if path is None:
        raise ValueError(f"{ckpt_dir} has no {' or '.join(TOKENIZER_FILES)} (pass --tokenizer PATH)")
    return open_tokenizer(path)


def check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tokenizer {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    return path


def files_of(path: Path, name: str) -> dict:
    """{checkpoint file name: path}: a tokenizer file and the tokenizer_config.json beside it, when there is one (it
    names BPE special tokens and holds the chat template)."""
    config = path.with_name(TOKENIZER_CONFIG)
    return {name: path, **({TOKENIZER_CONFIG: config} if config.is_file() else {})}


class Tokenizer:
    """A SentencePiece model with LLaMA's conventions; a bad file raises ValueError with a one-line message.

    BPETokenizer has the same interface: encode, decode, decoder, bos_id, eos_id, pad_id, vocab_size and `files`
    (checkpoint file name -> where it is read from, for copying the tokenizer into another checkpoint).
    """

    def __init__(self, path):
        path = check_file(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"tokenizer {path}: not a SentencePiece model ({err})") from None
        self.files = files_of(path, "tokenizer.model")
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA tokenizers have no pad piece; LLaMA checkpoints pad with 0 (<unk>).
        self.pad_id = max(self.sp.pad_id(), 0)
        self.vocab_size = self.sp.vocab_size()
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self._ids(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self._text([i for i in map(int, ids) if i not in self.special_ids])

    def decoder(self, prefix_ids: Iterable[int] = ()) -> "StreamDecoder":
        """An incremental decoder for text generated after prefix_ids (the prompt, which it does not emit)."""
        return StreamDecoder(self, prefix_ids)

    def _ids(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _text(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class BPETokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (Llama-3's byte-level BPE) with the same conventions as Tokenizer.

    tokenizer.json does not say which tokens are BOS and EOS: the tokenizer_config.json beside it does (bos_token,
    eos_token, and pad_token when there is one; without one, padding uses EOS, which decoding drops anyway).
    """

    def __init__(self, path):
        path = check_file(path)
        import tokenizers  # only checkpoints with a tokenizer.json need it

        try:
            self.hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise ValueError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({err})") from None
        self.files = files_of(path, "tokenizer.json")
        config_path = self.files.get(TOKENIZER_CONFIG, path.with_name(TOKENIZER_CONFIG))
        config = read_tokenizer_config(config_path) if config_path.is_file() else {}
        self.bos_id, self.eos_id = (self._special_id(config, name, config_path) for name in ("bos_token", "eos_token"))
        self.pad_id = self._special_id(config, "pad_token", config_path) if config.get("pad_token") else self.eos_id
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id}

    def _special_id(self, config: dict, name: str, config_path) -> int:
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token  # older configs write {"content": ...}
        token_id = self.hf.token_to_id(token) if isinstance(token, str) else None
        if token_id is None:
            raise ValueError(f"tokenizer {config_path}: {name} {token!r} is not a token of the tokenizer.json beside it"
                             if token else f"tokenizer {config_path}: no {name} (tokenizer.json needs it beside it)")
        return token_id

    def _ids(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids  # BOS/EOS are added by encode(), as for SentencePiece

    def _text(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def read_tokenizer_config(path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"tokenizer {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer {path}: expected a JSON object")
    return config


class StreamDecoder:
    """Turns generated ids into text one token at a time; everything pushed and flushed adds up to decode(ids).

    Decoding tokens one by one is wrong in two ways: SentencePiece drops the leading space of the text it
    decodes ("▁world" alone gives "world"), and a character spelled in bytes (SentencePiece's <0xE2><0x82><0xAC>,
    or byte-level BPE tokens holding part of a character) is broken until its last byte arrives. So, like the
    streaming detokenizers of TGI and vLLM, each step decodes a short window of recent ids twice, up to the read
    offset and up to the end, and emits the difference. The window then drops what lies before the old read
    offset, so a step costs O(1) whatever the text's length. New text that ends in U+FFFD, which is how an
    unfinished character decodes, is held back until the next token completes it (or flush() gives up).
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Iterable[int] = ()):
        self.tok = tokenizer
        prefix = [i for i in map(int, prefix_ids) if i not in tokenizer.special_ids]
        # SentencePiece strips leading "▁" only while it has decoded nothing visible. Once the text has begun,
        # the window is decoded behind an anchor piece ("a"), so that none of the window's spaces is stripped.
        self.at_start = not tokenizer.decode(prefix)
        self.anchor = tokenizer.encode("a", bos=False)
        self.anchor_text = tokenizer.decode(self.anchor)
        # The prompt's last token is context only (read, never emitted): a prompt that decodes to nothing can
        # still end in a "▁" which SentencePiece strips there but which shows once a word follows.
        self.ids = prefix[-1:]
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Adds one generated id; returns the text it completes, possibly ""."""
        token_id = int(token_id)
        if token_id in self.tok.special_ids:
            return ""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character comes out as U+FFFD, as decode() writes it)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        read_text = self._text(self.ids[: self.read])
        new_text = self._text(self.ids)[len(read_text):]
        # "": e.g. a lone leading "▁", which shows only once a word follows; U+FFFD: maybe an unfinished character
        if not new_text or (new_text.endswith("\ufffd") and not final):
            return ""
        self.at_start = False  # the read part of every later window holds visible text: stripping is over
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        return new_text

    def _text(self, ids: list[int]) -> str:
        if self.at_start:
            return self.tok.decode(ids)
        return self.tok.decode(self.anchor + ids)[len(self.anchor_text):]


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer files rebuilt from vocabulary lists (a GGUF file's tokenizer.ggml.* arrays) and read back into them

# SentencePiece piece types; GGUF's token types use the same numbers (llama.cpp copies them).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SENTENCEPIECE_BPE = 2  # TrainerSpec.model_type: LLaMA's tokenizers are BPE, not unigram


def sentencepiece_model(pieces: list, scores: list, types: list, bos_id: int, eos_id: int,
                        add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False) -> bytes:
    """A tokenizer.model (a SentencePiece ModelProto) holding these pieces, encoding as the original model did.

    Encoding reads the pieces with their scores and types, the model type (BPE), byte fallback (on when there are
    byte pieces), the special pieces, and the normalizer's two whitespace rules; training settings are left out.
    The text is the identity (no Unicode normalization), as in every LLaMA tokenizer. The few fields are written
    directly in protobuf's wire format (field numbers from SentencePiece's sentencepiece_model.proto), which needs
    no protobuf package.
    """
    unk_id = types.index(UNKNOWN) if UNKNOWN in types else 0
    trainer_spec = _protobuf(
        (3, SENTENCEPIECE_BPE), (4, len(pieces)), (35, BYTE in types),  # model_type, vocab_size, byte_fallback
        (40, unk_id), (41, bos_id), (42, eos_id), (43, -1),  # unk_id, bos_id, eos_id, pad_id (none)
        (45, pieces[unk_id]), (46, pieces[bos_id]), (47, pieces[eos_id]))  # unk_piece, bos_piece, eos_piece
    normalizer_spec = _protobuf((1, "identity"), (3, add_dummy_prefix), (4, remove_extra_whitespaces))
    return _protobuf(*[(1, _protobuf((1, piece), (2, float(score)), (3, kind)))  # ModelProto.pieces
                       for piece, score, kind in zip(pieces, scores, types)],
                     (2, trainer_spec), (3, normalizer_spec))


def _protobuf(*fields) -> bytes:
    """Protocol buffers' wire format of (field number, value) pairs: integers and booleans as varints, floats as
    32-bit floats, strings and bytes (nested messages too) as length-prefixed runs of bytes."""
    out = []
    for number, value in fields:
        if isinstance(value, float):
            out += [_varint(number << 3 | 5), struct.pack("<f", value)]
        elif isinstance(value, (str, bytes)):
            data = value.encode("utf-8") if isinstance(value, str) else value
            out += [_varint(number << 3 | 2), _varint(len(data)), data]
        else:
            out += [_varint(number << 3 | 0), _varint(int(value))]
    return b"".join(out)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 (pad_id -1) is written as its 64-bit two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def sentencepiece_vocabulary(tok: Tokenizer) -> tuple[list, list, list]:
    """The pieces, scores and types of a SentencePiece model, as llama.cpp's converter lists them for GGUF."""
    sp = tok.sp
    kinds = [(sp.IsUnknown, UNKNOWN), (sp.IsControl, CONTROL), (sp.IsUnused, UNUSED), (sp.IsByte, BYTE)]
    types = [next((kind for test, kind in kinds if test(i)), NORMAL) for i in range(tok.vocab_size)]
    return [sp.IdToPiece(i) for i in range(tok.vocab_size)], [sp.GetScore(i) for i in range(tok.vocab_size)], types


# Byte-level BPE pre-tokenizers by their GGUF name (tokenizer.ggml.pre), as tokenizer.json writes them, splitting text
# into the words llama.cpp splits it into (src/llama-vocab.cpp, llm_tokenizer_bpe): llama.cpp applies its type's
# regexes one after the other, each splitting every piece the one before left (matches and the text between them
# alike: a Split, "Isolated"), then spells each word's bytes as characters (ByteLevel). The regexes are llama.cpp's,
# which it reads as a Unicode regex engine (Hugging Face's) does: \s is Unicode whitespace, \p{L} and \p{N} Unicode
# letters and numbers. One exception, said where: a literal non-ASCII class never matches whitespace in llama.cpp
# (it turns non-ASCII whitespace into \v first), so such classes leave the whitespace characters out here.
# ignore_merges: a word found whole in the vocabulary is one token, for the types llama.cpp sets it for.
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"  # llama.cpp's spelling of (?i:'s|...|'d)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"  # llama.cpp's code adds |\s+
LLAMA3_SPLIT = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# DeepSeek's CJK class, [一-龥ࠀ-一가-퟿] in llama.cpp, without the whitespace in U+0800-U+4E00 (see above)
DEEPSEEK_CJK = ("[\u4e00-\u9fa5\u0800-\u167f\u1681-\u1fff\u200b-\u2027\u202a-\u202e\u2030-\u205e\u2060-\u2fff"
                "\u3001-\u4e00\uac00-\ud7ff]+")
DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d"
    "\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+")
DEEPSEEK3_SPLIT = (r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+'''
                   r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PORO_SPLIT = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _regexes(*regexes: str) -> dict:
    """A pre-tokenizer splitting with each regex in turn, then spelling bytes as characters."""
    return {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False} for regex in regexes),
        BYTE_LEVEL]}


# (GGUF names, the llama.cpp type each mirrors, pre-tokenizer, ignore_merges); the first name of each is the one
# written to GGUF for a tokenizer.json splitting that way
_BPE_PRE_TOKENIZERS = [
    (("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
      "glm4", "glm5"), "LLAMA3 (CHATGLM4 for glm4, glm5)", _regexes(LLAMA3_SPLIT), True),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "a.x-4.0", "mellum", "modern-bert", "jina-v1-en",
      "roberta-bpe", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
     "GPT2 (MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING)",
     {**BYTE_LEVEL, "use_regex": True}, False),  # GPT-2's regex (GPT2_SPLIT, then \s+) is ByteLevel's own
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"),
     "SMOLLM (STARCODER, REFACT, COMMAND_R, CODESHELL, EXAONE, MINERVA, MELLUM2)",  # \p{N}, then GPT-2's regex
     {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {**BYTE_LEVEL, "use_regex": True}]}, False),
    (("smaug-bpe", "dbrx", "chatglm-bpe"), "SMAUG (DBRX, CHATGLM4 for chatglm-bpe)", _regexes(LLAMA3_SPLIT), False),
    (("deepseek-llm",), "DEEPSEEK_LLM", _regexes(
        r"[\r\n]", DEEPSEEK_LETTERS,
        "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+",  # llama.cpp's 　-。 without U+3000
        r"\s+$", DEEPSEEK_CJK, r"\p{N}+"), False),
    (("deepseek-coder",), "DEEPSEEK_CODER", _regexes(r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", DEEPSEEK_CJK, r"\p{N}"),
     False),
    (("deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"), "DEEPSEEK3_LLM (HUNYUAN_DENSE, HY_V4, JOYAI_LLM)",
     _regexes(r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", DEEPSEEK3_SPLIT), False),
    (("spark2_5",), "SPARK2_5", _regexes(
        r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
        r'''[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+'''
        r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"), False),
    # words in any mix of cases: "((?=[\p{L}])([^a-z]))" is a letter other than a-z, "((?=[\p{L}])([^A-Z]))" one
    # other than A-Z (llama.cpp's spelling of the original's \p{Lu}... and \p{Ll}... classes)
    (("tekken",), "TEKKEN", _regexes(
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
        r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), True),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "GPT4O (MINIMAX_M2)", _regexes(
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTIONS +
        r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTIONS +
        r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), False),
    (("granite-embed-multi-97m",), "GRANITE_EMB_MULTI", _regexes(  # gpt-4o's, letters with marks
        r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + CONTRACTIONS +
        r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*" + CONTRACTIONS +
        r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), True),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open", "grok-2"),
     "QWEN2 (STABLELM2, HUNYUAN, SOLAR_OPEN, GROK_2)", _regexes(QWEN2_SPLIT), False),
    (("qwen35",), "QWEN35", _regexes(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
        r"|\s+"), False),
    (("seed-coder",), "SEED_CODER", _regexes(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"), False),
    (("viking",), "VIKING", _regexes(PORO_SPLIT, r"\p{N}"), False),
    (("poro-chat", "bloom", "gpt3-finnish"), "PORO (BLOOM, GPT3_FINNISH)", _regexes(PORO_SPLIT), False),
    (("jais-2",), "JAIS2", _regexes(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)"
        r"|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)"
        r"|\s{1}"), False),
    (("minicpm5",), "MINICPM5", _regexes(
        r"\p{N}{1,3}",
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), True),
    (("bailingmoe", "bailingmoe2", "llada-moe"), "BAILINGMOE", _regexes(
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+"), False),
    (("ufakzeka",), "UFAKZEKA", _regexes(
        r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), False),
    (("laguna",), "LAGUNA", _regexes(r"[^\n]+|[\n]+", QWEN2_SPLIT), False),
    (("exaone-moe",), "EXAONE_MOE", _regexes(
        CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+"), False),
    (("chameleon",), "CHAMELEON", _regexes(
        "<sentinel:[0-9]+>", "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]", GPT2_SPLIT + r"|\s+"), False),
    (("falcon",), "FALCON", _regexes(r"[\p{P}\$\+<=>\^~\|`]+", GPT2_SPLIT + r"|\s+", "[0-9][0-9][0-9]"), False),
    (("default",), "DEFAULT", _regexes(r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT + r"|\s+", r"\p{N}+", "[0-9][0-9][0-9]"),
     False),
]
# Refused: kimi-k2, afmoe, tiny_aya and cohere2moe (llama.cpp splits them with code of its own, not its regexes),
# superbpe (a regex matching only empty strings), youtu (llama.cpp reads its \p{Lu} and \p{Ll} as any letter),
# jina-v2-es, jina-v2-de, jina-v2-code (llama.cpp strips spaces before their <mask>), and gemma4,
# granite-embed-multi-311m, sarvam-moe, whitespace (not byte-level).
BPE_PRE_TOKENIZERS = {name: (pre_tokenizer, ignore_merges)
                      for names, _, pre_tokenizer, ignore_merges in _BPE_PRE_TOKENIZERS for name in names}
_NAMES = ", ".join(names[0] for names, *_ in _BPE_PRE_TOKENIZERS)  # for messages: each first name


def bpe_tokenizer_json(tokens: list, types: list, merges: list, pre: str, source) -> str:
    """A tokenizer.json for a byte-level BPE vocabulary: tokens in id order, their GGUF types (control and user-defined
    tokens become added tokens, matched before BPE), merges as "left right", and the pre-tokenizer's GGUF name."""
    if pre not in BPE_PRE_TOKENIZERS:
        raise ValueError(f"{source}: BPE pre-tokenizer {pre!r} is not supported (only {_NAMES} and llama.cpp's other "
                         "names for these)")
    pre_tokenizer, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": kind == CONTROL}
             for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": [m.split(" ") for m in merges]},
    }, ensure_ascii=False)


def bpe_vocabulary(tok: BPETokenizer) -> tuple[list, list, list, str]:
    """Tokens in id order, their GGUF types, merges ("left right") and the GGUF pre-tokenizer name of a tokenizer.json,
    as llama.cpp's converter lists them; a pre-tokenizer not in BPE_PRE_TOKENIZERS is refused."""
    path = tok.files["tokenizer.json"]
    spec = json.loads(path.read_text())
    splitting, ignore_merges = _splitting(spec.get("pre_tokenizer")), spec.get("model", {}).get("ignore_merges", False)
    names = [name for name, (pre_tokenizer, _) in BPE_PRE_TOKENIZERS.items() if _splitting(pre_tokenizer) == splitting]
    # the name llama.cpp tokenizes with exactly as this file does, else the first splitting text the same way
    pre = next((name for name in names if BPE_PRE_TOKENIZERS[name][1] == ignore_merges), next(iter(names), None))
    if pre is None or spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"tokenizer {path}: only byte-level BPE splitting text as a llama.cpp pre-tokenizer does "
                         f"({_NAMES}) can be written to GGUF")
    vocab = {i: token for token, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    added = tok.hf.get_added_tokens_decoder()  # id -> AddedToken
    ids = range(max(vocab) + 1)  # an id no token has becomes "[PADi]", unused, as llama.cpp fills it
    types = [UNUSED if i not in vocab else NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED
             for i in ids]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return [vocab.get(i, f"[PAD{i}]") for i in ids], types, merges, pre


def _splitting(pre_tokenizer):
    """A pre-tokenizer's settings that decide where text splits (trim_offsets only moves the reported offsets), with
    Llama-3's (?i:'s|...|'d) as llama.cpp spells it."""
    if isinstance(pre_tokenizer, dict):
        return {key: _splitting(value) for key, value in pre_tokenizer.items() if key != "trim_offsets"}
    if isinstance(pre_tokenizer, list):
        return [_splitting(value) for value in pre_tokenizer]
    if isinstance(pre_tokenizer, str):
        return pre_tokenizer.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", CONTRACTIONS)
    return pre_tokenizer


def utf8_text(data: bytes) -> str:
    """data as text; raises UnicodeDecodeError unless it is UTF-8 text. A NUL byte counts as binary: UTF-8 allows
    it, but no text file holds one, while most binary files do."""
    if b"\0" in data:
        at = data.index(b"\0")
        raise UnicodeDecodeError("utf-8", data, at, at + 1, "binary data (a NUL byte)")
    return data.decode("utf-8")


# The fewest pieces a tokenizer trained here can have: 256 byte pieces (byte fallback), <unk>, <s> and </s>.
MIN_VOCAB_SIZE = 259


def train_tokenizer(
    texts: Iterable[str], out_path, vocab_size: int = 4096, max_lines: int = 500_000, seed: int = 0
) -> Tokenizer:
    """Trains a byte-fallback BPE SentencePiece model on documents, writes it to out_path, returns it loaded.

    SentencePiece trains on "sentences" of at most 4192 bytes and skips longer ones, which would drop most
    source files whole, so documents are cut into lines; "\\n" is then never learned and encodes as the byte
    piece <0x0A>, as in LLaMA. At most max_lines lines, sampled uniformly with the given seed, are trained on,
    which bounds time and memory. vocab_size is an upper bound: a corpus too small for it gives fewer pieces
    (read Tokenizer.vocab_size).
    """
    if isinstance(texts, str):
        raise TypeError("train_tokenizer takes an iterable of documents, not one string")
    out_path = Path(out_path)
    lines = _sample_lines(texts, max_lines, seed)
    if not lines:
        raise ValueError(f"cannot train tokenizer {out_path}: no text to train on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            # LLaMA's special ids, and byte pieces so that any text encodes without <unk>.
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            byte_fallback=True,
            split_digits=True,
            # Exact round trip of code: no Unicode normalization, no collapsing of runs of spaces, no dummy
            # "▁" in front (lines start after a "\n", not after a space, so training must see them bare).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # indentation: "▁▁▁▁" and "▁▁▁▁▁▁▁▁" as single pieces
            minloglevel=2,  # errors only: SentencePiece logs every training step otherwise
        )
    except RuntimeError as err:
        raise ValueError(f"cannot train tokenizer {out_path}: {err}") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically({out_path: lambda tmp: tmp.write_bytes(model.getvalue())})
    return Tokenizer(out_path)


def _sample_lines(texts: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """The non-empty lines of texts in order, or a uniform sample of max_lines of them (reservoir sampling)."""
    rng = random.Random(seed)
    sample, seen = [], 0
    for text in texts:
        for line in text.split("\n"):
            if not line:
                continue
            seen += 1
            if len(sample) < max_lines:
                sample.append(line)
            elif (slot := rng.randrange(seen)) < max_lines:
                sample[slot] = line
    return sample


# ----------------------------------------------------------------------------------------------------------------------
# Chat templates: the Jinja template a checkpoint's tokenizer_config.json carries, rendered as Hugging Face does


def encode_with_specials(tokenizer, text: str, specials: tuple) -> list[int]:
    """Token ids of text in which the special tokens' texts ((text, id) pairs: what a chat template writes for its
    bos_token and eos_token) stand for those tokens, not for the pieces of their letters."""
    if not specials:
        return tokenizer.encode(text, bos=False)
    special_ids = dict(specials)
    ids = []
    pattern = "(" + "|".join(map(re.escape, special_ids)) + ")"  # the group keeps each special as a part
    for part in re.split(pattern, text):
        ids += [special_ids[part]] if part in special_ids else tokenizer.encode(part, bos=False) if part else []
    return ids


def read_chat_template(path) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) of a Hugging Face tokenizer_config.json; ValueError when it has none."""
    config = read_tokenizer_config(path)
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one is for plain conversations
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        raise ValueError(f"{path} has no chat_template")
    return template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: its text, or {"content": text, ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def render_chat(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """messages ([{"role": ..., "content": ...}]) as the chat template writes them, then (add_generation_prompt) the
    opening of the assistant's turn.

    Rendered as Hugging Face's apply_chat_template does: a sandboxed environment (templates come with downloaded
    checkpoints, so they must not reach Python objects), blocks trimmed, `raise_exception(message)` for templates that
    refuse a conversation. jinja2 is imported only here: nothing else needs it.
    """
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need jinja2: python -m pip install jinja2") from None

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                         add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template is a program from a downloaded file: whatever it raises is bad input
        raise ValueError(f"chat template: {e}") from None
