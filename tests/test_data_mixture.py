"""Mixtures (data.weights): proportions, determinism, layout invariance, exact resume, per-source counts."""

import json
import logging

import numpy as np
import pytest

from trainer.config import load_config
from trainer.data import BlockLoader, DataError, TokenMixture, prepare_data
from trainer.errors import ConfigError

SEQ = 8
SOURCE_STRIDE = 1_000_000


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "default_cache"))


def coded_mixture(blocks: list[int], weights: list[float]) -> TokenMixture:
    """Source s's token at position p is s * SOURCE_STRIDE + p, so a row tells its source and block."""
    streams = [np.arange(n * SEQ + 1, dtype=np.int64) + s * SOURCE_STRIDE for s, n in enumerate(blocks)]
    return TokenMixture([f"src{s}" for s in range(len(blocks))], weights, streams)


def origin(row) -> tuple[int, int]:
    first = int(row[0])
    return first // SOURCE_STRIDE, (first % SOURCE_STRIDE) // SEQ


def step_blocks(loaders) -> list[tuple[int, int]]:
    out = []
    for loader in loaders:
        for mb in loader.next_step():
            assert np.array_equal(mb["labels"].numpy(), mb["input_ids"].numpy() + 1)  # one block, one source
            out += [origin(row) for row in mb["input_ids"].numpy()]
    return out


def test_proportions_hold_at_every_step_and_are_counted():
    weights = [0.6, 0.3, 0.1]
    loader = BlockLoader(coded_mixture([50, 7, 200], weights), SEQ, 4, 2, seed=1)
    counts = np.zeros(3)
    draws_of_small = []
    for _ in range(60):
        for source, block in step_blocks([loader]):
            counts[source] += 1
            if source == 1:
                draws_of_small.append(block)
        total = counts.sum()
        assert np.all(np.abs(counts - np.array(weights) * total) <= 1), counts
        assert loader.tokens_by_source() == {f"src{s}": int(counts[s]) * SEQ for s in range(3)}
    # The 7-block source went round 20 times: each round all its blocks once, in a new order.
    rounds = [draws_of_small[i : i + 7] for i in range(0, 140, 7)]
    assert all(sorted(r) == list(range(7)) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    state = loader.state_dict()
    assert state["tokens_by_source"] == loader.tokens_by_source()
    assert [s["epoch"] for s in state["sources"]] == [counts[0] // 50, 20, counts[2] // 200]
    json.dumps(state)  # small and JSON-able


def test_global_batch_is_layout_invariant():
    layouts = [(1, 4, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2)]
    runs = []
    for mbs, accum, world in layouts:
        loaders = [
            BlockLoader(coded_mixture([30, 11], [2, 1]), SEQ, mbs, accum, world, rank, seed=4) for rank in range(world)
        ]
        runs.append([step_blocks(loaders) for _ in range(25)])
    assert all(r == runs[0] for r in runs)
    other_seed = BlockLoader(coded_mixture([30, 11], [2, 1]), SEQ, 4, 1, seed=5)
    assert [step_blocks([other_seed]) for _ in range(25)] != runs[0]


@pytest.mark.parametrize("stop", [1, 9, 23])
def test_resume_is_exact(stop):
    def make(seed):
        return [BlockLoader(coded_mixture([13, 40, 5], [0.5, 0.3, 0.2]), SEQ, 2, 1, 2, r, seed=seed) for r in range(2)]

    reference, interrupted = make(7), make(7)
    for _ in range(stop):
        step_blocks(reference)
        step_blocks(interrupted)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in interrupted]
    resumed = make(99)  # the seed comes from the state
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    assert resumed[0].tokens_by_source() == reference[0].tokens_by_source()
    for _ in range(15):
        assert step_blocks(resumed) == step_blocks(reference)
    assert resumed[0].state_dict() == reference[0].state_dict()
    assert (resumed[0].epoch, resumed[0].position, resumed[0].steps) == (
        reference[0].epoch,
        reference[0].position,
        reference[0].steps,
    )


def test_incompatible_states_are_refused_clearly(caplog):
    single = BlockLoader(np.arange(20 * SEQ + 1), SEQ, 2, 1, seed=3)
    mixture = BlockLoader(coded_mixture([10, 10], [1, 1]), SEQ, 2, 1, seed=3)
    with pytest.raises(DataError, match=r"read one corpus but this run mixes 2 sources \(data.weights\)"):
        mixture.load_state_dict(single.state_dict())
    with pytest.raises(DataError, match=r"mixed 2 sources \(data.weights\) but this run reads one corpus"):
        single.load_state_dict(mixture.state_dict())
    renamed = BlockLoader(TokenMixture(["a", "b"], [1, 1], mixture.mixture.streams), SEQ, 2, 1)
    with pytest.raises(DataError, match=r"mixed the sources \['src0', 'src1'\] but this run mixes \['a', 'b'\]"):
        renamed.load_state_dict(mixture.state_dict())
    longer = BlockLoader(coded_mixture([10, 12], [1, 1]), SEQ, 2, 1)
    with pytest.raises(DataError, match="12 at seq_len 8: different data or seq_len"):
        longer.load_state_dict(mixture.state_dict())

    # New weights on resume: a warning, and the new proportions from there on (no catching up on the old).
    for _ in range(10):
        mixture.next_step()
    reweighted = BlockLoader(coded_mixture([10, 10], [3, 1]), SEQ, 2, 1)
    caplog.set_level(logging.WARNING, logger="trainer.data")
    reweighted.load_state_dict(mixture.state_dict())
    assert "data.weights changed since the checkpoint (0.5, 0.5 -> 0.75, 0.25)" in caplog.text
    after = [s for _ in range(20) for s, _ in step_blocks([reweighted])]
    assert after.count(0) == 30 and after.count(1) == 10


def test_version_1_state_still_loads():
    # A sampler state as checkpoints before mixtures saved it: the stream continues with the permutation
    # of (seed, epoch) at the saved position.
    tokens = np.arange(20 * SEQ + 1)
    loader = BlockLoader(tokens, SEQ, 2, 2, seed=0)
    loader.load_state_dict(
        {
            "version": 1,
            "seed": 3,
            "shuffle": True,
            "epoch": 1,
            "position": 8,
            "steps": 7,
            "blocks_per_epoch": 20,
            "global_batch": 4,
        }
    )
    expected = np.random.default_rng([3, 1]).permutation(20)[8:12]
    assert [block for block in (int(r[0]) // SEQ for mb in loader.next_step() for r in mb["input_ids"])] == list(
        expected
    )
    assert loader.tokens_by_source() == {}


def write_source(folder, letter, n_docs):
    folder.mkdir(parents=True)
    for i in range(n_docs):
        (folder / f"{i:03d}.txt").write_text(letter * (40 + i))
    return folder


def test_prepare_data_with_weights(tmp_path):
    a = write_source(tmp_path / "a", "a", 30)
    b = write_source(tmp_path / "b", "b", 12)
    cache = str(tmp_path / "cache")
    path = f"{a},{b}"
    data = prepare_data(path, tokenizer="byte", weights="3,1", val_fraction=0.1, cache_dir=cache, num_workers=1)
    assert isinstance(data.train, TokenMixture) and data.train.names == [str(a), str(b)]
    assert data.train.weights == [0.75, 0.25]
    parts = [prepare_data(str(p), tokenizer="byte", val_fraction=0.1, cache_dir=cache) for p in (a, b)]
    assert all(p.from_cache for p in parts)  # each source is its own cache entry, shared with a plain run
    assert [len(s) for s in data.train.streams] == [len(p.train) for p in parts]
    assert np.array_equal(np.asarray(data.val), np.concatenate([np.asarray(p.val) for p in parts]))
    assert data.n_documents == 42

    loader = BlockLoader(data.train, 16, 4, 1, seed=0)
    letters = []
    for _ in range(10):
        for row in loader.next_step()[0]["input_ids"].numpy():
            letters.append({chr(t) for t in row if t < 256})
    assert all(len(s) == 1 for s in letters)  # a block never mixes sources
    assert sum(s == {"a"} for s in letters) == 30 and loader.tokens_by_source() == {str(a): 480, str(b): 160}

    # A BPE tokenizer trains once on all sources together: the same one a plain comma list trains.
    mixed = prepare_data(path, tokenizer="bpe", vocab_size=300, weights="1,1", val_fraction=0, cache_dir=cache)
    plain = prepare_data(path, tokenizer="bpe", vocab_size=300, val_fraction=0, cache_dir=cache)
    assert mixed.tokenizer.fingerprint == plain.tokenizer.fingerprint


def test_weight_errors(tmp_path):
    a = write_source(tmp_path / "a", "a", 3)
    b = write_source(tmp_path / "b", "b", 3)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"data.weights has 3 value\(s\) but data.path has 2 comma-separated source"):
        prepare_data(f"{a},{b}", tokenizer="byte", weights="1,1,1", cache_dir=cache)
    with pytest.raises(DataError, match="data.weights must all be positive numbers, got '-1'"):
        prepare_data(f"{a},{b}", tokenizer="byte", weights="1,-1", cache_dir=cache)
    with pytest.raises(DataError, match=r"data.weights: 'x' is not a number"):
        prepare_data(f"{a},{b}", tokenizer="byte", weights="1,x", cache_dir=cache)

    for overrides, message in [
        ({"data.path": f"{a},{b}", "data.weights": "0.5"}, "data.weights has 1 value(s) but data.path has 2"),
        ({"data.path": f"{a},{b}", "data.weights": "0.5,0"}, "data.weights must all be positive numbers, got '0'"),
        ({"data.path": f"{a},{b}", "data.weights": "1,inf"}, "data.weights must all be positive numbers, got 'inf'"),
        ({"data.num_workers": -2}, "data.num_workers must be >= 0"),
    ]:
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert message in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(None, {"data.path": f"{a},{b}", "data.weights": "2,1", "data.num_workers": 3})
    assert (cfg.data.weights, cfg.data.num_workers) == ("2,1", 3)

    tiny = write_source(tmp_path / "tiny", "t", 1)
    data = prepare_data(f"{a},{tiny}", tokenizer="byte", weights="1,1", val_fraction=0, cache_dir=cache)
    with pytest.raises(DataError, match=rf"the train split of '{tiny}' has 41 tokens, too few for one block"):
        BlockLoader(data.train, 64, 1, 1)


def test_a_mixture_run_logs_tokens_per_source(tmp_path):
    from tests.helpers import tiny_config, write_corpus
    from trainer import Trainer
    from trainer.metrics import read_metrics

    a = write_corpus(tmp_path / "a", n_docs=12, seed=1)
    b = write_corpus(tmp_path / "b", n_docs=12, seed=2)
    cfg = tiny_config(
        tmp_path,
        data__path=f"{a},{b}",
        data__weights="3,1",
        train__max_steps=8,
        train__log_every=4,
        train__micro_batch_size=4,
    )
    Trainer(cfg).train()
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "tokens_by_source" in r]
    assert [r["step"] for r in logged] == [4, 8]
    for record in logged:
        drawn = record["tokens_by_source"]
        assert sum(drawn.values()) == record["step"] * 4 * 32  # every block's input tokens, all sources together
        assert list(drawn) == [str(a), str(b)] and drawn[str(a)] == 3 * drawn[str(b)]  # 3:1 within each step
