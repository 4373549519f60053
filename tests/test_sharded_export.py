"""The Hugging Face export of a sharded run (FSDP2, tensor or expert parallelism): each checkpoint's
model.safetensors and final/ are written a file at a time, from weights gathered a tensor at a time
(or, for an async save, read back from its DCP shards), never the whole model on one rank.

Each 2-rank run writes with a file cap small enough for many files; its exports must equal, tensor
for tensor and file for file, what the one-process writer makes of the same weights gathered whole,
and rank 0 must never hold more than about one file of gathered weights at a time.
"""

from __future__ import annotations

import json
import textwrap
import threading
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import write_corpus
from tests.test_parallel import _overrides, torchrun
from trainer.checkpoint import load_checkpoint
from trainer.models import build
from trainer.models.hf import (
    INDEX_FILE,
    args_from_hf_config,
    checkpoint_state,
    exported_names,
    load_state_dict,
    model_state,
    read_hf_config,
    weight_files,
    write_hf,
)

transformers = pytest.importorskip("transformers")


class LiveBytes:
    """Wraps functions that hand out dicts of new tensors (the gathers and reads of an export) and
    counts the bytes of those tensors still alive, by their storage: a view or alias kept anywhere
    keeps them counted. `peak`: the most alive at once; `total`: all handed out, by function."""

    def __init__(self):
        self.live = self.peak = 0
        self.total: dict[str, int] = {}
        self._lock = threading.Lock()  # an async save's thread hands out tensors too

    def wrap(self, fn):
        self.total[fn.__name__] = 0

        def tracked(*args, **kwargs):
            tensors = fn(*args, **kwargs)
            for tensor in tensors.values():
                storage = tensor.untyped_storage()
                nbytes = storage.nbytes()
                with self._lock:
                    self.live += nbytes
                    self.total[fn.__name__] += nbytes
                    self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, nbytes)
            return tensors

        return tracked

    def _freed(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes


# A training run whose exports are measured (rank 0's LiveBytes over every gather and read of an
# export) and whose final export is written a second time, by the one-process writer from the
# whole state gathered at once (merged, for LoRA), as exports were before: the reference.
EXPORT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import trainer.checkpoint as ck
    from tests.test_sharded_export import LiveBytes
    from trainer import Trainer, load_config
    from trainer.lora import base_dtype, merge_state_dict
    from trainer.models.hf import save_hf
    from trainer.parallel.sharded_checkpoint import full_model_state

    out, cap = Path(sys.argv[1]), int(sys.argv[2])
    ck.MAX_SHARD_BYTES = cap
    live = LiveBytes()
    ck.gather_tensors = live.wrap(ck.gather_tensors)
    ck.read_model_tensors = live.wrap(ck.read_model_tensors)
    real_save_final = ck.Checkpointer.save_final

    def save_final(self, model):
        final = real_save_final(self, model)
        figures = {"peak": live.peak, "total": live.total}
        whole = full_model_state(model)
        if ck.is_lora(model):
            whole = merge_state_dict(whole, model.lora.scaling, base_dtype(model))
        if self.is_main:
            save_hf(ck.HostCopy(model, whole), out / "reference", self.tokenizer.special_token_ids(), cap)
        (out / f"live-{os.environ['RANK']}.json").write_text(json.dumps(figures))
        return final

    ck.Checkpointer.save_final = save_final
    Trainer(load_config(None, sys.argv[3:])).train()
    """
)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stacked_experts(folder: Path) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors of an export (each expert's checkpoint tensors joined again)."""
    args = args_from_hf_config(read_hf_config(folder))
    return {name: t for name, t in model_state(args, load_state_dict(folder)).items() if ".experts." in name}


def assert_same_export(got: Path, want: Path) -> None:
    """The same files (and index), each holding the same tensors exactly, and the same configs."""
    names = sorted(p.name for p in want.glob("model*.safetensors*"))
    assert sorted(p.name for p in got.glob("model*.safetensors*")) == names
    for name in ("config.json", "generation_config.json") + ((INDEX_FILE,) if INDEX_FILE in names else ()):
        assert (got / name).read_text() == (want / name).read_text(), name
    for file in weight_files(want):
        theirs, ours = load_file(file), load_file(got / file.name)
        assert ours.keys() == theirs.keys(), file.name
        for key, tensor in theirs.items():
            assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), (file.name, key)


def assert_shards_equal_export(checkpoint: Path) -> None:
    """A checkpoint's model files hold exactly the weights of its distributed/ shards (DCP's own
    reading, in this process), under the checkpoint's names."""
    args = args_from_hf_config(read_hf_config(checkpoint))
    model = build(args)
    load_checkpoint(checkpoint, model=model)
    state = model.state_dict()
    want = checkpoint_state(args, {name: state[name] for name in exported_names(args, state)})
    got = load_state_dict(checkpoint)
    assert got.keys() == want.keys(), checkpoint.name
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), (checkpoint.name, name)


CASES = {
    # name: (overrides, the file cap in bytes)
    "fsdp": ({"parallel__strategy": "fsdp"}, 200_000),
    "fsdp-async": ({"parallel__strategy": "fsdp", "checkpoint__async_save": "true"}, 200_000),
    "tensor-parallel": ({"parallel__strategy": "fsdp", "parallel__tensor_parallel": 2}, 200_000),
    # LoRA on a pretrained Llama (about 0.5 MB)
    "lora": ({"parallel__strategy": "fsdp", "lora__rank": 4}, 60_000),
    # Mixtral, 4 experts of (2 x 64) x 32 and 32 x 64: each stacked tensor straddles several 20 KB files
    "expert-parallel": ({"parallel__strategy": "fsdp", "parallel__expert_parallel": 2}, 20_000),
}
# The pretrained models of the cases that start from one: (family, their config's changes).
BASES = {
    "lora": ("llama", dict(vocab_size=320, hidden_size=64, intermediate_size=176)),
    "expert-parallel": ("mixtral", dict(vocab_size=320, num_local_experts=4)),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_a_sharded_export_equals_the_whole_state_one_and_holds_a_file_at_a_time(tmp_path, case):
    overrides, cap = CASES[case]
    write_corpus(tmp_path / "corpus")
    if case in BASES:
        from tests.test_hf import hf_folder

        family, changes = BASES[case]
        _, base = hf_folder(tmp_path, family, **changes)
        pretrained = {"model__from_hf": str(base), "model__preset": "small", "model__allow_new_tokenizer": "true"}
        overrides = {**overrides, **pretrained}  # small: the preset's default, which from_hf replaces
    script = tmp_path / "export.py"
    script.write_text(EXPORT_SCRIPT)
    args = _overrides(tmp_path, "run", train__micro_batch_size=2, checkpoint__save_every=2, **overrides)
    result = torchrun([str(script), str(tmp_path), str(cap), *args])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    run, reference = tmp_path / "run", tmp_path / "reference"

    final = run / "final" / "merged" if case == "lora" else run / "final"
    assert len(weight_files(final)) >= 5  # the cap split it: several files, and an index
    assert_same_export(final, reference)
    # transformers' reader finds the same weights (under its own names: transformers 5 fuses experts)
    got, want = (transformers.AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (final, reference))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    if case != "lora":  # a LoRA checkpoint holds only the adapters (distributed/ has no base)
        checkpoints = sorted(run.glob("checkpoint-*"))
        assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
        for checkpoint in checkpoints:
            assert_shards_equal_export(checkpoint)
            # the same files as final/ (the same model and cap), and the same configs
            assert sorted(p.name for p in checkpoint.glob("model*")) == sorted(p.name for p in final.glob("model*"))
            assert (checkpoint / INDEX_FILE).read_text() == (final / INDEX_FILE).read_text()
            assert (checkpoint / "config.json").read_text() == (final / "config.json").read_text()

    # Rank 0 held at most a file of gathered weights at a time (plus, for experts straddling files,
    # the rest of one stacked tensor; for LoRA's merge, every adapter and the base weight being
    # merged); the other rank kept none. Gathering the whole model first would hold all of it.
    weights = load_state_dict(reference)
    model_bytes = nbytes(weights.values())
    rank0 = json.loads((tmp_path / "live-0.json").read_text())
    rank1 = json.loads((tmp_path / "live-1.json").read_text())
    if case == "lora":
        adapters = load_file(run / "final" / "adapter_model.safetensors").values()
        bound = cap + nbytes(adapters) + max(nbytes([t]) for t in weights.values())
    elif case == "expert-parallel":
        bound = cap + max(nbytes([t]) for t in _stacked_experts(reference).values())
    else:
        bound = cap
    assert 0 < rank0["peak"] <= bound < model_bytes / 2, (rank0, bound, model_bytes)
    # Every weight went through the measured gathers and reads: final/ gathered, and the three
    # checkpoints of an async run read back from their shards (gathered, in a synchronous one).
    gathered, read = rank0["total"]["gather_tensors"], rank0["total"]["read_model_tensors"]
    if case == "fsdp-async":
        assert gathered >= model_bytes and read >= 3 * model_bytes
    else:
        assert gathered >= (1 if case == "lora" else 4) * model_bytes and read == 0
    assert rank1["peak"] == 0 and rank1["total"]["read_model_tensors"] == 0


def test_write_hf_fetches_each_tensor_once_in_order_and_holds_about_a_file(tmp_path):
    """One process, a mixture of experts (stacked experts split into one tensor per expert) under a
    cap that makes every stacked tensor straddle files: the same files and tensors as the whole
    state's checkpoint_state, each fetch naming only what the next file needs, and the tensors
    fetched freed once written."""
    from tests.test_hf import assert_same_logits, hf_folder
    from trainer.models import load_hf

    _, folder = hf_folder(tmp_path, "mixtral", num_local_experts=4)
    model = load_hf(folder)
    state = model.state_dict()
    cap = 6_000
    calls, live = [], LiveBytes()

    def fetch(names):
        calls.append(names)
        return {name: state[name].clone() for name in names}

    write_hf(model, tmp_path / "out", state, live.wrap(fetch), max_shard_bytes=cap)

    names = exported_names(model.args, state)
    assert [name for call in calls for name in call] == names and all(calls)
    want = checkpoint_state(model.args, {name: state[name] for name in names})
    files = weight_files(tmp_path / "out")
    assert len(files) > len(calls) > 10  # files of experts alone fetch nothing more
    got = {}
    for file in files:
        tensors = load_file(file)
        assert nbytes(tensors.values()) <= cap or len(tensors) == 1, file.name
        got.update(tensors)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    largest = max(nbytes([t]) for t in state.values())
    assert live.peak <= cap + largest < nbytes(state.values()) / 2
    assert live.live == 0  # nothing fetched outlives the write
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_logits(model, back)
