"""Tiny OpenCLIP models for tests: one config per kind of image tower (32 px, width 16-64, 1-2 layers), registered
with OpenCLIP and saved from a seeded random initialisation to local weights files. Nothing is downloaded."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY = {  # OpenCLIP model configs: one per kind of image tower
    "thawlab-test-vit": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                                         "head_width": 32}, "text_cfg": TEXT},
    "thawlab-test-rn": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16,
                                                        "head_width": 16}, "text_cfg": TEXT},
    "thawlab-test-timm": {"embed_dim": 32, "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False,
                                                          "timm_pool": "", "timm_proj": "linear", "image_size": 32},
                          "text_cfg": TEXT},
}
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a drawing of a {}.", "the digit {}"]
PROMPTS = [f"data.classnames=[{','.join(NAMES)}]", "data.templates=['a photo of the number {}.','a drawing of a {}.']"]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict[str, str]:
    """{model name: a local weights file of it, from a seeded random initialisation}, the configs registered."""
    folder = tmp_path_factory.mktemp("clip")
    for name, cfg in TINY.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    files = {}
    for name in TINY:
        torch.manual_seed(0)
        model = open_clip.create_model(name)
        with torch.no_grad():  # a logit scale other than the init's: the head must use the model's own
            model.logit_scale.fill_(2.5)
        files[name] = str(folder / f"{name}.pt")
        torch.save(model.state_dict(), files[name])
    return files


