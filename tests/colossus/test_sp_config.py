"""strategy.sp / strategy.sp_mode: defaults, --set overrides and errors that name the choices."""

import pytest

from colossus import ConfigError, TrainingConfig
from parallel import SP_MODES


def test_sp_options():
    cfg = TrainingConfig()
    assert cfg.strategy.sp == 1 and cfg.strategy.sp_mode == "ring_attention"
    cfg = cfg.with_overrides(["strategy.sp=4", "strategy.sp_mode=ulysses"])
    assert cfg.strategy.sp == 4 and cfg.strategy.sp_mode == "ulysses"
    with pytest.raises(ConfigError, match=r"strategy\.sp: .*greater than or equal to 1"):
        TrainingConfig.from_dict({"strategy": {"sp": 0}})
    with pytest.raises(ConfigError, match=r"strategy\.sp_mode: .*'ring_attention'"):
        TrainingConfig.from_dict({"strategy": {"sp_mode": "ring"}})
    # the schema's choices are the modes parallel.sequence implements
    field = TrainingConfig.model_fields["strategy"].annotation.model_fields["sp_mode"]
    assert set(field.annotation.__args__) == set(SP_MODES)
