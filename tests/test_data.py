import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from trainer.data import (
    BlockLoader,
    ByteTokenizer,
    DataError,
    HFTokenizer,
    build_tokenizer,
    document_positions,
    eval_batches,
    load_tokenizer,
    make_batch,
    prepare_data,
    resolve_corpus,
    token_dtype,
    train_bpe,
)
from trainer.data import tokenizer as tokenizer_mod

UNICODE = "héllo wörld\n\tünïcödé 🙂🚀 \r\n中文字符 ‮ zero\u200bwidth \x00 end\n\n"
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "import os\nprint(os.getcwd())  # where am I?\n",
    "class Foo:\n    pass\n\n\nclass Bar(Foo):\n    x = 1\n",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    # Nothing may land in the home folder, whatever a test forgets to pass.
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "default_cache"))


def write_folder(root, files: dict):
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


def split_docs(tokens, eos):
    """Token stream -> list of documents (lists of ids), checking it ends with EOS."""
    tokens = np.asarray(tokens).tolist()
    assert tokens[-1] == eos
    docs, cur = [], []
    for t in tokens:
        if t == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eos_id]) == UNICODE  # EOS is not text
    assert tok.encode_batch([UNICODE, "", "a"]) == [ids, [], [97]]
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode(torch.tensor(ids)) == UNICODE


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS * 3, vocab_size=300)


def test_trained_bpe_round_trip(bpe):
    assert bpe.eos_id == 0 and bpe.vocab_size <= 300
    for text in CORPUS + [UNICODE, "  leading spaces\n\n\n", ""]:
        assert bpe.decode(bpe.encode(text)) == text
    # Merges learned: common corpus text compresses below one token per byte.
    assert len(bpe.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2
    assert bpe.encode_batch(CORPUS) == [bpe.encode(t) for t in CORPUS]
    # A literal EOS string inside a document is text, not a document boundary.
    tricky = "a <|endoftext|> b"
    assert bpe.eos_id not in bpe.encode(tricky) and bpe.decode(bpe.encode(tricky)) == tricky


def make_hf_folder(folder, special, config_eos=None):
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    if config_eos:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": config_eos}}))
    return tok


def test_hf_tokenizer_folder(tmp_path):
    raw = make_hf_folder(tmp_path / "hf", ["<pad>", "</s>"])
    tok = build_tokenizer(str(tmp_path / "hf"))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == raw.token_to_id("</s>") == 1
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    # The file itself works too, and gives the same tokenizer.
    assert build_tokenizer(str(tmp_path / "hf" / "tokenizer.json")).fingerprint == tok.fingerprint

    # tokenizer_config.json's eos_token wins over name guessing.
    make_hf_folder(tmp_path / "cfg", ["</s>", "<eos>"], config_eos="<eos>")
    assert build_tokenizer(str(tmp_path / "cfg")).eos_id == 1

    make_hf_folder(tmp_path / "noeos", ["<pad>"])
    with pytest.raises(DataError, match="no end-of-text token"):
        build_tokenizer(str(tmp_path / "noeos"))
    with pytest.raises(DataError, match="unknown data.tokenizer"):
        build_tokenizer("no/such/tokenizer")


def test_save_load_round_trip(tmp_path, bpe):
    for name, tok in [("byte", ByteTokenizer()), ("bpe", bpe)]:
        tok.save(str(tmp_path / name))
        assert (tmp_path / name / "tokenizer.json").is_file()
        loaded = load_tokenizer(str(tmp_path / name))
        assert type(loaded) is type(tok)
        assert (loaded.vocab_size, loaded.eos_id, loaded.fingerprint) == (tok.vocab_size, tok.eos_id, tok.fingerprint)
        for text in CORPUS + [UNICODE]:
            assert loaded.encode(text) == tok.encode(text)


def test_bpe_cached_by_corpus(tmp_path, monkeypatch):
    data = write_folder(tmp_path / "d", {f"{i}.txt": t for i, t in enumerate(CORPUS)})
    cache = str(tmp_path / "cache")
    first = build_tokenizer("bpe", str(data), vocab_size=300, cache_dir=cache)

    def no_training(*a, **k):
        raise AssertionError("BPE trained twice")

    monkeypatch.setattr(tokenizer_mod, "train_bpe", no_training)
    again = build_tokenizer("bpe", str(data), vocab_size=300, cache_dir=cache)
    assert again.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="trained twice"):  # a new vocab_size is a new tokenizer
        build_tokenizer("bpe", str(data), vocab_size=280, cache_dir=cache)


# ---------------------------------------------------------------- sources & packing


def test_sources_folder_glob_and_list(tmp_path):
    root = write_folder(
        tmp_path / "c",
        {
            "b.txt": "B",
            "a.md": "A",
            "sub/c.py": "C",
            ".hidden/x.txt": "X",
            "skip.bin": "S",
            "d.jsonl": '{"text": "D"}\n',
        },
    )
    names = [s.name for s in resolve_corpus(str(root)).sources]
    assert names == ["a.md", "b.txt", "d.jsonl", os.path.join("sub", "c.py")]
    glob_names = [s.name for s in resolve_corpus(str(root / "*.txt")).sources]
    assert glob_names == ["b.txt"]
    both = resolve_corpus(f"{root / 'a.md'},{root}/**/*.py,{root / 'a.md'}")  # overlaps count once
    assert sorted(s.name for s in both.sources) == ["a.md", os.path.join("sub", "c.py")]


def test_builtin_stdlib_corpus():
    corpus = resolve_corpus("builtin:python-stdlib")
    names = [s.name for s in corpus.sources]
    assert len(names) > 300 and names == sorted(names)
    assert all(n.endswith(".py") for n in names)
    assert not any(part in ("test", "tests", "site-packages", "idlelib") for n in names for part in n.split(os.sep))
    assert "os.py" in names


def test_packing_keeps_document_boundaries(tmp_path):
    docs = {"a.txt": "first doc\n", "b.txt": "second 🙂", "c.txt": "third"}
    root = write_folder(tmp_path / "c", docs)
    data = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(tmp_path / "cache"))
    assert data.val is None and data.n_documents == 3
    expected = []
    for name in sorted(docs):  # document order = sorted file order, each doc followed by one EOS
        expected += list(docs[name].encode()) + [256]
    assert data.train.tolist() == expected
    assert [data.tokenizer.decode(d) for d in split_docs(data.train, 256)] == [docs[n] for n in sorted(docs)]

    # position_ids restart after every EOS; document_ids step up exactly at each document start.
    batch = make_batch(data.train, [0, 1, 2], seq_len=9, document_ids=True, eos_id=256)
    for row, pos, doc in zip(batch["input_ids"], batch["position_ids"], batch["document_ids"]):
        p = d = 0
        for t in range(len(row)):
            if t > 0 and row[t - 1] == 256:
                p, d = 0, d + 1
            assert (pos[t].item(), doc[t].item()) == (p, d)
            p += 1
    assert batch["position_ids"].dtype == batch["document_ids"].dtype == torch.int64
    assert batch["input_ids"].shape == (3, 9)
    # prepare_data's streams know their EOS, so the loader needs no eos_id argument.
    (step,) = BlockLoader(data.train, 9, 3, 1, shuffle=False, document_ids=True).next_step()
    for k in batch:
        assert torch.equal(step[k], batch[k]), k


def test_document_positions_small_case():
    eos = 9
    ids = torch.tensor([[1, 2, eos, 3, eos, eos, 4, 5]])
    pos, doc = document_positions(ids, eos)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]


class WideVocab(ByteTokenizer):
    """Byte ids, but a vocabulary too big for uint16 (EOS id 70000)."""

    vocab_size = 70001
    eos_id = 70000
    fingerprint = "wide-test"


def test_token_dtype(tmp_path):
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    root = write_folder(tmp_path / "c", {"a.txt": "abc"})
    small = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(tmp_path / "cache"))
    wide = prepare_data(str(root), tokenizer=WideVocab(), val_fraction=0, cache_dir=str(tmp_path / "cache"))
    assert small.train.dtype == np.uint16 and wide.train.dtype == np.uint32
    assert wide.train.tolist() == [97, 98, 99, 70000]
    assert os.path.getsize(os.path.join(wide.cache_path, "train-00000.bin")) == 4 * 4
    assert small.cache_path != wide.cache_path


# ---------------------------------------------------------------- cache


def test_cache_hit_then_miss_on_change(tmp_path, monkeypatch, caplog):
    root = write_folder(tmp_path / "c", {f"{i}.txt": t for i, t in enumerate(CORPUS)})
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="trainer.data")
    first = prepare_data(str(root), tokenizer="bpe", vocab_size=300, val_fraction=0, cache_dir=cache)
    assert not first.from_cache and "tokenized" in caplog.text
    meta = json.loads(open(os.path.join(first.cache_path, "meta.json")).read())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["tokens"] == len(first.train)
    assert sum(s["tokens"] for s in meta["splits"]["train"]["shards"]) == len(first.train)
    assert meta["n_documents"] == 4 and meta["tokenizer"]["fingerprint"] == first.tokenizer.fingerprint
    assert [f[0] for f in meta["sources"]["files"]] == ["0.txt", "1.txt", "2.txt", "3.txt"]

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(HFTokenizer, "encode_batch", boom)
    monkeypatch.setattr(tokenizer_mod, "train_bpe", boom)
    caplog.clear()
    second = prepare_data(str(root), tokenizer="bpe", vocab_size=300, val_fraction=0, cache_dir=cache)
    assert second.from_cache and "used cache" in caplog.text
    assert second.cache_path == first.cache_path and np.array_equal(second.train, first.train)
    assert all(isinstance(m, np.memmap) and not m.flags.writeable for m in second.train.shards)

    # Same-size edit: a content hash notices what size+mtime might not.
    (root / "0.txt").write_text(CORPUS[0].replace("a + b", "b + a"))
    monkeypatch.undo()
    third = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=cache)
    fourth = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=cache)
    (root / "0.txt").write_text(CORPUS[0])
    fifth = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=cache)
    assert not third.from_cache and fourth.from_cache and not fifth.from_cache
    assert third.cache_path != fifth.cache_path
    assert bytes(third.train[:32].astype(np.uint8)) != bytes(fifth.train[:32].astype(np.uint8))


def test_saved_tokenizer_reuses_cache(tmp_path):
    # Evaluating a checkpoint: the tokenizer saved next to it finds the training run's cache entry.
    root = write_folder(tmp_path / "c", {f"{i}.txt": t for i, t in enumerate(CORPUS)})
    cache = str(tmp_path / "cache")
    for spec in ("byte", "bpe"):
        run = prepare_data(str(root), tokenizer=spec, vocab_size=300, val_fraction=0.3, cache_dir=cache)
        run.tokenizer.save(str(tmp_path / f"ckpt-{spec}"))
        again = prepare_data(str(root), tokenizer=str(tmp_path / f"ckpt-{spec}"), val_fraction=0.3, cache_dir=cache)
        assert again.from_cache and again.cache_path == run.cache_path and np.array_equal(again.val, run.val)


def test_cache_is_atomic(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "c", {"a.txt": "hello", "b.txt": "world"})
    cache = tmp_path / "cache"

    # A run killed mid-tokenization leaves nothing a later run trusts.
    def killed(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(ByteTokenizer, "encode_batch_arrays", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(cache))
    monkeypatch.undo()
    # Only dot-folders (the pieces of the unfinished run, its lock): no entry.
    assert [n for n in os.listdir(cache / "datasets") if not n.startswith(".")] == []

    # A leftover temp folder (e.g. from a SIGKILLed run) holding a plausible entry is ignored.
    good = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(cache))
    tmp = cache / "datasets" / ".tmp-leftover"
    shutil.copytree(good.cache_path, tmp)
    shutil.rmtree(good.cache_path)
    (tmp / "train.bin").write_bytes(b"\0\0" * good.meta["splits"]["train"]["tokens"])
    again = prepare_data(str(root), tokenizer="byte", val_fraction=0, cache_dir=str(cache))
    assert not again.from_cache and again.train.tolist() == list(b"hello") + [256] + list(b"world") + [256]
    assert tmp.is_dir()  # not stale yet: it could belong to a live run


# ---------------------------------------------------------------- validation split


def test_val_split_deterministic_and_disjoint(tmp_path):
    lines = [json.dumps({"text": f"document number {i}", "id": i}) for i in range(200)]
    root = tmp_path / "c"
    root.mkdir()
    (root / "docs.jsonl").write_text("\n".join(lines[:100]) + "\n\n" + "\n".join(lines[100:]) + "\n")
    a = prepare_data(str(root), tokenizer="byte", val_fraction=0.2, cache_dir=str(tmp_path / "c1"))
    # A copy elsewhere (fresh cache) splits identically: ids are relative names, hashes are stable.
    shutil.copytree(root, tmp_path / "moved")
    b = prepare_data(str(tmp_path / "moved"), tokenizer="byte", val_fraction=0.2, cache_dir=str(tmp_path / "c2"))
    assert not b.from_cache and np.array_equal(a.val, b.val) and np.array_equal(a.train, b.train)

    train = {a.tokenizer.decode(d) for d in split_docs(a.train, 256)}
    val = {a.tokenizer.decode(d) for d in split_docs(a.val, 256)}
    assert not train & val and train | val == {f"document number {i}" for i in range(200)}
    assert 15 <= len(val) <= 70 and a.n_documents == 200
    assert a.meta["splits"]["val"]["documents"] == len(val)


def test_split_hash_is_pinned():
    # Split membership must not depend on the process (Python's hash() is salted) or change
    # silently between versions: changing this formula needs a cache FORMAT_VERSION bump.
    from trainer.data.split import doc_unit

    assert doc_unit("docs.jsonl:1") == pytest.approx(0.614482108188737, abs=1e-12)
    assert doc_unit("a.txt") == pytest.approx(0.7853849123373798, abs=1e-12)


def test_val_split_never_empty(tmp_path):
    root = write_folder(tmp_path / "c", {"a.txt": "alpha", "b.txt": "beta"})
    data = prepare_data(str(root), tokenizer="byte", val_fraction=1e-9, cache_dir=str(tmp_path / "cache"))
    assert data.val is not None and len(split_docs(data.val, 256)) == 1 and len(split_docs(data.train, 256)) == 1
    single = write_folder(tmp_path / "s", {"a.txt": "alpha"})
    data = prepare_data(str(single), tokenizer="byte", val_fraction=0.5, cache_dir=str(tmp_path / "cache"))
    assert data.val is None and data.train.tolist() == list(b"alpha") + [256]


# ---------------------------------------------------------------- loader

SEQ = 8


def arange_tokens(n_blocks):
    # Token value = position in the stream, so every row says which block it came from.
    return np.arange(n_blocks * SEQ + 1, dtype=np.int64)


def block_of(row):
    return int(row[0]) // SEQ


def global_step_blocks(loaders):
    """One step from every rank of one layout: the block indices in rank, micro-batch, row order."""
    out = []
    for loader in loaders:
        for mb in loader.next_step():
            assert mb["input_ids"].shape == (loader.micro_batch_size, SEQ) and mb["input_ids"].dtype == torch.int64
            assert torch.equal(mb["labels"], mb["input_ids"] + 1)
            out += [block_of(r) for r in mb["input_ids"]]
    return out


def test_global_batch_is_layout_invariant():
    tokens = arange_tokens(50)
    layouts = {  # (micro_batch_size, grad_accum_steps, world_size): G = 4 in all
        "accum": (1, 4, 1),
        "dp": (2, 1, 2),
        "big": (4, 1, 1),
        "mixed": (1, 2, 2),
    }
    runs = {}
    for name, (mbs, accum, world) in layouts.items():
        loaders = [BlockLoader(tokens, SEQ, mbs, accum, world, rank, seed=3) for rank in range(world)]
        assert loaders[0].steps_per_epoch == 12
        runs[name] = [global_step_blocks(loaders) for _ in range(30)]  # crosses two epoch boundaries
    first = runs["accum"]
    for name, steps in runs.items():
        assert steps == first, name
    assert len(set(sum(first[:12], []))) == 48  # no block repeats within an epoch


def test_epochs_reshuffle_and_unshuffled_order():
    tokens = arange_tokens(20)
    loader = BlockLoader(tokens, SEQ, 2, 2, seed=0)
    assert (loader.blocks_per_epoch, loader.steps_per_epoch) == (20, 5)
    ep0 = [b for _ in range(5) for b in global_step_blocks([loader])]
    assert loader.epoch == 1
    ep1 = [b for _ in range(5) for b in global_step_blocks([loader])]
    assert sorted(ep0) == sorted(ep1) == list(range(20)) and ep0 != ep1
    other_seed = BlockLoader(tokens, SEQ, 2, 2, seed=1)
    assert [b for _ in range(5) for b in global_step_blocks([other_seed])] != ep0

    plain = BlockLoader(tokens, SEQ, 3, 1, shuffle=False)  # 20 blocks, 6 steps of 3, 2 dropped
    seen = [b for _ in range(7) for b in global_step_blocks([plain])]
    assert seen == list(range(18)) + [0, 1, 2]


@pytest.mark.parametrize("stop", [3, 6, 7, 11])
def test_resume_matches_uninterrupted(stop):
    tokens = arange_tokens(27)  # G=4: 6 steps per epoch, 3 blocks dropped
    ref = [BlockLoader(tokens, SEQ, 2, 1, 2, r, seed=7, document_ids=True, eos_id=5) for r in range(2)]
    resumed = [BlockLoader(tokens, SEQ, 2, 1, 2, r, seed=7, document_ids=True, eos_id=5) for r in range(2)]
    for _ in range(stop):
        for loader in resumed:
            loader.next_step()
    states = [json.loads(json.dumps(loader.state_dict())) for loader in resumed]  # must be JSON-able
    fresh = [BlockLoader(tokens, SEQ, 2, 1, 2, r, seed=99, document_ids=True, eos_id=5) for r in range(2)]
    for loader, state in zip(fresh, states):
        loader.load_state_dict(state)
    for _ in range(stop):
        for loader in ref:
            loader.next_step()
    for _ in range(8):  # spans the next epoch boundary
        for a, b in zip(ref, fresh):
            for mb_a, mb_b in zip(a.next_step(), b.next_step()):
                assert mb_a.keys() == mb_b.keys() == {"input_ids", "labels", "position_ids", "document_ids"}
                for k in mb_a:
                    assert torch.equal(mb_a[k], mb_b[k]), k
    assert fresh[0].state_dict() == ref[0].state_dict()


def test_resume_with_different_world_size_same_global_batch():
    tokens = arange_tokens(30)
    a = BlockLoader(tokens, SEQ, 4, 1, seed=2)
    for _ in range(5):
        a.next_step()
    b = [BlockLoader(tokens, SEQ, 1, 2, 2, r) for r in range(2)]
    for loader in b:
        loader.load_state_dict(a.state_dict())
    assert global_step_blocks(b) == global_step_blocks([a])


def test_eval_batches_in_order():
    tokens = arange_tokens(11)
    batches = list(eval_batches(tokens, SEQ, batch_size=4))
    assert [[block_of(r) for r in b["input_ids"]] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    ranks = [list(eval_batches(tokens, SEQ, batch_size=2, world_size=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # equal counts, or collectives would hang
    got = [[block_of(row) for row in b["input_ids"]] for step in zip(*ranks) for b in step]
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9]]
    assert len(list(eval_batches(tokens, SEQ, batch_size=2, max_batches=2))) == 2


# ---------------------------------------------------------------- errors


def test_errors_name_the_problem(tmp_path):
    from trainer.errors import TrainerError

    assert issubclass(DataError, ValueError) and issubclass(DataError, TrainerError)
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="matched no files") as e:
        prepare_data(missing, tokenizer="byte")
    assert missing in str(e.value) and "glob" in str(e.value)
    with pytest.raises(DataError, match="matched no files"):
        prepare_data(f"{write_folder(tmp_path / 'ok', {'a.txt': 'x'})},{missing}", tokenizer="byte")

    empty = write_folder(tmp_path / "empty", {"a.txt": "", "b.md": ""})
    with pytest.raises(DataError, match="empty corpus"):
        prepare_data(str(empty), tokenizer="byte")
    blank = write_folder(tmp_path / "blank", {"a.jsonl": '{"text": ""}\n\n'})
    with pytest.raises(DataError, match="empty corpus"):
        prepare_data(str(blank), tokenizer="byte")

    bad = write_folder(tmp_path / "bad", {"x.jsonl": '{"text": "fine"}\n\n{"body": "no text here"}\n'})
    with pytest.raises(DataError, match=r"x\.jsonl, line 3: no 'text' field") as e:
        prepare_data(str(bad), tokenizer="byte")
    assert "body" in str(e.value)
    body = write_folder(tmp_path / "body", {"x.jsonl": '{"body": "one"}\n{"body": "two"}\n'})
    assert prepare_data(str(body), tokenizer="byte", text_field="body", val_fraction=0).n_documents == 2
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        prepare_data(str(write_folder(tmp_path / "nojson", {"y.jsonl": "{oops\n"})), tokenizer="byte")

    with pytest.raises(DataError, match="val_fraction"):
        prepare_data(str(empty), tokenizer="byte", val_fraction=1.0)

    tokens = np.arange(20)
    with pytest.raises(DataError, match=r"20 tokens.*seq_len=32"):
        BlockLoader(tokens, 32, 1, 1)
    with pytest.raises(DataError, match=r"global batch of 8 blocks"):
        BlockLoader(tokens, 4, 2, 2, world_size=2, rank=1)  # 4 blocks only
    with pytest.raises(DataError, match=r"val split has 20 tokens"):
        list(eval_batches(tokens, 64, 2))
    with pytest.raises(DataError, match="eos_id"):
        BlockLoader(tokens, 4, 1, 1, document_ids=True)
    with pytest.raises(DataError, match="different data or seq_len"):
        BlockLoader(tokens, 2, 1, 1).load_state_dict(BlockLoader(tokens, 4, 1, 1).state_dict())
