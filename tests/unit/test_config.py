"""Config resolution: defaults <- YAML <- --set <- flags; unknown keys rejected by dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from specctl.config import parse_size, resolve, save_config
from specctl.errors import ConfigError

pytestmark = pytest.mark.unit


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    bf16: bool = False
    layers: list[int] | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_overrides_flags_in_order(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    cfg = resolve(Cfg, y, ["optim.lr=3e-4", "bf16=true", "layers=1,2,3"], steps=30, name=None)
    assert cfg.steps == 30
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.bf16 is True
    assert cfg.layers == [1, 2, 3]
    assert cfg.name == "run"


def test_unknown_key_is_named_by_dotted_path() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        resolve(Cfg, None, ["optim.lrr=1"])


def test_type_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="steps"):
        resolve(Cfg, None, ["steps=many"])
    with pytest.raises(ConfigError, match="override"):
        resolve(Cfg, None, ["steps"])


def test_bad_yaml_is_one_line_error(tmp_path: Path) -> None:
    y = tmp_path / "bad.yaml"
    y.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(Cfg, y)
    with pytest.raises(ConfigError, match="not found"):
        resolve(Cfg, tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path: Path) -> None:
    import json

    cfg = resolve(Cfg, None, ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["optim"]["lr"] == 0.5


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(ConfigError):
        parse_size("lots")
