"""Configs load and validate; user mistakes give clear errors; languages and expert maps."""

import collections
import glob
import math
import os

import pytest

from apollo_jax import config as cfg
from apollo_jax import languages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(name, arg=None):
  return cfg.load(f"{name}:{arg}" if arg else name)


def test_all_four_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {"tiny", "apollo_moe_0p5b", "apollo_2b", "apollo_moe_7b"} <= names


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("arg", [None, "routing=topk", "routing=language,expert_map=major12",
                                 "moe_layers=all", "moe_layers=none", "moe_layers=last:4",
                                 "expert_map=lang50"])
def test_config_loads_and_validates(path, arg):
  c = load(os.path.basename(path)[:-3], arg)
  cfg.validate(c, num_devices=math.prod(s for s in c.mesh.values() if s > 0))   # fewest devices
  cfg.validate(c, num_devices=8)


def test_ablation_args_change_fields():
  c = load("apollo_moe_7b", "routing=language,moe_layers=last:3,expert_map=major12")
  assert (c.moe.routing, c.moe.num_experts, c.moe.top_k, c.moe.shared_expert) == ("language", 12, 1, True)
  assert cfg.moe_layer_indices(c.moe.layers, c.model.num_layers) == (25, 26, 27)
  assert cfg.moe_layer_indices("3;7", 8) == (3, 7)


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="unknown config argument 'routnig'"):
    load("tiny", "routnig=topk")


@pytest.mark.parametrize("field,value,match", [
    ("moe.routing", "hybird", "moe.routing='hybird'"),
    ("moe.expert_map", "family8", "moe.expert_map"),
    ("moe.layers", "last:99", "N must be in"),
    ("moe.layers", "first:2", "expected 'last:N'"),
    ("moe.top_k", 9, "moe.top_k=9"),
    ("moe.num_experts", 8, "needs moe.num_experts=7"),
    ("model.num_kv_heads", 3, "multiple of model.num_kv_heads"),
    ("data.packing", "greedy", "data.packing"),
    ("grad_accum", 3, "divisible by grad_accum"),
    ("model.dtype", "fp8", "model.dtype"),
    # numbers accepted before and wrong or fatal later (config.RANGES)
    ("optim.lr", -1e-4, r"optim.lr=-0.0001 is out of range: it must be in \[0, inf\)"),
    ("optim.lr", float("nan"), r"optim.lr=nan must be a finite number"),
    ("optim.clip", -1.0, r"optim.clip=-1.0 is out of range"),
    ("ckpt.keep", 0, r"ckpt.keep=0 is out of range: it must be in \[1, inf\)"),
    ("ckpt.every", 0, r"ckpt.every=0 is out of range"),
    ("log_every", -5, r"log_every=-5 is out of range"),
    ("data.seq_len", 0, r"data.seq_len=0 is out of range"),
    ("global_batch", 0, r"global_batch=0 is out of range"),
    ("steps", 0, r"steps=0 is out of range"),
    ("optim.warmup_ratio", 1.0, r"optim.warmup_ratio=1.0 is out of range: it must be in \[0, 1\)"),
    ("model.num_layers", 0, r"model.num_layers=0 is out of range"),
])
def test_bad_config_is_a_clear_error(field, value, match):
  c = load("tiny")
  section, _, name = field.rpartition(".")
  (c[section] if section else c)[name] = value
  with pytest.raises(ValueError, match=match):
    cfg.validate(c)


MESH_ERRORS = {   # name: (mesh, moe.expert_multiple, global_batch, message); on 8 devices
    "fill_does_not_fit": (dict(data=3, fsdp=-1), 0, None, "does not fit 8 devices"),
    "too_few_devices": (dict(data=2, fsdp=2, expert=1, tensor=1), 0, None, "4 devices but 8 are available"),
    "two_fills": (dict(data=-1, fsdp=-1), 0, None, "at most one -1"),
    "experts_not_divisible": (dict(data=1, fsdp=1, expert=8, tensor=1), 7, None,   # 7 experts, no padding
                              "does not divide the 7 padded experts"),
    "batch_not_divisible": (dict(data=1, fsdp=1, expert=8, tensor=1), 0, 4,
                            "must be divisible by data\\*fsdp\\*expert"),
}


@pytest.mark.parametrize("case", sorted(MESH_ERRORS))
def test_mesh_errors(case):
  mesh, multiple, batch, match = MESH_ERRORS[case]
  c = load("tiny")
  c.mesh.update(mesh)
  c.moe.expert_multiple = multiple
  if batch:
    c.global_batch = batch
  with pytest.raises(ValueError, match=match):
    cfg.validate(c, 8)


def test_experts_pad_to_the_expert_axis_by_default():
  c = load("tiny")
  c.mesh.update(data=1, fsdp=1, expert=8, tensor=1)
  assert cfg.padded_num_experts(c) == 8
  cfg.validate(c, 8)


def test_mesh_fill():
  c = load("tiny")
  c.mesh.update(data=2, fsdp=-1, expert=2, tensor=1)
  assert cfg.mesh_shape(c, 8) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}


def test_capacity_formula():
  assert cfg.capacity(64, 7, 2, 1.0, 4) == 19          # ceil(1.0 * 64 * 2 / 7) = ceil(18.29)
  assert cfg.capacity(64, 8, 2, 1.25, 4) == 20         # ceil(1.25 * 16)
  assert cfg.capacity(8, 8, 1, 1.0, 4) == 4            # floored at min_capacity
  assert cfg.capacity(3, 8, 1, 1.0, 4) == 3            # never more than the group
  assert cfg.capacity(64, 7, 2, 0.0, 4) == 64          # cf <= 0: no drop


def test_languages_tables():
  assert len(languages.CODES) == 50 and len(set(languages.CODES)) == 50
  assert len(languages.MAJOR) == 12 and len(languages.MINOR) == 38
  sizes = collections.Counter(languages.family(c) for c in languages.CODES)
  assert [sizes[i] for i in range(7)] == [1, 3, 3, 5, 27, 4, 7]          # the original's family sizes
  assert languages.family_name("ne") == "Altaic" and languages.family_name("doi") == "Austronesian"
  assert languages.family_name("gn") == "Indo-European" and languages.family_name("ckb") == "Afro-Asian"
  m12 = languages.expert_map("major12")
  assert [m12[languages.index(c)] for c in ("ar", "de", "en", "zh")] == [0, 1, 2, 11]
  assert m12[languages.index("sw")] == -1
  assert list(languages.expert_map("lang50")) == list(range(50))
  assert languages.language_of_source("medicalBook_en_qa") == "en"
  assert languages.language_of_source("general_ckb") == "ckb"


def test_unknown_language_lists_known_codes():
  with pytest.raises(ValueError, match=r"unknown language code 'xx'; known codes: en, zh"):
    languages.index("xx")
  with pytest.raises(ValueError, match="unknown language code 'xx'"):
    languages.language_of_source("general_xx")
