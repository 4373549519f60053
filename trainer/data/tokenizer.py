"""Tokenizers: raw UTF-8 bytes, any Hugging Face tokenizer.json, or a byte-level BPE trained here.

All share one small interface (`Tokenizer`). `save(folder)` always writes a Hugging Face
`tokenizer.json` (and tokenizer_config.json) that `transformers.AutoTokenizer` loads. For the byte
tokenizer it is a byte-level BPE with no merges whose ids are the byte values, EOS 256: it encodes
and decodes exactly as ByteTokenizer, and `load_tokenizer` recognises it as the byte tokenizer.
Folders written before that hold a small marker `{"trainer_tokenizer": "byte"}`, still loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from trainer.files import make_temp_dir

from .cache import cache_write_error, default_cache_dir, writable_subdir
from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Names of end-of-text tokens in common tokenizer.json files, tried in this order.
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BYTE_MARKER = "byte"


class Tokenizer:
    """Interface. `fingerprint` changes whenever the text -> ids mapping could change."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_markup(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encodes text written for the model (a prompt, a rendered chat template): special-token
        strings in it become those tokens, and add_special_tokens adds what the tokenizer puts
        around a sequence (Llama's BOS). Tokenizers without special tokens encode it as text."""
        return self.encode(text)

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like encode_batch but numpy arrays: lets the packer skip Python int lists where it can."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, folder: str) -> None:
        raise NotImplementedError

    def special_token_ids(self) -> dict[str, int | None]:
        """bos/eos/pad token ids as a model's config.json and generation_config.json name them (None:
        the tokenizer has no such token), so that transformers' generate stops at this EOS."""
        return {"bos_token_id": None, "eos_token_id": self.eos_id, "pad_token_id": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _as_int_array(ids) -> np.ndarray:
    # Accepts lists, numpy arrays and CPU torch tensors alike.
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255, EOS is 256. Exact round trip for any text, no training."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        arr = _as_int_array(ids)
        # EOS and out-of-range ids (possible in untrained-model samples) are dropped, like HF's
        # skip_special_tokens; a cut multi-byte character decodes to U+FFFD instead of raising.
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        byte_level_tokenizer().save(os.path.join(folder, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": 2**30}
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=1)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, which Hugging Face's ByteLevel pre-tokenizer and
    decoder use (Radford et al. 2019, openai/gpt-2 src/encoder.py): printable Latin-1 bytes stand for
    themselves, the other 68 take the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_tokenizer():
    """ByteTokenizer as a `tokenizers.Tokenizer`: every byte one token whose id is its value, EOS 256."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _HF

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tok = _HF(models.BPE(vocab=vocab, merges=[]))
    # No regex split: without merges the pieces do not matter, and bytes map one to one.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def _is_byte_level_file(file: str) -> bool:
    """Is this tokenizer.json the one ByteTokenizer.save writes? (It is small; real BPE files are not.)"""
    if os.path.getsize(file) > 64 << 10:
        return False
    from tokenizers import Tokenizer as _HF

    try:
        return _HF.from_file(file).to_str() == byte_level_tokenizer().to_str()
    except Exception:  # not a tokenizer file at all: the caller's loader reports that
        return False


class HFTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer` (a tokenizer.json), which batches in Rust threads.

    `config` is the folder's tokenizer_config.json (its chat template, special token names), kept
    so that `save` hands it on to checkpoints and `transformers` still finds the template there.
    """

    def __init__(self, tok, eos_id: int, config: dict | None = None):
        self._tok = tok
        self.config = dict(config or {})
        # Documents are raw text: a literal "<|endoftext|>" inside one must stay text, not become a
        # fake document boundary.
        tok.encode_special_tokens = True
        self.eos_id = int(eos_id)
        # Max id + 1, not the reported size: some files have holes or added tokens past the end.
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        blob = tok.to_str().encode() + f"|eos={self.eos_id}|encode_special_tokens".encode()
        self.fingerprint = "hf-v1-" + hashlib.sha256(blob).hexdigest()

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template of tokenizer_config.json (its "default" one if it names several)."""
        template = self.config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def special_token(self, name: str) -> str | None:
        """A special token's text from tokenizer_config.json ("bos_token", ...), for chat templates."""
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    @classmethod
    def from_file(cls, path: str) -> HFTokenizer:
        """Load a tokenizer.json, given the file or its folder (with its tokenizer_config.json and
        chat_template.jinja when present)."""
        from tokenizers import Tokenizer as _HF

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(f"no tokenizer.json at {path!r}")
        try:
            tok = _HF.from_file(file)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise DataError(f"could not read {file} as a Hugging Face tokenizer.json: {e}") from None
        folder = os.path.dirname(file)
        config = {}
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            with open(os.path.join(folder, "tokenizer_config.json")) as f:
                config = json.load(f)
        if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # where transformers 5 writes it
            with open(os.path.join(folder, "chat_template.jinja")) as f:
                config["chat_template"] = f.read()
        return cls(tok, _find_eos(tok, config, file), config)

    def special_token_ids(self) -> dict[str, int | None]:
        def token_id(name: str) -> int | None:
            text = self.special_token(name)
            return self._tok.token_to_id(text) if text else None

        return {
            "bos_token_id": token_id("bos_token"),
            "eos_token_id": self.eos_id,
            "pad_token_id": token_id("pad_token"),
        }

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_markup(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # add_special_tokens=False: documents are joined with EOS by the packer, a post-processor's
        # BOS/EOS per document would double them. encode_batch_fast skips offset tracking.
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_int_array(ids).tolist(), skip_special_tokens=True)

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self._tok.save(os.path.join(folder, "tokenizer.json"))
        # Records which token is EOS, so loading does not depend on guessing names; the chat
        # template travels in the same file.
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({**config, "eos_token": self.eos_token}, f, indent=1)


def _find_eos(tok, config: dict, file: str) -> int:
    candidates = []
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str):
        candidates.append(eos)
    for name in candidates + list(EOS_NAMES):
        eos_id = tok.token_to_id(name)
        if eos_id is not None:
            return eos_id
    raise DataError(
        f"no end-of-text token in {file}: looked for tokenizer_config.json 'eos_token' and the tokens "
        f"{', '.join(EOS_NAMES)}; add one of them as a special token"
    )


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, length: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE (exact round trip for any text) with EOS "<|endoftext|>" as id 0."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"data.vocab_size must be at least 257 for a BPE tokenizer (256 bytes + EOS), got {vocab_size}")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Every byte in the vocabulary, whatever the corpus holds, so no text is ever unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return HFTokenizer(tok, tok.token_to_id(EOS_TOKEN))


def build_tokenizer(spec: str, sources=None, vocab_size: int = 4096, cache_dir: str | None = None) -> Tokenizer:
    """Return a tokenizer for `spec`:

    "byte"  -> ByteTokenizer;
    "bpe"   -> byte-level BPE trained on `sources` (a Corpus or a data path string; all its
               documents), cached under cache_dir/tokenizers by corpus hash + vocab_size;
    a path  -> a Hugging Face tokenizer.json (the file or its folder).
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return _cached_bpe(sources, vocab_size, cache_dir)
    if os.path.exists(os.path.expanduser(spec)):
        return load_tokenizer(os.path.expanduser(spec))
    raise DataError(
        f"unknown data.tokenizer {spec!r}: use 'byte', 'bpe', or a path to a folder holding a "
        "Hugging Face tokenizer.json (or to the file itself)"
    )


def load_tokenizer(folder: str) -> Tokenizer:
    """Load what `Tokenizer.save` wrote (or any HF tokenizer.json folder/file)."""
    file = os.path.join(folder, "tokenizer.json") if os.path.isdir(folder) else folder
    if not os.path.isfile(file):
        raise DataError(f"no tokenizer.json at {folder!r}")
    with open(file) as f:
        head = f.read(200)
    # The marker of older byte-tokenizer folders is tiny; HF files are large, so only sniff the start.
    if '"trainer_tokenizer"' in head:
        with open(file) as f:
            kind = json.load(f).get("trainer_tokenizer")
        if kind != BYTE_MARKER:
            raise DataError(f"{file}: unknown trainer tokenizer kind {kind!r}")
        return ByteTokenizer()
    if _is_byte_level_file(file):
        return ByteTokenizer()
    return HFTokenizer.from_file(file)


def _cached_bpe(sources, vocab_size: int, cache_dir: str | None) -> HFTokenizer:
    from .readers import corpus_documents
    from .sources import Corpus, resolve_corpus

    if sources is None:
        raise DataError("tokenizer='bpe' needs the training corpus (sources=...) to train on")
    corpus = sources if isinstance(sources, Corpus) else resolve_corpus(sources)
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    folder = os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{corpus.fingerprint[:20]}")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return HFTokenizer.from_file(folder)
    parent = writable_subdir(cache_dir, "tokenizers")  # before training: fail in a second, not after an hour

    def texts():
        for _, text, _ in corpus_documents(corpus):
            yield text

    tok = train_bpe(texts(), vocab_size)
    # Train once, publish atomically: a killed run leaves only a temp folder nobody reads.
    tmp = None
    try:
        tmp = make_temp_dir(parent, ".tmp-")
        tok.save(tmp)
        os.rename(tmp, folder)
    except OSError as e:
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise cache_write_error(parent, e) from None
        # Another process published the same tokenizer first; theirs is equally valid.
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return HFTokenizer.from_file(folder)
