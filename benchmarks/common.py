"""Shared by the benchmarks: thawlab's real config, composed as `thawlab-train` would."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from thawlab import config
from thawlab.train import conf_dir

sys.path.insert(0, str(Path(__file__).parent))


def compose_cfg(overrides: list[str]):
    config.register()
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        return compose("config", overrides=["logger=none", *overrides])
