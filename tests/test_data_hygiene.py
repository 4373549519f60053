"""Defects users reported in the data area: binary and non-UTF-8 files, the byte tokenizer's saved file,
unusable cache folders, and error messages that name config keys as the config spells them."""

import errno
import logging
import os
import random
import sys
import tempfile

import numpy as np
import pytest

from trainer.data import BlockLoader, ByteTokenizer, DataError, eval_batches, load_tokenizer, prepare_data, train_bpe
from trainer.data import cache as cache_mod

UNICODE = "héllo wörld\n\tünïcödé 🙂🚀 \r\n中文字符 ‮ zero\u200bwidth \x00 end\n\n"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "default_cache"))


def elf_bytes() -> bytes:
    """The start of a real ELF executable (this Python), else a hand-made ELF header."""
    with open(os.path.realpath(sys.executable), "rb") as f:
        head = f.read(64 << 10)
    if head.startswith(b"\x7fELF"):
        return head
    return b"\x7fELF\x02\x01\x01" + bytes(9) + random.Random(0).randbytes(4096)


# ---------------------------------------------------------------- corpus hygiene


def test_binary_files_are_skipped_and_latin1_counted(tmp_path, caplog):
    root = tmp_path / "c"
    root.mkdir()
    (root / "notes.md").write_bytes(elf_bytes())  # an executable renamed .md
    (root / "blob.txt").write_bytes(random.Random(1).randbytes(5000))
    latin = "Un café, une crème brûlée et un gâteau à la française.\n"
    (root / "latin1.txt").write_bytes(latin.encode("latin-1"))
    (root / "good.py").write_text("print('hello')\n")
    caplog.set_level(logging.INFO, logger="trainer.data")
    data = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(tmp_path / "cache"))

    # Only the two text files are tokenized, Latin-1 bytes replaced as Python's own decoder replaces them.
    replaced = latin.encode("latin-1").decode("utf-8", errors="replace")
    expected = list(b"print('hello')\n") + [256] + list(replaced.encode()) + [256]
    assert data.train.tolist() == expected
    n_bad = replaced.count("\ufffd")
    assert n_bad == 7
    (summary,) = [r for r in caplog.records if r.getMessage().startswith("tokenized")]
    line = summary.getMessage()
    assert summary.levelno == logging.WARNING
    assert "skipped 2 file(s) that look binary (blob.txt, notes.md)" in line
    assert f"replaced {n_bad} invalid UTF-8 sequence(s) with U+FFFD in 1 document(s)" in line

    # Said again when the cache is used, since that run trains on the same data.
    caplog.clear()
    again = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(tmp_path / "cache"))
    assert again.from_cache and "look binary (blob.txt, notes.md)" in caplog.text

    # A corpus of nothing but binary files is an empty corpus, and says why.
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "a.txt").write_bytes(elf_bytes())
    with pytest.raises(DataError, match=r"empty corpus.*1 more look binary and were skipped"):
        prepare_data(str(only_binary), tokenizer="byte", cache_dir=str(tmp_path / "cache"))


def test_a_folder_of_extensionless_text_files_is_read_and_an_extensionless_executable_skipped(tmp_path):
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    texts = {"MIT": "Permission is hereby granted, free of charge.\n", "GPL-3.0": "GNU GENERAL PUBLIC LICENSE\n"}
    for name, text in texts.items():
        (licenses / name).write_text(text)
    (licenses / "run").write_bytes(elf_bytes())  # an executable: no extension either
    (licenses / "data.json").write_text('{"not": "a document"}')  # an extension we do not read
    data = prepare_data(str(licenses), tokenizer="byte", val_fraction=0, cache_dir=str(tmp_path / "cache"))
    expected = [t for name in sorted(texts) for t in [*texts[name].encode(), 256]]
    assert data.train.tolist() == expected and data.n_documents == 2


def test_bpe_training_skips_binary_files(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "code.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    data = prepare_data(str(root), tokenizer="bpe", vocab_size=300, val_fraction=0, cache_dir=str(tmp_path / "c1"))
    (root / "x.md").write_bytes(elf_bytes())
    with_binary = prepare_data(
        str(root), tokenizer="bpe", vocab_size=300, val_fraction=0, cache_dir=str(tmp_path / "c2")
    )
    # The same tokenizer learned: the binary file never reached the trainer.
    assert with_binary.tokenizer._tok.get_vocab() == data.tokenizer._tok.get_vocab()
    assert np.array_equal(np.asarray(with_binary.train), np.asarray(data.train))


# ---------------------------------------------------------------- the byte tokenizer's saved file


def test_byte_tokenizer_folder_loads_with_transformers(tmp_path):
    from transformers import AutoTokenizer

    ours = ByteTokenizer()
    ours.save(str(tmp_path / "tok"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.eos_token_id == ours.eos_id == 256 and len(hf) == ours.vocab_size
    texts = [UNICODE, "", "plain ascii", "a <|endoftext|> inside", "\r\n\t ", "🙂" * 3]
    for text in texts[:3] + texts[4:]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text)
        assert hf.decode(ids) == ours.decode(ids) == text
    assert hf(texts[3], add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(texts[3])
    # Invalid UTF-8 and EOS decode alike too.
    ids = [0xC3, 65, 0xE2, 0x82, 66, 0xFF, 256, 67]
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)

    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert type(loaded) is ByteTokenizer and loaded.fingerprint == ours.fingerprint
    # Folders saved before this change (a marker file) still load as the byte tokenizer.
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.json").write_text('{"trainer_tokenizer": "byte", "version": 1, "vocab_size": 257, "eos_id": 256}')
    assert type(load_tokenizer(str(old))) is ByteTokenizer


def test_a_real_bpe_folder_is_not_taken_for_the_byte_tokenizer(tmp_path):
    tok = train_bpe(["some text to learn from " * 10], vocab_size=280)
    tok.save(str(tmp_path / "bpe"))
    assert type(load_tokenizer(str(tmp_path / "bpe"))).__name__ == "HFTokenizer"


# ---------------------------------------------------------------- unusable cache folders


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("precious")
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(a_file))
    for kwargs in ({}, {"cache_dir": str(a_file)}):
        with pytest.raises(DataError) as e:
            prepare_data(str(root), tokenizer="byte", **kwargs)
        message = str(e.value)
        assert f"cache folder {a_file} is a file, not a folder" in message
        assert "data.cache_dir" in message and "TRAINER_CACHE_DIR" in message and "\n" not in message
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare_data(str(root), tokenizer="bpe", vocab_size=300)
    assert a_file.read_text() == "precious"  # nothing the user had is touched
    below = tmp_path / "not_a_folder" / "sub"
    with pytest.raises(DataError, match=r"cache folder .*not_a_folder is a file"):
        prepare_data(str(root), tokenizer="byte", cache_dir=str(below))


def test_cache_dir_not_writable(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    else:  # root writes anywhere: make the folder refuse as a read-only one would
        real_mkdtemp = tempfile.mkdtemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and str(dir).startswith(str(locked)):
                raise PermissionError(errno.EACCES, "Permission denied", dir)
            return real_mkdtemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    try:
        for tokenizer in ("byte", "bpe"):
            with pytest.raises(DataError) as e:
                prepare_data(str(root), tokenizer=tokenizer, vocab_size=300, cache_dir=str(locked))
            message = str(e.value)
            assert f"cache folder {locked}" in message and "is not writable (permission denied)" in message
            assert "set data.cache_dir (or the TRAINER_CACHE_DIR environment variable)" in message
    finally:
        locked.chmod(0o700)


def test_read_only_cache_still_serves_hits(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    cache = str(tmp_path / "shared")
    first = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=cache)

    def no_writes(*a, **k):
        raise AssertionError("a cache hit must not need write access")

    monkeypatch.setattr(cache_mod, "writable_subdir", no_writes)
    again = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=cache)
    assert again.from_cache and again.train.tolist() == first.train.tolist()


# ---------------------------------------------------------------- messages name config keys as spelled


def test_messages_name_config_keys(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "x.jsonl").write_text('{"body": "no text here"}\n')
    with pytest.raises(DataError, match=r"set data\.text_field to the key"):
        prepare_data(str(root), tokenizer="byte")
    with pytest.raises(DataError, match=r"data\.val_fraction must be in \[0, 1\)"):
        prepare_data(str(root), tokenizer="byte", val_fraction=2)
    with pytest.raises(DataError, match=r"unknown data\.tokenizer 'nope'"):
        prepare_data(str(root), tokenizer="nope")
    with pytest.raises(DataError, match=r"data\.vocab_size must be at least 257"):
        train_bpe(["x"], vocab_size=100)
    with pytest.raises(DataError, match=r"data\.path entry '.*missing' matched no files"):
        prepare_data(str(tmp_path / "missing"), tokenizer="byte")
    with pytest.raises(DataError, match=r"data\.num_workers must be a non-negative integer"):
        prepare_data(str(root), tokenizer="byte", num_workers=-1)
    tokens = np.arange(40)
    with pytest.raises(DataError, match=r"use a smaller train\.seq_len, more data, or a larger data\.val_fraction"):
        list(eval_batches(tokens, 64, 2))
    with pytest.raises(DataError, match=r"smaller train\.micro_batch_size, train\.grad_accum_steps or train\.seq_len"):
        BlockLoader(tokens, 4, 8, 2)
