"""SentencePiece tokenizer for LongLLaMA: encode/decode, streaming decode, and training a small tokenizer.

    tok = Tokenizer("tokenizer.model")        # a checkpoint's tokenizer (OpenLLaMA v1/v2 for LongLLaMA-3B)
    ids = tok.encode("def f():")               # BOS, then exactly SentencePiece's ids
    text = tok.decode(ids)                     # bos/eos/pad dropped
    stream = tok.decoder(prompt_ids)           # generate.py: .push(id) -> new text, .flush() at the end
    tok = train_tokenizer(texts, "tok.model")  # train.py's default run: a small BPE tokenizer for code
    text = utf8_text(data)                     # bytes read from a file or stdin, refused unless UTF-8 text
    template, bos, eos = read_chat_template("ckpt/tokenizer_config.json")   # a checkpoint's own chat template
    text = render_chat(template, [{"role": "user", "content": "Hi"}], bos, eos)

A thin wrapper: SentencePiece does the encoding, this file adds the LLaMA conventions (BOS in front, pad 0),
clean one-line errors for bad files, a streaming decoder that never splits a character or loses a space,
trainer settings under which source code round-trips exactly, and chat templates rendered as Hugging Face does.
"""
import codecs
import io
import json
import random
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from longllama import write_atomically


class Tokenizer:
    """A SentencePiece model with LLaMA's conventions; a bad file raises ValueError with a one-line message."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer {path}: {'is a directory' if path.is_dir() else 'no such file'}")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise ValueError(f"tokenizer {path}: not a SentencePiece model ({err})") from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # LLaMA tokenizers have no pad piece; LLaMA checkpoints pad with 0 (<unk>).
        self.pad_id = max(self.sp.pad_id(), 0)
        self.vocab_size = self.sp.vocab_size()
        self.special_ids = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in map(int, ids) if i not in self.special_ids])

    def decoder(self, prefix_ids: Iterable[int] = ()) -> "StreamDecoder":
        """An incremental decoder for text generated after prefix_ids (the prompt, which it does not emit)."""
        return StreamDecoder(self, prefix_ids)


class StreamDecoder:
    """Turns generated ids into text one token at a time; everything pushed and flushed adds up to decode(ids).

    Decoding tokens one by one is wrong in two ways: SentencePiece drops the leading space of the text it
    decodes ("▁world" alone gives "world"), and a character spelled as byte pieces (<0xE2><0x82><0xAC>) is
    broken until its last byte arrives. So, like the streaming detokenizers of TGI and vLLM, each step decodes
    a short window of recent ids twice, up to the read offset and up to the end, and emits the difference. The
    window then drops what lies before the old read offset, so a step costs O(1) whatever the text's length.
    Text that ends inside a byte-spelled character is held back until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Iterable[int] = ()):
        self.tok = tokenizer
        self.sp = tokenizer.sp
        prefix = [i for i in map(int, prefix_ids) if i not in tokenizer.special_ids]
        # SentencePiece strips leading "▁" only while it has decoded nothing visible. Once the text has begun,
        # the window is decoded behind an anchor piece ("a"), so that none of the window's spaces is stripped.
        self.at_start = not tokenizer.decode(prefix)
        self.anchor = self.sp.encode("a")
        self.anchor_text = self.sp.decode(self.anchor)
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
        if self._ends_inside_character():
            return ""
        return self._advance()

    def flush(self) -> str:
        """The text still held back (an unfinished character comes out as U+FFFD, as decode() writes it)."""
        return self._advance()

    def _advance(self) -> str:
        read_text = self._text(self.ids[: self.read])
        new_text = self._text(self.ids)[len(read_text):]
        if not new_text:  # e.g. a lone leading "▁", which shows only once a word follows
            return ""
        self.at_start = False  # the read part of every later window holds visible text: stripping is over
        self.ids = self.ids[self.read:]
        self.read = len(self.ids)
        return new_text

    def _text(self, ids: list[int]) -> str:
        if self.at_start:
            return self.sp.decode(ids)
        return self.sp.decode(self.anchor + ids)[len(self.anchor_text):]

    def _ends_inside_character(self) -> bool:
        # A UTF-8 character is at most 4 bytes, so only the last 3 byte pieces can be an unfinished one.
        tail = []
        for token_id in reversed(self.ids[-3:]):
            if not self.sp.IsByte(token_id):
                break
            tail.insert(0, int(self.sp.IdToPiece(token_id)[1:-1], 16))  # "<0xE2>" -> 0xE2
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        utf8.decode(bytes(tail))
        return utf8.getstate()[0] != b""  # bytes still waiting for the rest of their character


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


def read_chat_template(path) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) of a Hugging Face tokenizer_config.json; ValueError when it has none."""
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read a chat template ({e})") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
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
