from dataclasses import FrozenInstanceError, dataclass, fields, replace
from pathlib import Path

import pytest

from dinodiff.config import (
    PRESET_DIR,
    ConfigError,
    TrainingSettings,
    load_training_settings,
    save_config,
    settings_dataclass,
    with_overrides,
)


@dataclass(frozen=True)
class _Section:
    size: int = 3


@settings_dataclass
class _Stage:
    name: str
    first: _Section
    second: _Section
    third: _Section = _Section(size=7)


def test_a_section_without_a_default_gets_its_own_defaults_and_the_rest_stays_a_frozen_dataclass():
    stage = _Stage(name="x")
    assert stage.first == _Section() and stage.third == _Section(size=7)
    assert stage.first is not stage.second  # one instance per field, as default_factory gives
    assert [f.name for f in fields(_Stage)] == ["name", "first", "second", "third"]
    with pytest.raises(TypeError):
        _Stage()  # a plain field without a default stays required
    with pytest.raises(FrozenInstanceError):
        stage.first = _Section(size=1)  # type: ignore[misc]


@pytest.mark.parametrize("preset", ["tiny", "cpu-small", "sd15-dinov1", "sd15-dinov2"])
def test_every_preset_loads_and_validates(preset):
    cfg = load_training_settings(preset)
    assert cfg.model.resolution % 8 == 0
    assert cfg.train.max_steps > 0


def test_paper_presets_follow_the_paper_protocol():
    paper = [("sd15-dinov1", "facebook/dino-vitb16"), ("sd15-dinov2", "timm/vit_base_patch14_reg4_dinov2.lvd142m")]
    for preset, encoder in paper:
        cfg = load_training_settings(preset)
        assert cfg.model.encoder.name_or_path == encoder
        assert (cfg.model.noise.beta_start, cfg.model.noise.beta_end) == (0.00085, 0.012)
        assert cfg.model.noise.beta_schedule == "scaled_linear" and cfg.model.noise.prediction_type == "epsilon"
        assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 1000 and cfg.optim.lr_schedule == "constant_with_warmup"
        assert cfg.train.batch_size * 4 * cfg.train.grad_accum == 512  # 64 per GPU x 4 GPUs x 2
        assert cfg.train.checkpoint_every == 2500 and cfg.train.cond_dropout == 0


def test_dotted_overrides_apply_with_types():
    cfg = load_training_settings("tiny", ["optim.lr=2e-4", "train.max_steps=7", "model.encoder.tokens=[cls,pooler]"])
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.train.max_steps == 7
    assert list(cfg.model.encoder.tokens) == ["cls", "pooler"]


@pytest.mark.parametrize("override, fragment", [
    ("train.max_stepz=3", "max_stepz"),
    ("train.max_steps=many", "max_steps"),
    ("model.autoencoder.kind=jpeg", "model.autoencoder.kind"),
    ("nonsense", "key=value"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
    ("train.sample_every=-1", "train.sample_every=-1 must be >= 0"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_training_settings("tiny", [override])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cpu-small"):
        load_training_settings("no-such-preset")


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_training_settings("cpu-small", ["train.seed=5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_training_settings(tmp_path / "config.yaml")
    assert isinstance(again, TrainingSettings) and again == cfg


def test_training_settings_are_frozen_and_derived_by_overrides():
    cfg = load_training_settings("tiny", ["train.max_steps=7"])
    with pytest.raises(FrozenInstanceError):
        cfg.train.max_steps = 9  # type: ignore[misc]  # one object per run: a change makes a new one
    derived = with_overrides(cfg, ["train.max_steps=9", "data.cache=somewhere"])
    assert (derived.train.max_steps, derived.data.cache) == (9, "somewhere")
    assert derived == replace(cfg, train=replace(cfg.train, max_steps=9), data=replace(cfg.data, cache="somewhere"))
    assert cfg.train.max_steps == 7  # the original is untouched
    with pytest.raises(ConfigError, match="max_steps"):
        with_overrides(cfg, ["train.max_steps=many"])  # checked like a preset's overrides


def test_top_level_configs_folder_is_the_package_presets():
    top = Path(__file__).resolve().parents[1] / "configs"
    assert sorted(p.name for p in top.glob("*.yaml")) == sorted(p.name for p in PRESET_DIR.glob("*.yaml"))
