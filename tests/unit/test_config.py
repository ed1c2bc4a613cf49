"""Config loading: one-string args, typed overrides, and errors that name key and file."""
import textwrap

import pytest

from rsvl_jax.config import ConfigError, load_config, parse_arg, parse_cli

CONFIG = '''
import ml_collections
from rsvl_jax.config import parse_arg

def get_config(arg=None):
    arg = parse_arg(arg, dataset="rsitmd", baseline=False, demo=False, epochs=10, lr=1e-4)
    c = ml_collections.ConfigDict()
    c.dataset = arg.dataset
    c.baseline = arg.baseline
    c.epochs = 2 if arg.demo else arg.epochs
    c.lr = arg.lr
    c.model = ml_collections.ConfigDict()
    c.model.dim = 512
    c.model.drop = 0.1
    c.model.name = "swin_tiny_224"
    c.model.sizes = (2, 2, 6, 2)
    c.model.extra = None
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    return c
'''


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(textwrap.dedent(CONFIG))
    return path


def test_parse_arg_types_and_bare_flag():
    a = parse_arg("n=3,x=0.5,name=ucm,flag,off=0", n=1, x=1.0, name="a", flag=False, off=True)
    assert (a.n, a.x, a.name, a.flag, a.off) == (3, 0.5, "ucm", True, False)
    assert isinstance(a.n, int) and isinstance(a.x, float)
    assert parse_arg(None, n=1).n == 1 and parse_arg("", n=1).n == 1
    with pytest.raises(ConfigError, match="'n'.*expected int.*'abc'"):
        parse_arg("n=abc", n=1)
    with pytest.raises(ConfigError, match="'n' needs a value"):
        parse_arg("n", n=1)


def test_load_with_args(cfg_file):
    c = load_config(f"{cfg_file}:dataset=rsicd,baseline=True,lr=3e-5")
    assert (c.dataset, c.baseline, c.lr, c.epochs) == ("rsicd", True, 3e-5, 10)
    assert load_config(f"{cfg_file}:demo").epochs == 2
    assert load_config(str(cfg_file)).dataset == "rsitmd"


def test_unknown_arg_names_arg_and_file(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(f"{cfg_file}:datset=rsicd")
    assert "datset" in str(e.value) and str(cfg_file) in str(e.value)


def test_overrides_typed_and_nested(cfg_file):
    c = load_config(str(cfg_file), [
        "--config.model.dim=256", "--config.model.drop=0", "config.baseline=1",
        "model.sizes=(1, 1, 2, 1)", "--config.model.name=tiny", "--config.model.extra=[3, 4]",
        "--config.mesh.fsdp=4",
    ])
    assert c.model.dim == 256 and isinstance(c.model.dim, int)
    assert c.model.drop == 0.0 and isinstance(c.model.drop, float)
    assert c.baseline is True
    assert c.model.sizes == (1, 1, 2, 1) and isinstance(c.model.sizes, tuple)
    assert c.model.name == "tiny" and c.model.extra == [3, 4] and c.mesh.fsdp == 4


def test_override_unknown_key_names_key_and_file(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg_file), ["--config.model.dimm=3"])
    assert "model.dimm" in str(e.value) and str(cfg_file) in str(e.value)
    with pytest.raises(ConfigError, match="nope.dim"):
        load_config(str(cfg_file), ["--config.nope.dim=3"])


def test_override_wrong_type_names_key_type_and_file(cfg_file):
    with pytest.raises(ConfigError) as e:
        load_config(str(cfg_file), ["--config.model.dim=abc"])
    msg = str(e.value)
    assert "model.dim" in msg and "int" in msg and "abc" in msg and str(cfg_file) in msg
    with pytest.raises(ConfigError, match="baseline.*bool"):
        load_config(str(cfg_file), ["--config.baseline=maybe"])
    with pytest.raises(ConfigError, match="group of settings"):
        load_config(str(cfg_file), ["--config.model=3"])


def test_config_is_locked(cfg_file):
    c = load_config(str(cfg_file))
    with pytest.raises(AttributeError):
        c.model.dimm = 3  # a typo in code fails instead of adding a field


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ConfigError, match="not found.*nope.py"):
        load_config(f"{missing}:demo")


def test_parse_cli(cfg_file):
    c, rest = parse_cli(["--config", f"{cfg_file}:demo", "--config.model.dim=64", "--workdir",
                         "/tmp/x"])
    assert c.epochs == 2 and c.model.dim == 64 and rest == ["--workdir", "/tmp/x"]
    c, rest = parse_cli([f"--config={cfg_file}", "--other"])
    assert c.dataset == "rsitmd" and rest == ["--other"]
    with pytest.raises(ConfigError, match="missing --config"):
        parse_cli(["--config.model.dim=3"])
