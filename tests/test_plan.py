"""`var-jax plan`: TPU slices by Cloud name, meshes on a torus, remat, and
the train step and sampler compiled for TPU topologies without a TPU.

The compile-only cases (marked slow; CI installs the `tpu` extra and runs
them) use the tiny preset on 8-chip slices.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_models import small_var

from var_jax import cli, hardware
from var_jax.errors import UserError
from var_jax.planning import topology

# libtpu on this host only compiles (what the command line sets too).
for _k, _v in topology.COMPILE_ONLY_ENV.items():
  os.environ.setdefault(_k, _v)

FIELDS = {"topology", "chips", "hbm_per_chip_bytes", "argument_bytes",
          "temp_bytes", "output_bytes", "peak_bytes", "fits",
          "flops_per_step", "model_flops_per_step", "compiler_seconds",
          "compiler_seconds_is_estimate", "images_per_second", "mfu"}


def _plan(capsys, *argv):
  code = cli.main(["plan", *argv])
  out = capsys.readouterr()
  return code, out.out.strip().splitlines(), out.err.strip()


@pytest.mark.parametrize("name,topo,chips", [
    ("v4-32", "v4:2x2x4", 16), ("v5p-128", "v5p:4x4x4", 64),
    ("v5e-256", "v5e:16x16", 256), ("v6e-64", "v6e:8x8", 64),
    ("v5litepod-16", "v5e:4x4", 16), ("v5e:2x4", "v5e:2x4", 8),
    ("V5P-8", "v5p:2x2x1", 4)])
def test_cloud_names_map_to_topologies(name, topo, chips):
  s = topology.parse(name)
  assert (s.topology_name, s.chips) == (topo, chips)
  assert topology.parse(name, slices=2).chips == 2 * chips


@pytest.mark.parametrize("name,needle", [
    ("v5p-100", "v5p names count TensorCores, two per chip"),
    ("v5p-129", "known sizes: v5p-8,"),
    ("v7x-8", "unknown TPU topology 'v7x-8'"),
    ("v5e:2x2x2", "v5e slices are 2-D"), ("v5e:3x3", "v5e:2x4, v5e:4x4"),
    ("v5e:16x32", "v5e slices are 2-D shapes Cloud provisions"),
    ("tpu", "expected a Cloud name")])
def test_bad_topology_names_are_one_line(name, needle):
  with pytest.raises(UserError, match=None) as e:
    topology.parse(name)
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,need,have", [
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
     "in memory space hbm. Used 95.78G of 95.73G hbm. Exceeded hbm capacity "
     "by 49.75M.", 95.78, 95.73),
    ("RESOURCE_EXHAUSTED: CompileTimeHbmOom: HLO temporaries (506.28G) "
     "exceeds available HBM (95.73G)", 506.28, 95.73)])
def test_both_compiler_out_of_memory_wordings_are_read(text, need, have):
  from var_jax.planning import programs
  oom = programs._oom(RuntimeError(text))  # pylint: disable=protected-access
  assert (oom.needed, oom.available) == (need * 2 ** 30, have * 2 ** 30)


@pytest.mark.parametrize("argv,needle", [
    (["--global-batch", "8000000000000"], "more than a program can index"),
    (["--sample", "--batch", "80000000000"], "more than a program can index"),
])
def test_absurd_batches_are_one_line(capsys, argv, needle):
  code, _, err = _plan(capsys, "--topology", "v5e-8", "--preset", "tiny",
                       *argv)
  assert code == 2 and needle in err and "\n" not in err


def test_missing_libtpu_is_one_line(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                      if name == "libtpu" else real(name, *a))
  assert cli.main(["plan", "--topology", "v5e-8", "--preset", "tiny"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == ("var-jax plan: error: compiling for a TPU topology needs "
                 "the TPU compiler: pip install libtpu (from a checkout: pip "
                 "install '.[tpu]')")


@pytest.mark.parametrize("argv,needle", [
    (["--sample", "--remat", "dots"], "--remat only applies to the train step"),
    (["--sample", "--global-batch", "16", "--mesh", "data=8,fsdp=1"],
     "--global-batch, --mesh only apply to the train step"),
    (["--batch", "16"], "--batch only applies to the sampler (--sample)"),
    (["--infinity", "2b"], "--infinity only applies to the sampler"),
    (["--sample", "--infinity", "2b"], "--preset only applies to VAR"),
    (["--sample", "--resolution", "512"],
     "--resolution only applies to --infinity")])
def test_flags_of_the_other_plan_are_refused(capsys, argv, needle):
  code, lines, err = _plan(capsys, "--topology", "v5e-8", "--preset", "tiny",
                           *argv)
  assert code == 2 and not lines and "\n" not in err, err
  assert needle in err, err


def test_a_config_that_fails_is_one_line(capsys, tmp_path):
  bad = tmp_path / "raises.py"
  bad.write_text("def get_config():\n  raise RuntimeError('no such data')\n")
  code, lines, err = _plan(capsys, "--topology", "v5e-8", "--preset",
                           str(bad))
  assert code == 2 and not lines, err
  assert err == (f"var-jax plan: error: config {bad}: get_config() failed: "
                 "RuntimeError: no such data")


def test_cpu_commands_do_not_start_an_absent_tpu(tmp_path):
  # With libtpu installed and no TPU attached, the command line leaves the
  # TPU runtime out: nothing on stderr, and the CPU backend.
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("the tests need the tpu extra: pip install -e '.[test,tpu]'")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = textwrap.dedent("""
      from var_jax import cli, hardware
      cli._leave_out_absent_tpu()
      import jax
      print(jax.default_backend(), len(jax.devices()))
  """)
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                     capture_output=True, text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["cpu", "1"]
  assert r.stderr == ""


@pytest.mark.slow  # Three gradient programs in one compile.
def test_remat_changes_memory_not_values():
  var = small_var()
  from flax import nnx
  graph, params = nnx.split(var)
  b, cfg = 3, var.cfg
  labels = jnp.arange(b) % cfg.num_classes
  x = jax.random.normal(jax.random.key(1), (b, cfg.seq_len - cfg.first_l,
                                            cfg.cvae))

  def loss(p, how):
    logits = nnx.merge(graph, p)(labels, x, remat=how,
                                 dropout_key=jax.random.key(2))
    return jnp.mean(jax.nn.logsumexp(logits, -1))

  # One program: the reference and both remat settings.
  ref, *got = jax.jit(lambda p: [jax.value_and_grad(loss)(p, how) for how in
                                 ("none", "dots", "block")])(params)
  for value, grads in got:
    np.testing.assert_allclose(value, ref[0], rtol=1e-6)
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(ref[1])):
      np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------ compile-only

@pytest.mark.parametrize("name", ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
def test_device_kinds_get_their_generations_peak(name):
  # What the trainer and benchmarks divide by on a real TPU: the kind each
  # generation's devices report ("TPU v5" is a v5p, "TPU v5 lite" a v5e).
  slice_ = topology.parse(name)
  dev = topology.devices(slice_)[0]
  assert hardware.device_peak(dev, "bfloat16") == slice_.chip.peak_bf16


def test_fsdp_ways_that_do_not_divide_the_width_are_a_warning():
  # d30 is 1,920 wide: fsdp=256 cannot split its weights, fsdp=128 can.
  from var_jax.models.var.config import get_preset
  from var_jax.training import mesh as mesh_lib
  from var_jax.training.trainer import unsplit_warning
  devs = topology.devices(topology.parse("v5e-256"))
  cfg = get_preset("d30").var
  whole = unsplit_warning(cfg, mesh_lib.make_mesh("data=1,fsdp=256", devs))
  assert len(whole) == 1 and "stay whole on every device" in whole[0]
  assert "width 1920" in whole[0] and "GiB" in whole[0]
  assert unsplit_warning(cfg, mesh_lib.make_mesh("data=2,fsdp=128",
                                                 devs)) == []


def test_mesh_splits_torus_axes():
  # 8 x 8 over a 4x4x4 torus: an axis spans parts of physical axes.
  from var_jax.training import mesh as mesh_lib
  devs = topology.devices(topology.parse("v5p-128"))
  m = mesh_lib.make_mesh("data=8,fsdp=8", devs)
  assert dict(m.shape) == {"data": 8, "fsdp": 8}
  assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in devs)


@pytest.mark.slow  # Compiles the tiny train step for TPU twice.
def test_train_plan_prints_a_table_and_every_field(capsys):
  code, lines, err = _plan(capsys, "--topology", "v5e-8", "--preset", "tiny",
                           "--global-batch", "16")
  assert code == 0, err
  rec = json.loads(lines[-1])
  assert FIELDS <= set(rec), FIELDS - set(rec)
  assert rec["fits"] and rec["chips"] == 8 and rec["attention"] == "splash"
  assert rec["unsplit_weight_bytes"] == 0
  assert rec["hbm_per_chip_bytes"] == 16 * 2 ** 30
  # The loop-unrolled count and the analytic one agree within the work the
  # model count leaves out (norms, softmax, the optimizer).
  assert 0.9 < rec["flops_per_step"] / rec["model_flops_per_step"] < 1.5
  assert rec["compiler_seconds"] is None or rec["compiler_seconds"] > 0
  assert (rec["compiler_seconds"] is None) == bool(
      rec["compiler_seconds_null_reason"])
  assert lines[0].startswith("plan ") and any(
      ln.startswith("peak ") for ln in lines)


_WIDE = """
from var_jax.configs.models import DIGITS_VAE
from var_jax.models.var.config import ModelConfig, VARConfig
from var_jax.training.config import TrainConfig


def get_config():
  var = VARConfig(depth=2, embed_dim=512, num_heads=8, num_classes=10,
                  vocab_size=512, cvae=16, patch_nums=(1, 2, 3, 4))
  return TrainConfig(model=ModelConfig("wide", DIGITS_VAE, var),
                     global_batch=16, dtype="bfloat16")
"""


def _wide_config(tmp_path) -> str:
  """A config file of a 512-wide model (TPU tiling pads small arrays, which
  would blur per-chip byte counts)."""
  path = tmp_path / "wide.py"
  path.write_text(_WIDE)
  return str(path)


@pytest.mark.slow  # Compiles a small train step for TPU twice.
def test_fsdp_shards_the_state(capsys, tmp_path):
  # Per chip, the arguments hold the replicated tokenizer and 1/8 of every
  # parameter and moment that fsdp splits (a 512-wide model: TPU tiling
  # pads small arrays, which would blur the count).
  from var_jax.training import mesh as mesh_lib
  from var_jax.training import optimizer as opt_lib
  from var_jax.training import state as state_lib
  from var_jax.training.config import TrainConfig, load_config
  cfg_file = _wide_config(tmp_path)
  args = {}
  for mesh in ("data=8,fsdp=1", "data=1,fsdp=8"):
    code, lines, err = _plan(capsys, "--topology", "v5e-8", "--preset",
                             cfg_file, "--mesh", mesh, "--no-flop-count")
    assert code == 0, err
    args[mesh] = json.loads(lines[-1])["argument_bytes"]
  var = load_config(cfg_file, TrainConfig).model_config().var
  m = mesh_lib.make_mesh("data=1,fsdp=8",
                         topology.devices(topology.parse("v5e-8")))
  spec = state_lib.var_state_spec(var, opt_lib.make_optimizer(var), m)
  whole = shard = 0
  for x, sh in zip(jax.tree.leaves(spec.abstract),
                   jax.tree.leaves(spec.shardings)):
    nbytes = x.size * x.dtype.itemsize
    whole += nbytes
    shard += nbytes // (8 if "fsdp" in str(sh.spec) else 1)
  saved = args["data=8,fsdp=1"] - args["data=1,fsdp=8"]
  assert shard < 0.2 * whole
  assert abs(saved - (whole - shard)) <= 0.02 * whole, (saved, whole, shard)


def test_a_step_that_does_not_fit_is_one_line(capsys):
  # The compiler gives up at buffer assignment: seconds.
  code, lines, err = _plan(capsys, "--topology", "v5e:1x1", "--preset",
                           "tiny", "--global-batch", "262144",
                           "--no-flop-count")
  assert code == 1 and not lines
  assert "\n" not in err and err.startswith("var-jax plan: error: "), err
  assert "GiB per chip of 15.8 GiB (short by" in err, err
  assert "--remat block" in err and "--grad-accum 2" in err, err


@pytest.mark.slow  # Compiles the tiny sampler for TPU.
def test_sample_plan_compiles_the_sampler(capsys):
  code, lines, err = _plan(capsys, "--sample", "--topology", "v6e-8",
                           "--preset", "tiny", "--batch", "16")
  assert code == 0, err
  rec = json.loads(lines[-1])
  assert FIELDS <= set(rec) and rec["kind"] == "sample" and rec["fits"]
  assert rec["mesh"] == "data=8,fsdp=1"
  assert 0.8 < rec["flops_per_step"] / rec["model_flops_per_step"] < 1.5


@pytest.mark.slow  # Compiles a small train step for TPU twice.
def test_accumulation_saves_memory_on_a_sharded_mesh(capsys, tmp_path):
  # Half the micro-batch: fewer activations live at once, and the gradient
  # sum stays sharded like the parameters (not whole on every chip).
  cfg_file = _wide_config(tmp_path)
  peak = {}
  for accum in ("1", "2"):
    code, lines, err = _plan(capsys, "--topology", "v5e-8", "--preset",
                             cfg_file, "--global-batch", "1024",
                             "--grad-accum", accum, "--no-flop-count")
    assert code == 0, err
    rec = json.loads(lines[-1])
    assert rec["grad_accum"] == int(accum)
    peak[accum] = rec["peak_bytes"]
  assert peak["2"] < 0.7 * peak["1"], peak


@pytest.mark.slow  # Compiles a tiny text encoder and Infinity sampler twice.
def test_infinity_plan_holds_both_models_weights():
  # The golden set's shapes with a patchifying tokenizer, 256 px: each
  # program is compiled with the other's weights resident, so the record's
  # arguments hold both; bfloat16 halves the block matrices; the unrolled
  # blocks give the compiler's FLOP count, near the analytic one.
  from var_jax.models.infinity.bsq import BSQConfig
  from var_jax.models.infinity.config import InfinityConfig
  from var_jax.models.infinity.t5 import T5Config
  from var_jax.planning import plan
  cfgs = (InfinityConfig(depth=2, embed_dim=128, num_heads=2,
                         text_channels=256, codebook_dim=16, text_maxlen=64),
          BSQConfig(codebook_dim=4, ch=32, ch_mult=(1, 1, 1, 1),
                    num_res_blocks=1, spatial_patchify=True),
          T5Config(vocab_size=256, d_model=256, d_kv=64, d_ff=512,
                   num_layers=2, num_heads=4))
  slice_ = topology.parse("v6e-8", 1)
  recs = {dt: plan.plan_infinity_sampling(
      slice_, cfgs, batch=8, dtype=dt, resolution=256, text_len=32)
      for dt in ("float32", "bfloat16")}
  f32, bf16 = recs["float32"], recs["bfloat16"]
  assert f32["fits"] and f32["resolution"] == "256x256"
  # The block matrices (2 blocks) and the T5 layers' (2 layers).
  matrices = (2 * (8 * 128 ** 2 + 2 * 128 * 512)
              + 2 * (4 * 256 ** 2 + 3 * 256 * 512))
  assert f32["argument_bytes"] > 4 * matrices
  assert bf16["argument_bytes"] <= f32["argument_bytes"] - 2 * matrices
  ratio = f32["flops_per_step"] / f32["model_flops_per_step"]
  assert 0.8 < ratio < 1.6, ratio
  assert f32["compiler_seconds_is_estimate"]
