"""Parallel tokenization: the same tokens whatever the worker count, bounded shards, and a killed run resumed."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.data import BlockLoader, DataError, prepare_data, resolve_corpus
from trainer.data import pieces as pieces_mod
from trainer.data import shards as shards_mod
from trainer.data import sources as sources_mod
from trainer.data import workers as workers_mod
from trainer.data.pieces import plan_pieces
from trainer.data.readers import corpus_documents
from trainer.data.tokenizer import train_bpe


@pytest.fixture(autouse=True)
def _small_pieces(tmp_path, monkeypatch):
    # Pieces of a few KB so a small corpus gives dozens of them (forked workers inherit these values).
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "default_cache"))
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 4096)
    monkeypatch.setattr(sources_mod, "JSONL_SPLIT_BYTES", 3000)
    monkeypatch.setattr(sources_mod, "HASH_CHUNK", 1024)


def texts_of(n, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "model", "learns", "tökens", "🙂", "return x", "\n", "données", "数据"]
    return [f"{seed}.{i} " + " ".join(rng.choice(words, size=int(rng.integers(0, 80)))) for i in range(n)]


@pytest.fixture
def corpus(tmp_path):
    """Every kind of source at once: text files, plain and gzip jsonl, parquet with several row groups."""
    root = tmp_path / "corpus"
    (root / "txt").mkdir(parents=True)
    for i, t in enumerate(texts_of(30, 1)):
        (root / "txt" / f"{i:02d}.txt").write_text(t)
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts_of(400, 2)))
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts_of(150, 3))
    pq.write_table(pa.table({"text": texts_of(300, 4)}), root / "c.parquet", row_group_size=25)
    return root


def run(corpus, cache, workers, tokenizer="byte", val_fraction=0.05):
    return prepare_data(
        str(corpus), tokenizer=tokenizer, val_fraction=val_fraction, cache_dir=str(cache), num_workers=workers
    )


def test_same_tokens_whatever_the_worker_count(corpus, tmp_path):
    assert len(plan_pieces(resolve_corpus(str(corpus)))) > 20
    runs = {w: run(corpus, tmp_path / f"cache{w}", w) for w in (1, 2, 3)}
    base = runs[1]
    assert base.val is not None and len(base.val) > 0
    for w, data in runs.items():
        assert not data.from_cache
        assert np.array_equal(np.asarray(data.train), np.asarray(base.train)), w
        assert np.array_equal(np.asarray(data.val), np.asarray(base.val)), w
        assert data.meta["n_documents"] == base.meta["n_documents"] == 880
        assert data.cache_path.endswith(os.path.basename(base.cache_path))  # the worker count is not in the key


def test_parallel_bpe_matches_the_tokenizers_library(corpus, tmp_path):
    tok = train_bpe(texts_of(200, 9), vocab_size=400)
    data = run(corpus, tmp_path / "cache", 3, tokenizer=tok, val_fraction=0)
    # Expected: each document encoded by `tokenizers` itself, in corpus order, each followed by EOS.
    docs = [text for _, text, _ in corpus_documents(resolve_corpus(str(corpus)))]
    expected = []
    for encoding in tok._tok.encode_batch(docs, add_special_tokens=False):
        expected += encoding.ids + [tok.eos_id]
    assert data.train.tolist() == expected


def test_shards_are_bounded_and_read_as_one_stream(corpus, tmp_path, monkeypatch):
    whole = run(corpus, tmp_path / "one", 2)
    assert len(whole.train.shards) == 1
    monkeypatch.setattr(shards_mod, "SHARD_BYTES", 1000)
    sharded = run(corpus, tmp_path / "many", 2)
    files = sharded.train.files
    assert len(files) == -(-len(whole.train) * 2 // 1000) and all(os.path.getsize(f) <= 1000 for f in files)
    assert sorted(os.listdir(sharded.cache_path))[:2] == ["meta.json", "tokenizer"]
    assert np.array_equal(np.asarray(sharded.train), np.asarray(whole.train))
    flat = np.asarray(whole.train)
    for start, stop in [(0, 10), (495, 505), (499, 1501), (len(flat) - 3, len(flat)), (7, 7)]:
        assert np.array_equal(sharded.train[start:stop], flat[start:stop])  # across shard boundaries too
    assert sharded.train[-1] == flat[-1] and sharded.train[500] == flat[500]
    # Blocks that straddle shards are the same blocks.
    a = BlockLoader(whole.train, 37, 4, 2, seed=5, document_ids=True)
    b = BlockLoader(sharded.train, 37, 4, 2, seed=5, document_ids=True)
    for _ in range(5):
        for x, y in zip(a.next_step(), b.next_step()):
            for k in x:
                assert np.array_equal(x[k].numpy(), y[k].numpy()), k


def test_killed_run_resumes_finished_pieces(corpus, tmp_path, monkeypatch):
    """A tokenization that dies after some pieces: no entry is trusted, and the rerun redoes only the rest."""
    reference = run(corpus, tmp_path / "reference", 1)
    n_pieces = reference.meta["build"]["pieces"]
    cache = tmp_path / "cache"
    real = workers_mod.tokenize_piece
    calls = []

    def dies_after_five(job, piece, **kw):
        if len(calls) == 5:
            raise KeyboardInterrupt  # as a Ctrl-C or SIGTERM in the middle would
        calls.append(piece.index)
        return real(job, piece, **kw)

    monkeypatch.setattr(workers_mod, "tokenize_piece", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, cache, 1)
    datasets_dir = cache / "datasets"
    assert [n for n in os.listdir(datasets_dir) if not n.startswith(".")] == []  # nothing a later run trusts
    (partial,) = [n for n in os.listdir(datasets_dir) if n.startswith(".partial-")]
    assert sorted(n for n in os.listdir(datasets_dir / partial) if n.endswith(".json") and n != "plan.json") == [
        f"piece-{i:06d}.json" for i in range(5)
    ]
    # A piece whose token file was damaged after its record was written is not trusted either.
    damaged = datasets_dir / partial / "piece-000002.train.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])

    calls.clear()
    monkeypatch.setattr(
        workers_mod, "tokenize_piece", lambda job, piece, **kw: calls.append(piece.index) or real(job, piece, **kw)
    )
    again = run(corpus, cache, 1)
    assert sorted(calls) == [2] + list(range(5, n_pieces))
    assert again.meta["build"]["pieces_reused"] == 4
    assert np.array_equal(np.asarray(again.train), np.asarray(reference.train))
    assert np.array_equal(np.asarray(again.val), np.asarray(reference.val))
    assert not any(n.startswith(".partial-") for n in os.listdir(datasets_dir))  # cleaned up once published


def test_worker_process_failure_keeps_finished_pieces(corpus, tmp_path, monkeypatch):
    reference = run(corpus, tmp_path / "reference", 1)
    cache = tmp_path / "cache"
    real = workers_mod.tokenize_piece

    def piece_seven_fails(job, piece, **kw):  # runs inside the forked workers
        if piece.index == 7:
            raise DataError("simulated failure in piece 7")
        return real(job, piece, **kw)

    monkeypatch.setattr(workers_mod, "tokenize_piece", piece_seven_fails)
    with pytest.raises(DataError, match="simulated failure in piece 7"):
        run(corpus, cache, 3)
    datasets_dir = cache / "datasets"
    (partial,) = [n for n in os.listdir(datasets_dir) if n.startswith(".partial-")]
    done = {n for n in os.listdir(datasets_dir / partial) if n.startswith("piece-") and n.endswith(".json")}
    assert "piece-000007.json" not in done and len(done) >= 1
    monkeypatch.setattr(workers_mod, "tokenize_piece", real)
    again = run(corpus, cache, 3)
    assert again.meta["build"]["pieces_reused"] == len(done)
    assert np.array_equal(np.asarray(again.train), np.asarray(reference.train))


def test_split_guarantee_applies_across_pieces(tmp_path, monkeypatch):
    # With a tiny val_fraction no document falls below it: the lowest-hash document, wherever its piece
    # is, must move to val, exactly as it would in one process.
    root = tmp_path / "c"
    root.mkdir()
    (root / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts_of(300, 7)))
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 1)
    results = [run(root, tmp_path / f"c{w}", w, val_fraction=1e-9) for w in (1, 3)]
    for data in results:
        assert data.meta["splits"]["val"]["documents"] == 1 and data.meta["build"]["pieces"] > 5
    assert np.array_equal(np.asarray(results[0].val), np.asarray(results[1].val))
    assert np.array_equal(np.asarray(results[0].train), np.asarray(results[1].train))


def test_progress_lines_off_a_terminal(corpus, tmp_path, monkeypatch, caplog):
    import logging

    from trainer.data import progress as progress_mod

    monkeypatch.setattr(progress_mod, "LINE_EVERY_S", 0.0)  # a line at every update
    caplog.set_level(logging.INFO, logger="trainer.data")
    run(corpus, tmp_path / "cache", 2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizing: ")]
    assert lines and lines[-1].startswith("tokenizing: 100% (")
    assert all("/s, " in line and " docs/s, " in line and line.endswith(" left") for line in lines)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenized ")]
    assert "880 documents" in summary and "2 process(es)" in summary


def test_progress_bar_on_a_terminal(monkeypatch):
    import io

    from trainer.data import progress as progress_mod

    screen = io.StringIO()
    screen.isatty = lambda: True
    monkeypatch.setattr(progress_mod.sys, "stderr", screen)
    bar = progress_mod.TokenizeProgress(total_bytes=4_000_000, done_bytes=1_000_000)
    bar.update(1_000_000, 500)
    bar.close()
    shown = screen.getvalue()
    assert "tokenizing" in shown and "2.00M/4.00M" in shown and "docs/s" in shown and "<" in shown  # ETA
