"""`var-jax bench sample` and the shared sampling FLOP counts."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from var_jax import cli
from var_jax.models.abstract import abstract_split
from var_jax.models.var.config import get_preset
from var_jax.models.var.vqvae import VQVAE
from var_jax.sampling import flops

KEYS = {"bench", "impl", "preset", "batch", "dtype", "scale_loop",
        "layer_loop", "cpu_tuning",
        "cfg", "top_k",
        "top_p", "device", "compile_s", "batch_s", "s_per_img", "img_per_s",
        "transformer_tflop_per_img", "decoder_tflop_per_img",
        "achieved_tflop_per_s", "mfu"}


@pytest.mark.slow  # End to end: compiles and times a sampler.
def test_bench_sample_prints_one_json_line(capsys):
  assert cli.main(["bench", "sample", "--preset", "tiny", "--batch", "1",
                   "--random-init", "--iters", "1", "--scale-loop", "scan",
                   "--layer-loop", "scan", "--no-matmul-peak"]) == 0
  out = capsys.readouterr().out
  lines = out.strip().splitlines()
  assert len(lines) == 1, out
  rec = json.loads(lines[0])
  assert KEYS <= set(rec), KEYS - set(rec)
  assert rec["bench"] == "sample" and rec["batch"] == 1
  assert rec["preset"] == "tiny" and rec["scale_loop"] == "scan"
  assert rec["layer_loop"] == "scan"
  assert (rec["cfg"], rec["top_k"], rec["top_p"]) == (1.5, 900, 0.96)
  assert rec["img_per_s"] > 0 and rec["compile_s"] > 0


@pytest.mark.parametrize("what,preset", [("sample", "nope"),
                                         ("train", "vqvae")])
def test_bench_bad_preset_is_one_line_error(what, preset, capsys):
  rc = cli.main(["bench", what, "--preset", preset, "--random-init"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1, err
  assert preset in err[0] and "error" in err[0]


def test_d16_flops_match_hand_count():
  cfg = get_preset("d16")
  # 2 rows x 680 tokens x 16 layers x 2 x 12.6M weights ~ 548 GFLOP of
  # linears, plus attention, head, AdaLN and word_embed.
  t = flops.var_sample_flops(cfg.var)
  assert 0.59e12 < t < 0.61e12, t
  assert flops.var_sample_flops(get_preset("d20").var) > t


@pytest.mark.parametrize("fn,method", [
    (flops.decoder_flops, "decode"), (flops.tokenizer_flops, "img_to_idx")])
def test_vae_flops_match_xla_cost_analysis(fn, method):
  cfg = get_preset("tiny").vae
  gd, ab = abstract_split(VQVAE, cfg)
  side = cfg.v_patch_nums[-1] if method == "decode" else cfg.resolution
  ch = cfg.z_channels if method == "decode" else 3
  x = jax.ShapeDtypeStruct((1, side, side, ch), jnp.float32)
  cost = jax.jit(lambda s, x: getattr(nnx.merge(gd, s), method)(x)).lower(
      ab, x).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  if not cost or "flops" not in cost:
    pytest.skip("no XLA cost analysis on this backend")
  # XLA also counts elementwise work; the analytic count is matmuls/convs.
  assert abs(fn(cfg) / cost["flops"] - 1) < 0.05, (fn(cfg), cost["flops"])


def test_code_and_cfg_until_flops():
  d16, d30 = get_preset("d16").var, get_preset("d30").var
  full = flops.var_sample_flops(d30)
  # Without guidance every scale runs one row instead of two (word_embed,
  # once per sample either way, is the small rest).
  assert 0.49 < flops.var_sample_flops(d30, cfg_until=0) / full < 0.51
  # The drafter's share of the scales plus the refiner's prefill and tail.
  vae = get_preset("d30").vae
  by_n = [flops.sample_flops(d16, vae, drafter=d30, draft_steps=n)
          ["transformer"] for n in range(1, 10)]
  assert flops.var_sample_flops(d16) < by_n[0] and by_n[-1] < full
  assert by_n == sorted(by_n)  # More drafted scales, more work.
  # N = K - 1 with the drafter as its own refiner: the plain count plus the
  # refiner's recomputation of scales 0..K-2 (no heads) at its last scale.
  same = flops.sample_flops(d30, vae, drafter=d30, draft_steps=9)
  assert same["transformer"] > full
