import math

import pytest

from trainer.config import TrainConfig, load_config, to_toml
from trainer.errors import ConfigError
from trainer.optim.schedule import lr_factor


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nmax_steps = 7\nseq_len = 64\n[optim]\nbetas = [0.9, 0.99]\nname = "adamw"\n')
    cfg = load_config(path, ["--train.seq_len=32", "optim.lr=1e-4", "--kernels.enabled=false"])
    assert (cfg.train.max_steps, cfg.train.seq_len, cfg.optim.lr) == (7, 32, 1e-4)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.kernels.enabled is False


def test_effective_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ["--model.n_layers=3", '--data.path=a b\\c"d', "--optim.betas=0.8,0.9"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert load_config(path) != TrainConfig()


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nmax_step = 3\n", "did you mean train.max_steps?"),
        ("[trian]\nmax_steps = 3\n", "unknown config key 'trian.max_steps'; did you mean train.max_steps?"),
        ('[train]\nmax_steps = "x"\n', "train.max_steps='x' is not valid: expected an integer"),
        ("[train]\nmax_steps = 2.5\n", "expected an integer"),
        ('[train]\ndtype = "float16"\n', "choose one of: auto, fp32, bf16, fp16"),
        ("[train\n", "is not valid TOML"),
        ("[train]\nmicro_batch_size = 0\n", "train.micro_batch_size must be > 0"),
        ('[train]\nparam_dtype = "bf16"\ndtype = "fp16"\n', "train.param_dtype=bf16 needs train.dtype=bf16"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(path)


def test_override_needs_a_value():
    with pytest.raises(ConfigError, match="needs the form --section.key=value"):
        load_config(None, ["--train.max_steps"])


def test_warmup_then_cosine():
    f = [lr_factor(s, 100, 10, "cosine", 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_constant_and_wsd():
    lin = [lr_factor(s, 21, 0, "linear", 0.0, 0.2) for s in range(21)]
    assert lin[0] == 1.0 and lin[10] == pytest.approx(0.5) and lin[20] == pytest.approx(0.0)
    assert {lr_factor(s, 50, 5, "constant", 0.1, 0.2) for s in range(5, 50)} == {1.0}
    wsd = [lr_factor(s, 100, 10, "wsd", 0.0, 0.2) for s in range(100)]
    assert set(wsd[10:80]) == {1.0}
    assert wsd[99] == pytest.approx(0.0) and wsd[90] == pytest.approx(1 - 10 / 19)
