"""The built wheel carries conf/: thawlab-train finds its configs from a wheel, not only from the checkout."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_configs_and_the_app_finds_them(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    wheel = next(dist.glob("thawlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for group in ("schedule", "head", "data", "logger", "trainer", "debug"):
        assert any(n.startswith(f"thawlab/conf/{group}/") for n in names), group
    assert "thawlab/conf/config.yaml" in names

    # Unpacked ahead of the editable install on sys.path, so `thawlab` is the wheel's copy; run from a
    # directory without conf/ so nothing but the package can supply the configs.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import sys, thawlab.train as t; print(t.__file__); print(t.conf_dir()); "
            "sys.argv = ['thawlab-train', '--cfg', 'job', 'schedule=gradual', 'head=cosine']; t.main()")
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    module_file, conf, *rest = r.stdout.splitlines()
    assert Path(module_file).is_relative_to(site) and Path(conf) == site / "thawlab" / "conf"
    cfg = OmegaConf.create("\n".join(rest))
    assert cfg.schedule.name == "gradual" and cfg.head._target_ == "thawlab.heads.CosineHead"
