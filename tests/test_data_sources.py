"""Sources beyond plain text: parquet, datasets' save_to_disk folders, .jsonl.gz and .jsonl.zst.

Each format is written by its own library (pyarrow, datasets, gzip, zstandard) and the expected
documents are read back by that library, never by our readers.
"""

import gzip
import json
import logging
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from trainer.data import DataError, prepare_data, resolve_corpus
from trainer.data import pieces as pieces_mod
from trainer.data import sources as sources_mod
from trainer.data.pieces import plan_pieces

EOS = 256  # the byte tokenizer's


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "default_cache"))


def docs_of(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gämma", "δέλτα", "🙂", "def f():\n    return 1\n", "x" * 40]
    # Numbered, so no two documents are equal.
    return [f"{i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for i in range(n)]


def byte_stream(texts):
    out = []
    for t in texts:
        out += list(t.encode("utf-8")) + [EOS]
    return out


def prepare(path, tmp_path, **kw):
    kw.setdefault("val_fraction", 0)
    return prepare_data(str(path), tokenizer="byte", cache_dir=str(tmp_path / "cache"), **kw)


def entries(cache):
    """Cache entries a later run would trust (dot-names are temp folders, unfinished pieces, locks)."""
    folder = os.path.join(cache, "datasets")
    return [n for n in os.listdir(folder) if not n.startswith(".")] if os.path.isdir(folder) else []


# ---------------------------------------------------------------- parquet


def test_parquet_file_and_folder_match_pyarrow(tmp_path):
    texts = docs_of(300)
    root = tmp_path / "pq"
    root.mkdir()
    # Two shards, several row groups each, a null row and an extra column.
    first = texts[:170] + [None]
    pq.write_table(pa.table({"id": list(range(171)), "text": first}), root / "part-0.parquet", row_group_size=32)
    pq.write_table(pa.table({"text": texts[170:], "id": list(range(130))}), root / "part-1.parquet", row_group_size=50)

    expected = []
    for name in ("part-0.parquet", "part-1.parquet"):  # read back by pyarrow, in file order
        expected += [t for t in pq.read_table(root / name).column("text").to_pylist() if t is not None]
    assert len(expected) == 300

    data = prepare(root, tmp_path)
    assert data.train.tolist() == byte_stream(expected)
    assert data.n_documents == 300 and data.meta["hygiene"]["null_rows"] == 1
    single = prepare(root / "part-1.parquet", tmp_path)
    assert single.train.tolist() == byte_stream(pq.read_table(root / "part-1.parquet").column("text").to_pylist())


def test_parquet_is_cut_at_row_groups(tmp_path, monkeypatch):
    texts = docs_of(400, seed=1)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=40)
    n_groups = pq.ParquetFile(path).metadata.num_row_groups
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 1)  # every row group its own piece
    corpus = resolve_corpus(str(path))
    plan = plan_pieces(corpus)
    assert [(s.start, s.stop, s.first) for p in plan for s in p.spans] == [(g, g + 1, 40 * g) for g in range(n_groups)]
    # Pieces read only their row groups, and in order they give pyarrow's rows.
    assert prepare(path, tmp_path).train.tolist() == byte_stream(texts)


def test_parquet_binary_text_column(tmp_path):
    texts = ["plain", "ünïcode", "bad \xff byte"]
    raw = [t.encode("utf-8") for t in texts[:2]] + [b"bad \xff byte"]
    pq.write_table(pa.table({"text": pa.array(raw, pa.binary())}), tmp_path / "b.parquet")
    data = prepare(tmp_path / "b.parquet", tmp_path)
    stored = pq.read_table(tmp_path / "b.parquet").column("text").to_pylist()
    decoded = [r.decode("utf-8", errors="replace") for r in stored]
    assert data.train.tolist() == byte_stream(decoded)
    assert data.meta["hygiene"]["replaced"] == 1


def test_parquet_bad_input(tmp_path):
    good = tmp_path / "shards"
    good.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), good / "a.parquet")
    pq.write_table(pa.table({"body": ["c"], "id": [1]}), good / "b.parquet")
    with pytest.raises(DataError) as e:
        prepare(good, tmp_path)
    message = str(e.value)
    assert "b.parquet has no 'text' column (its columns: body, id)" in message
    assert "a.parquet" in message and "mixed schemas" in message and "data.text_field" in message
    assert "\n" not in message

    (good / "b.parquet").unlink()
    pq.write_table(pa.table({"text": [1, 2]}), good / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: column 'text' holds int64, not text"):
        prepare(good, tmp_path)

    whole = (good / "a.parquet").read_bytes()
    truncated = tmp_path / "cut" / "t.parquet"
    truncated.parent.mkdir()
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"t\.parquet is not a readable parquet file .*corrupt or truncated"):
        prepare(truncated.parent, tmp_path)
    assert entries(str(tmp_path / "cache")) == []


def test_parquet_corrupt_data_pages(tmp_path):
    # A footer that reads but data pages that do not: found while tokenizing, named, nothing trusted left.
    path = tmp_path / "c.parquet"
    texts = docs_of(200, seed=3)
    pq.write_table(pa.table({"text": texts}), path, compression="snappy", row_group_size=100)
    blob = bytearray(path.read_bytes())
    md = pq.ParquetFile(path).metadata
    col = md.row_group(1).column(0)
    start = col.data_page_offset
    end = (col.dictionary_page_offset or start) + col.total_compressed_size
    for i in range(start + 20, min(start + 400, end)):
        blob[i] = 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"c\.parquet is not a readable parquet file at row \d+"):
        prepare(path, tmp_path)
    assert entries(str(tmp_path / "cache")) == []


# ---------------------------------------------------------------- datasets folders


def test_save_to_disk_folder_matches_datasets(tmp_path):
    import datasets

    texts = docs_of(500, seed=2)
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(500))})
    ds.shuffle(seed=0).save_to_disk(str(tmp_path / "ds"), max_shard_size="20KB")
    assert len([n for n in os.listdir(tmp_path / "ds") if n.endswith(".arrow")]) > 1
    expected = datasets.load_from_disk(str(tmp_path / "ds"))["text"]
    data = prepare(tmp_path / "ds", tmp_path)
    assert data.train.tolist() == byte_stream(expected)
    # Nested in a folder of other sources, it is found too (and nothing inside it is read as text).
    (tmp_path / "mixed").mkdir()
    os.rename(tmp_path / "ds", tmp_path / "mixed" / "ds")
    (tmp_path / "mixed" / "notes.txt").write_text("hello")
    names = [s.name for s in resolve_corpus(str(tmp_path / "mixed")).sources]
    assert names[-1] == "notes.txt" and all(n.startswith("ds" + os.sep) and n.endswith(".arrow") for n in names[:-1])


def test_datasetdict_folder_names_its_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict .*splits: train, test.*point data.path at one split's folder"):
        prepare(tmp_path / "dd", tmp_path)
    assert prepare(tmp_path / "dd" / "train", tmp_path).train.tolist() == byte_stream(["a", "b"])


# ---------------------------------------------------------------- compressed jsonl


def write_jsonl_lines(texts, blank_every=7):
    lines = []
    for i, t in enumerate(texts):
        lines.append(json.dumps({"text": t, "i": i}))
        if i % blank_every == 3:
            lines.append("")
    return ("\n".join(lines) + "\n").encode()


def read_back(path):
    """Documents of a .jsonl(.gz|.zst) file as the compression library itself decodes them."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        with open(path, "rb") as fh:
            raw = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]


def test_jsonl_gz_and_zst_match_their_libraries(tmp_path):
    texts = docs_of(800, seed=4)
    (tmp_path / "c").mkdir()
    with gzip.open(tmp_path / "c" / "a.jsonl.gz", "wb") as f:
        f.write(write_jsonl_lines(texts[:400]))
    # Two zstd frames, as concatenated shards often are.
    blob = write_jsonl_lines(texts[400:])
    half = len(blob) // 2
    half = blob.rindex(b"\n", 0, half) + 1
    cctx = zstandard.ZstdCompressor(level=3)
    (tmp_path / "c" / "b.jsonl.zst").write_bytes(cctx.compress(blob[:half]) + cctx.compress(blob[half:]))

    expected = read_back(tmp_path / "c" / "a.jsonl.gz") + read_back(tmp_path / "c" / "b.jsonl.zst")
    assert len(expected) == 800
    data = prepare(tmp_path / "c", tmp_path, val_fraction=0.1)
    train = [bytes(d).decode() for d in split(data.train)]
    val = [bytes(d).decode() for d in split(data.val)]
    assert sorted(train + val) == sorted(expected) and not set(train) & set(val)
    ordered = prepare(tmp_path / "c", tmp_path)
    assert ordered.train.tolist() == byte_stream(expected)
    # Line numbers count blank lines too, so errors point where an editor would.
    bad = blob + b'{"body": 1}\n'
    with gzip.open(tmp_path / "bad.jsonl.gz", "wb") as f:
        f.write(bad)
    n_lines = bad.count(b"\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl\.gz, line {n_lines}: no 'text' field .*set data\.text_field"):
        prepare(tmp_path / "bad.jsonl.gz", tmp_path)


def split(tokens):
    docs, cur = [], []
    for t in np.asarray(tokens).tolist():
        if t == EOS:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    return docs


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_or_corrupt_compressed_jsonl(tmp_path, kind):
    blob = write_jsonl_lines(docs_of(2000, seed=5))
    packed = gzip.compress(blob) if kind == "gz" else zstandard.ZstdCompressor().compress(blob)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "ok.jsonl").write_text('{"text": "a healthy file"}\n')
    (folder / f"z.jsonl.{kind}").write_bytes(packed[: len(packed) // 2])
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=rf"z\.jsonl\.{kind} is not a readable .* corrupt or truncated") as e:
        prepare_data(str(folder), tokenizer="byte", cache_dir=cache, val_fraction=0)
    assert "\n" not in str(e.value)
    assert entries(cache) == []
    # The healthy pieces are kept for the next run, which finds the file fixed and a new key.
    (folder / f"z.jsonl.{kind}").write_bytes(packed)
    data = prepare_data(str(folder), tokenizer="byte", cache_dir=cache, val_fraction=0)
    assert len(split(data.train)) == 2001

    garbage = folder / f"y.jsonl.{kind}"
    garbage.write_bytes(b"this is not compressed at all\n" * 10)
    with pytest.raises(DataError, match=rf"y\.jsonl\.{kind} is not a readable"):
        prepare_data(str(folder), tokenizer="byte", cache_dir=cache, val_fraction=0)


def test_jsonl_cut_into_line_aligned_ranges(tmp_path, monkeypatch):
    texts = docs_of(300, seed=6)
    path = tmp_path / "big.jsonl"
    path.write_bytes(write_jsonl_lines(texts))
    monkeypatch.setattr(sources_mod, "HASH_CHUNK", 512)
    monkeypatch.setattr(sources_mod, "JSONL_SPLIT_BYTES", 2048)
    monkeypatch.setattr(pieces_mod, "PIECE_BYTES", 1)
    source = resolve_corpus(str(path)).sources[0]
    raw = path.read_bytes()
    assert len(source.layout) > 5
    for offset, lineno in source.layout:  # each cut starts a line, and knows its number
        assert offset == 0 or raw[offset - 1 : offset] == b"\n"
        assert raw[:offset].count(b"\n") + 1 == lineno
    data = prepare(path, tmp_path)
    assert data.train.tolist() == byte_stream(texts)
    assert data.meta["build"]["pieces"] == len(source.layout)


def test_non_utf8_line_is_replaced_and_counted(tmp_path, caplog):
    lines = [b'{"text": "fine"}', b'{"text": "caf\xe9 cr\xe8me"}', b'{"text": "ok \xff\xfe end"}']
    (tmp_path / "latin.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    caplog.set_level(logging.INFO, logger="trainer.data")
    data = prepare(tmp_path / "latin.jsonl", tmp_path)
    expected_texts = [json.loads(line.decode("utf-8", errors="replace"))["text"] for line in lines]
    assert data.train.tolist() == byte_stream(expected_texts)
    n_replaced = sum(line.decode("utf-8", errors="replace").count("\ufffd") for line in lines)
    assert n_replaced == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("replaced 4 invalid UTF-8 sequence(s) with U+FFFD in 2 document(s)" in w for w in warnings)


def test_long_text_file_is_read_in_parts(tmp_path, monkeypatch):
    from trainer.data import readers

    monkeypatch.setattr(readers, "TEXT_CHUNK_BYTES", 100)
    lines = "".join(f"line {i}: ünïcödé 🙂\n" for i in range(60))
    no_newlines = "ü🙂é" * 200  # cut points must fall between characters, never inside one
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(lines)
    (tmp_path / "c" / "b.txt").write_text(no_newlines)
    (tmp_path / "c" / "c.txt").write_bytes(b"x" * 300)  # a multiple of the part size
    data = prepare(tmp_path / "c", tmp_path, num_workers=2)
    # The byte tokenizer is blind to the cuts: the file's bytes, one EOS per file, nothing replaced.
    assert data.train.tolist() == byte_stream([lines, no_newlines, "x" * 300])
    assert data.n_documents == 3 and data.meta["hygiene"]["replaced"] == 0


# ---------------------------------------------------------------------------- the hash memo


def _counting_hash(monkeypatch):
    """Replaces sources._hash by a wrapper that records which files it read."""
    read, real = [], sources_mod._hash
    monkeypatch.setattr(
        sources_mod, "_hash", lambda path, *a, **k: read.append(os.path.basename(path)) or real(path, *a, **k)
    )
    return read


def test_a_restart_takes_unchanged_files_hashes_from_the_memo_and_rehashes_a_rewritten_one(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "HASH_MEMO_SETTLE_S", 0.05)
    monkeypatch.setattr(sources_mod, "JSONL_SPLIT_BYTES", 4096)  # several cut points to carry over
    monkeypatch.setattr(sources_mod, "HASH_CHUNK", 4096)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha " * 1000)
    (data / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(500)))
    (data / "c.txt").write_bytes(b"\0binary" * 100)
    time.sleep(0.1)  # older than the settle time, so their hashes are remembered
    memo = tmp_path / "memo"
    plain = resolve_corpus(str(data))
    first = resolve_corpus(str(data), hash_memo=str(memo))
    assert len(list(memo.glob("*.json"))) == 3

    read = _counting_hash(monkeypatch)
    again = resolve_corpus(str(data), hash_memo=str(memo))
    assert read == []
    for corpus in (first, again):
        assert corpus.fingerprint == plain.fingerprint
        assert [s.layout for s in corpus.sources] == [s.layout for s in plain.sources]
        assert [s.name for s in corpus.skipped] == ["c.txt"]  # the binary check still sees the first bytes
    assert len(plain.sources[1].layout) > 3

    # Same size, mtime set back as cp -p or rsync -t would: the change time still gives it away.
    before = os.stat(data / "a.txt")
    (data / "a.txt").write_text("omega " * 1000)
    os.utime(data / "a.txt", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(data / "a.txt").st_size == before.st_size
    changed = resolve_corpus(str(data), hash_memo=str(memo))
    assert read == ["a.txt"]
    assert changed.fingerprint == resolve_corpus(str(data)).fingerprint != plain.fingerprint


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("fresh " * 100)
    resolve_corpus(str(tmp_path / "a.txt"), hash_memo=str(tmp_path / "memo"))  # the default 2 s settle time
    assert not list((tmp_path / "memo").glob("*.json"))
    read = _counting_hash(monkeypatch)
    resolve_corpus(str(tmp_path / "a.txt"), hash_memo=str(tmp_path / "memo"))
    assert read == ["a.txt"]


def test_prepare_keeps_the_memo_in_the_cache_and_a_restart_reads_no_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "HASH_MEMO_SETTLE_S", 0.05)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    time.sleep(0.1)
    built = prepare(path, tmp_path)
    assert len(list((tmp_path / "cache" / "hashes").glob("*.json"))) == 1
    read = _counting_hash(monkeypatch)
    again = prepare(path, tmp_path)
    assert read == []
    assert again.from_cache and again.cache_path == built.cache_path
    assert again.train.tolist() == built.train.tolist()
