"""The released Infinity checkpoints' key lists (2B and 8B transformers,
their tokenizers, flan-t5-xl's encoder; made from the official constructors,
no weights) against our name tables and full-size abstract models."""

import json

import pytest
from mapping_check import check_mapping, shapes_only

from var_jax.convert.infinity import bsq as bsq_convert
from var_jax.convert.infinity import infinity as inf_convert
from var_jax.convert.infinity import t5 as t5_convert
from var_jax.models.abstract import abstract_split
from var_jax.models.infinity import bsq, t5
from var_jax.models.infinity.config import INFINITY_2B, INFINITY_8B
from var_jax.models.infinity.transformer import Infinity


def _entries(golden_dir, name):
  return json.loads((golden_dir / "infinity" / name).read_text())


@pytest.mark.parametrize("name,cfg,params", [
    ("manifest_infinity_2b.json", INFINITY_2B, 2.20e9),
    ("manifest_infinity_8b.json", INFINITY_8B, 8.38e9)])
def test_transformer_tables_cover_the_released_keys(golden_dir, name, cfg,
                                                    params):
  entries = _entries(golden_dir, name)
  assert inf_convert.infer_config(shapes_only(entries)) == cfg
  prefixes = inf_convert.block_prefixes(entries)
  assert len(prefixes) == cfg.depth and prefixes[1] == (
      "block_chunks.0.module.1")
  rules = inf_convert.infinity_rules(cfg, prefixes)
  state = abstract_split(Infinity, cfg)[1]
  check_mapping(rules, entries, state)
  count = sum(x.size for x in __import__("jax").tree.leaves(state))
  assert abs(count - params) / params < 0.01


@pytest.mark.parametrize("name,cfg", [("manifest_vae_2b.json", bsq.BSQ_D32),
                                      ("manifest_vae_8b.json",
                                       bsq.BSQ_D14_PATCHIFY)])
def test_tokenizer_tables_cover_the_released_keys(golden_dir, name, cfg):
  entries = _entries(golden_dir, name)
  read = bsq_convert.infer_config(shapes_only(entries))
  assert (read.codebook_dim, read.ch, read.ch_mult, read.num_res_blocks) == (
      cfg.codebook_dim, cfg.ch, cfg.ch_mult, cfg.num_res_blocks)
  check_mapping(bsq_convert.bsq_rules(cfg), entries,
                abstract_split(bsq.BSQVAE, cfg)[1])


def test_flan_t5_xl_table_covers_the_released_keys(golden_dir):
  entries = _entries(golden_dir, "manifest_flan_t5_xl_encoder.json")
  check_mapping(t5_convert.t5_rules(t5.FLAN_T5_XL), entries,
                abstract_split(t5.T5Encoder, t5.FLAN_T5_XL)[1])


def test_the_8b_files_belong_together():
  from var_jax.convert.infinity.directory import check_parts
  check_parts(INFINITY_8B, bsq.BSQ_D14_PATCHIFY, t5.FLAN_T5_XL)
  check_parts(INFINITY_2B, bsq.BSQ_D32, t5.FLAN_T5_XL)
