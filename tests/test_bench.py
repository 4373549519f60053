"""`python -m trainer bench`: the verdict, bench.json, the peer, and the figures' arithmetic."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from tests.helpers import tiny_config
from trainer.bench.report import flops_per_token, peak_flops, steady_tokens_per_s
from trainer.bench.runner import check_bench_config, reference_config
from trainer.bench.verdict import EXACT_TOLERANCE, judge, loss_changes
from trainer.config import to_toml
from trainer.errors import ConfigError

REPORT_KEYS = {"reference", "optimized", "max_rel_loss_diff", "tolerance", "criterion", "passed", "env"}
SIDE_KEYS = {"losses", "tokens_per_s", "peak_mem_bytes", "other_cpu_share", "step_time_spread"}


def run_bench(tmp_path, *overrides, env=None, **config):
    cfg = tiny_config(tmp_path, train__max_steps=4, bench__warmup_steps=1, **config)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "bench", str(path), *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    bench_json = tmp_path / "run" / "bench.json"
    return proc, json.loads(bench_json.read_text()) if bench_json.is_file() else None


@pytest.mark.slow
def test_fp32_tiny_bench_passes_and_matches_the_hf_peer(tmp_path):
    proc, report = run_bench(tmp_path, "--bench.peer=hf")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert REPORT_KEYS | {"peer"} <= report.keys()
    for side in ("reference", "optimized", "peer"):
        assert SIDE_KEYS <= report[side].keys() and len(report[side]["losses"]) == 4
        assert report[side]["tokens_per_s"] > 0 and report[side]["peak_mem_bytes"] > 0
        assert "mfu" not in report[side]  # MFU only on a GPU
    assert report["passed"] is True and report["tolerance"] == EXACT_TOLERANCE
    assert report["max_rel_loss_diff"] <= EXACT_TOLERANCE
    assert report["env"]["device"].startswith("CPU") and report["env"]["torch"]
    # transformers' LlamaForCausalLM on the same weights and batches, scoring the same seq_len-1 predictions.
    assert report["peer"]["max_rel_loss_diff"] < 1e-4
    assert report["peer"]["optimized_speedup"] > 0 and report["peer"]["optimized_memory_ratio"] > 0
    assert (tmp_path / "run" / "bench.png").is_file()
    assert "PASSED" in proc.stdout and "tokens/s" in proc.stdout
    assert 0 <= report["optimized"]["other_cpu_share"] <= 1 and report["optimized"]["step_time_spread"] >= 0
    assert report["speed_trusted"] == (not report["speed_caveats"])
    assert ("not a quiet machine's figures" in proc.stdout) == (not report["speed_trusted"])


# Python imports sitecustomize at start-up: this one scales the model's loss by 1.01 in the optimized
# side's process only (its spec file is named on the worker's command line), as a bug in an optimized
# path would, while the reference side runs the model untouched.
BREAK_OPTIMIZED_LOSS = """
import sys

import trainer.models.llama as llama

forward = llama.Transformer.forward


def scaled(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    optimized_side = any(arg.endswith("/optimized/bench_spec.json") for arg in sys.argv)  # set after start-up
    return out * 1.01 if optimized_side and kwargs.get("labels") is not None else out


llama.Transformer.forward = scaled
"""


@pytest.mark.slow
def test_a_broken_optimized_loss_fails_the_bench(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BREAK_OPTIMIZED_LOSS)
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    proc, report = run_bench(tmp_path, env={"PYTHONPATH": pythonpath})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert report["passed"] is False
    assert report["max_rel_loss_diff"] == pytest.approx(0.01, rel=0.1)
    assert "FAILED" in proc.stdout


@pytest.mark.slow
def test_reference_none_reports_the_optimized_run_alone(tmp_path):
    proc, report = run_bench(tmp_path, "--bench.reference=none", "--bench.profile=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference" not in report and report["passed"] is None
    assert "no eager reference" in report["criterion"] and "no eager reference" in proc.stdout
    assert SIDE_KEYS <= report["optimized"].keys()
    trace = json.loads((tmp_path / "run" / "trace-optimized.json").read_text())
    assert trace["traceEvents"]  # a chrome trace, opened by chrome://tracing or ui.perfetto.dev


# ---------------------------------------------------------------- without subprocesses


def test_the_reference_turns_every_speed_up_off(tmp_path):
    cfg = tiny_config(tmp_path, train__dtype="bf16", train__param_dtype="bf16", kernels__enabled=True)
    if hasattr(cfg, "parallel"):
        cfg.parallel.compile = True
    ref = reference_config(cfg)
    assert (ref.kernels.enabled, ref.train.dtype, ref.train.param_dtype, ref.optim.name) == (
        False,
        "fp32",
        "fp32",
        "adamw",
    )
    if hasattr(ref, "parallel"):
        assert ref.parallel.compile is False and ref.parallel.activation_checkpointing == "none"
    assert cfg.kernels.enabled and cfg.train.dtype == "bf16"  # the configured run is left as it was


def test_the_criterion_follows_what_changed(tmp_path):
    cfg = tiny_config(tmp_path)
    assert loss_changes(cfg, "fp32") == []
    assert loss_changes(cfg, "bf16") == ["bf16 compute"]
    cfg.optim.name = "galore_adamw8bit"
    assert loss_changes(cfg, "fp32") == ["8-bit optimizer states", "GaLore low-rank gradient projection"]

    reference = [4.0, 3.0, 2.0, 1.0]
    early_wobble = [4.2, 3.0, 2.001, 1.001]  # 5% off at step 1, 0.05-0.1% over the last half
    exact = judge(early_wobble, reference, [], 0.0)
    assert not exact["passed"] and exact["max_rel_loss_diff"] == pytest.approx(0.05)
    loose = judge(early_wobble, reference, ["bf16 compute"], 0.0)
    assert loose["passed"] and loose["judged_value"] == pytest.approx((0.0005 + 0.001) / 2)
    assert "last half" in loose["criterion"] and "bf16 compute" in loose["criterion"]
    assert not judge([4.0, 3.0, float("nan"), 1.0], reference, ["bf16 compute"], 0.0)["passed"]
    assert judge(reference, reference, [], 1e-9)["tolerance"] == 1e-9


def test_fp32_holds_the_first_steps_to_rounding_and_the_rest_to_the_curve():
    reference = [8.0 - 0.1 * i for i in range(40)]

    def off(relative):  # the reference, each step moved by relative[i]
        return [r * (1 + d) for r, d in zip(reference, relative)]

    # rounding-level for 14 steps, then amplified to 1e-3-5e-3 (what a loss spike does): passes
    amplified = [1e-7] * 14 + [min(1e-6 * 10**i, 5e-3) for i in range(26)]
    assert judge(off(amplified), reference, [], 0.0)["passed"]
    # a bias of 2e-4 from the first step: the function differs, fails
    assert not judge(off([2e-4] * 40), reference, [], 0.0)["passed"]
    # exact for the first steps, then a curve 5% off: fails
    assert not judge(off([0.0] * 20 + [5e-2] * 20), reference, [], 0.0)["passed"]
    assert not judge(off([0.0] * 39 + [float("nan")]), reference, [], 0.0)["passed"]


def test_throughput_and_mfu_arithmetic():
    assert steady_tokens_per_s([10.0, 1.0, 1.0, 2.0], tokens_per_step=100, warmup_steps=1) == 75.0
    shape = dict(n_params=1000, vocab_size=10, hidden_size=4, n_layers=2, n_heads=3, head_dim=5, tie_embeddings=False)
    assert flops_per_token(shape, seq_len=7) == 6 * (1000 - 40) + 12 * 2 * 3 * 5 * 7
    assert flops_per_token({**shape, "tie_embeddings": True}, seq_len=7) == 6 * 1000 + 12 * 2 * 3 * 5 * 7
    h100 = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "float32_matmul_precision": "highest"}
    assert peak_flops(h100, 0.0)[0] == 989.4e12
    assert peak_flops({**h100, "dtype": "fp32", "float32_matmul_precision": "high"}, 0.0)[0] == 494.7e12
    assert peak_flops({**h100, "device": "NVIDIA H100 PCIe"}, 0.0)[0] == 756.0e12
    assert peak_flops({**h100, "device": "Some GPU"}, 0.0)[0] is None
    assert peak_flops({**h100, "device": "Some GPU"}, 100.0)[0] == 100e12


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bench__warmup_steps": 4}, "leaves no steady steps"),
        ({"bench__peer": "hf-liger"}, "needs a CUDA GPU"),
    ],
)
def test_bench_config_errors(tmp_path, overrides, message):
    cfg = tiny_config(tmp_path, train__max_steps=4, **overrides)
    with pytest.raises(ConfigError, match=message):
        check_bench_config(cfg, "cpu")


def test_other_processes_cpu_time_is_measured_and_the_sides_own_is_not(tmp_path):
    from trainer.bench.machine_load import OTHER_LOAD_LIMIT, OtherLoad, cpu_busy_seconds

    spin = [sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"]
    spinners = [subprocess.Popen(spin) for _ in range(os.cpu_count() or 1)]
    try:
        load = OtherLoad()
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
        busy = load.share()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy > 0.5 > OTHER_LOAD_LIMIT  # every core was spinning for someone else
    # A side that itself keeps a core busy is not "other load": its own CPU time is taken off the
    # machine's, whatever else runs meanwhile. The child's CPU time is read, not assumed: on a busy
    # machine its 1.5 s of spinning gets less than 1.5 s of a core.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy, start, load = cpu_busy_seconds(), time.perf_counter(), OtherLoad()
    subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    share = load.share()
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    whole_machine = (cpu_busy_seconds() - busy) / (elapsed * (os.cpu_count() or 1))
    assert own > 0.2  # the child did spin
    assert share < whole_machine - 0.8 * own / elapsed / (os.cpu_count() or 1)


def test_a_busy_or_jittery_side_makes_the_report_say_its_speed_ratios_cannot_be_trusted():
    from trainer.bench.machine_load import step_spread, untrusted_because
    from trainer.bench.report import format_report

    assert step_spread([1.0, 1.0, 1.0]) == 0 and step_spread([1.0, 3.0]) == pytest.approx(0.5)
    sides = {
        "reference": {"other_cpu_share": 0.02, "step_time_spread": 0.03},
        "optimized": {"other_cpu_share": 0.35, "step_time_spread": 0.40},
    }
    caveats = untrusted_because(sides)
    assert caveats == [
        "other processes used 35% of the CPUs during the optimized run",
        "the optimized run's step times varied by 40% (standard deviation over mean)",
    ]
    assert untrusted_because({"reference": sides["reference"]}) == []
    side = {"losses": [2.0], "tokens_per_s": 10.0, "peak_mem_bytes": 2**20, "dtype": "fp32"}
    report = {
        "env": {"device": "CPU"},
        "steps": 2,
        "warmup_steps": 1,
        "tokens_per_step": 64,
        "reference": {**side, **sides["reference"]},
        "optimized": {**side, **sides["optimized"]},
        "speedup": 1.0,
        "memory_ratio": 1.0,
        "speed_trusted": False,
        "speed_caveats": caveats,
        "passed": None,
        "criterion": "",
        "files": [],
    }
    text = format_report(report)
    assert "other CPU load" in text and "35%" in text
    assert "warning: the tokens/s ratios above are not a quiet machine's figures: other processes used 35%" in text
