"""`var-jax train-vae`: the tokenizer run, its resume, its pieces and errors.

One 8-step run of `train_vae_tiny` (16px digits) is the reference: its loss
must fall, a run SIGKILLed mid-save and resumed must repeat it bit for bit,
and its exported tokenizer must feed `var-jax train` and the sampler.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from golden_models import random_model

from var_jax import cli
from var_jax.cli import UserError
from var_jax.errors import LpipsWeightsError
from var_jax.models import discriminator as disc_lib
from var_jax.convert import lpips as lpips_io
from var_jax.models import lpips as lpips_lib
from var_jax.models.var import quantizer as q
from var_jax.models.var.vqvae import VQVAE
from var_jax.training import mesh as mesh_lib
from var_jax.training import vae_step
from var_jax.training.config import VAETrainConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8


def load_vae_config(name: str) -> VAETrainConfig:
  return load_config(name, VAETrainConfig)


def _env(cache) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir, cache, kill_at=None, **env) -> subprocess.Popen:
  """`var-jax train-vae`; `kill_at`: SIGKILLed once the save of that step
  started (tests/kill_at_step.py)."""
  head = (["-m", "var_jax.cli"] if kill_at is None else
          [str(ROOT / "tests" / "kill_at_step.py"), str(kill_at)])
  cmd = [sys.executable, *head, "train-vae", "--config", "train_vae_tiny",
         "--workdir", str(workdir), "--steps", str(STEPS)]
  return subprocess.Popen(cmd, env={**_env(cache), **env}, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(p, expect=0) -> str:
  _, err = p.communicate(timeout=600)
  assert p.returncode == expect, err[-3000:]
  return err


def _records(workdir) -> dict[int, dict]:
  """Metrics per step; a resumed run's repeated steps keep the last record."""
  out = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    out[rec["step"]] = rec
  return out


def _vae_arrays(model_dir) -> dict:
  from var_jax import checkpoint
  _, vae, var = checkpoint.load_model(model_dir, need_var=False)
  assert var is None
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(vae))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The reference run and a run killed right after starting the save of
  step 4, side by side; then the killed run is restarted."""
  cache = tmp_path_factory.mktemp("jax_cache")
  ref, killed = (tmp_path_factory.mktemp(n) for n in ("ref", "killed"))
  procs = [_start(ref, cache),
           _start(killed, cache, kill_at=4)]
  _finish(procs[0])
  _finish(procs[1], expect=-9)
  done = sorted(int(d.name) for d in (killed / "checkpoints").iterdir()
                if d.name.isdigit())
  assert done and max(done) >= 2
  resumed_err = _finish(_start(killed, cache))
  return ref, killed, resumed_err


@pytest.mark.slow
def test_tiny_run_learns_and_exports(runs):
  ref, _, _ = runs
  recs = _records(ref)
  assert sorted(recs) == list(range(STEPS))
  first, last = recs[0], recs[STEPS - 1]
  for key in ("loss", "l1", "l2", "vq_loss", "psnr", "grad_norm", "usage",
              "usage_s1", "usage_s4", "ppl_s1", "ppl_s4", "lr"):
    assert all(np.isfinite(r[key]) for r in recs.values()), key
  assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
  assert last["psnr"] > first["psnr"] + 2
  assert np.isfinite(last["val_psnr"]) and last["val_psnr"] > 8
  # restart_every=4: dead codes were re-initialised at steps 3 and 7.
  assert recs[3]["restarted"] > 0
  assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == ["6", "8"]
  arrays = _vae_arrays(ref / "model")
  ema = arrays["quantize/ema_vocab_hit_SV"]
  assert ema.shape == (4, 512) and ema.sum() > 0
  cfg = json.loads((ref / "model" / "config.json").read_text())
  assert cfg["var"] is None and cfg["vae"]["vocab_size"] == 512


@pytest.mark.slow
def test_sigkill_mid_save_then_resume_is_exact(runs):
  ref, killed, err = runs
  assert "steps 2->8" in err or "steps 4->8" in err, err
  a, b = _records(ref), _records(killed)
  assert sorted(a) == sorted(b)
  for s in a:
    for k in ("loss", "psnr", "usage", "restarted"):
      assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
  pa, pb = _vae_arrays(ref / "model"), _vae_arrays(killed / "model")
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.slow
def test_var_training_and_sampling_use_the_tokenizer(runs, tmp_path):
  """tokenizer -> `var-jax train --vae-ckpt` -> sampler, end to end."""
  ref, _, _ = runs
  work = tmp_path / "var"
  rc = cli.main(["train", "--config", "train_tiny", "--vae-ckpt",
                 str(ref / "model"), "--workdir", str(work), "--steps", "2"])
  assert rc == 0
  from var_jax import checkpoint
  from var_jax.sampling.var.sampler import SampleOptions, Sampler
  cfg, vae, var = checkpoint.load_model(work / "model")
  assert cfg.vae.resolution == 16
  np.testing.assert_array_equal(
      np.asarray(vae.quantize.codebook_VC),
      _vae_arrays(ref / "model")["quantize/embedding/embedding"])
  out = Sampler(vae, var, SampleOptions())(np.array([1, 7]), seed=0)
  assert np.asarray(out.images_BHWC).shape == (2, 16, 16, 3)


@pytest.mark.slow
def test_sigterm_from_outside_saves_then_resume_continues(tmp_path):
  """SIGTERM sent by another process at an arbitrary moment of a long run:
  exit 143, one line naming the saved step; the same command resumes there
  and runs to the end."""
  import signal
  import time
  work, cache = tmp_path / "w", tmp_path / "cache"
  cmd = [sys.executable, "-m", "var_jax.cli", "train-vae", "--config",
         "train_vae_tiny", "--workdir", str(work), "--steps", "400",
         "--ckpt-every", "1000", "--eval-split", "none"]
  p = subprocess.Popen(cmd, env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  log = work / "metrics.jsonl"
  deadline = time.monotonic() + 600
  while not (log.exists() and len(log.read_text().splitlines()) >= 3):
    assert p.poll() is None and time.monotonic() < deadline
    time.sleep(0.1)
  p.send_signal(signal.SIGTERM)
  err = _finish(p, expect=143)
  saved = [int(d.name) for d in (work / "checkpoints").iterdir()
           if d.name.isdigit()]
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  n = saved[0]
  assert err.splitlines()[-1] == (
      f"var-jax train-vae: error: interrupted by SIGTERM: saved step {n}/400 "
      f"in {work}/checkpoints; run the same command again to resume from it")
  assert sorted(_records(work)) == list(range(n))
  p = subprocess.Popen(cmd, env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  err = _finish(p)
  assert f"steps {n}->400" in err, err
  assert sorted(_records(work)) == list(range(400))
  assert (work / "model" / "config.json").exists()


# ------------------------------------------------------------ codebook upkeep
@pytest.fixture(scope="module")
def tiny_vae():
  cfg = load_vae_config("train_vae_tiny").vae_config()
  return random_model(VQVAE, cfg, 0)


def test_restart_replaces_only_dead_codes(tiny_vae):
  vae = tiny_vae
  pn = vae.cfg.v_patch_nums
  f = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
  v = vae.cfg.vocab_size
  ema = jnp.ones((len(pn), v)).at[:, :100].set(0.0)  # Codes 0-99 unused.
  old = np.asarray(vae.quantize.codebook_VC)
  key = jax.random.key(3)
  restart = nnx.jit(q.restart_dead_codes, static_argnums=(4, 5))
  cb, ema2, n = restart(vae.quantize, f, ema, key, pn, 0.03)
  cb = np.asarray(cb)
  assert int(n) == 100
  np.testing.assert_array_equal(cb[100:], old[100:])
  assert not np.any(np.all(np.isclose(cb[:100], old[:100]), axis=1))
  # New codes sit (within the tie-breaking noise) on the vectors the scales
  # quantize, and differ from one another.
  z = np.asarray(nnx.jit(q.residual_vectors, static_argnums=2)(
      vae.quantize, f, pn))
  dist = np.min(np.linalg.norm(cb[:100, None] - z[None], axis=-1), axis=1)
  assert dist.max() < 0.01 * np.sqrt(np.mean(z ** 2)) * 16
  assert len(np.unique(cb[:100].round(6), axis=0)) == 100
  np.testing.assert_array_equal(np.asarray(ema2)[:, :100], 0.0)
  np.testing.assert_array_equal(np.asarray(ema2)[:, 100:], 1.0)
  cb_again, _, _ = restart(vae.quantize, f, ema, key, pn, 0.03)
  np.testing.assert_array_equal(np.asarray(cb_again), cb)  # Deterministic.


def test_usage_ema_follows_the_official_counter():
  s, v = 3, 5
  rng = np.random.default_rng(0)
  ema, ref, record = jnp.zeros((s, v)), np.zeros((s, v)), 0
  for step in range(40):
    hits = rng.integers(0, 4, (s, v)).astype(np.float32)
    ema = q.update_ema(ema, jnp.asarray(hits), step)
    for si in range(s):  # quant.py: one record per scale per forward.
      if record == 0:
        ref[si] = hits[si]
      elif record < 100:
        ref[si] = ref[si] * 0.9 + hits[si] * 0.1
      else:
        ref[si] = ref[si] * 0.99 + hits[si] * 0.01
      record += 1
  np.testing.assert_allclose(np.asarray(ema), ref, rtol=1e-5)


def test_decoder_split_and_last_layer_gradient(tiny_vae):
  vae = tiny_vae
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  h = vae.decoder.trunk(z)
  np.testing.assert_allclose(np.asarray(vae.decoder.conv_out(h)),
                             np.asarray(vae.decoder(z)), rtol=1e-5, atol=1e-6)
  tgt = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  kernel = vae.decoder.conv_out.kernel[...]
  bias = vae.decoder.conv_out.bias[...]
  loss = lambda r: jnp.mean(jnp.abs(r - tgt))  # noqa: E731
  want = jax.grad(lambda k: loss(vae_step.conv_out_nobias(h, k) + bias))(kernel)
  rec, vjp = jax.vjp(lambda k: vae_step.conv_out_nobias(h, k), kernel)
  got = vjp(jax.grad(loss)(rec + bias))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-8)


# ------------------------------------------------------------ GAN pieces
def test_hinge_losses_and_adaptive_weight():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2].
  assert float(disc_lib.hinge_d_loss(real, fake)) == pytest.approx(
      0.5 * (2.5 / 3 + 3 / 3))
  assert float(disc_lib.hinge_g_loss(fake)) == pytest.approx(1 / 3)
  g1, g2 = jnp.full((3, 3, 4, 3), 2.0), jnp.full((3, 3, 4, 3), 0.5)
  assert float(disc_lib.adaptive_weight(g1, g2)) == pytest.approx(
      4.0 / (1 + 1e-4 / np.linalg.norm(np.full(108, 0.5))), rel=1e-6)
  assert float(disc_lib.adaptive_weight(g1, 0 * g2)) == 1e4  # Clipped.
  grad = jax.grad(lambda a: disc_lib.adaptive_weight(a * g1, g2))(1.0)
  assert float(grad) == 0.0  # No gradient through the weight.


@pytest.mark.parametrize("res,layers", [(16, 2), (64, 3)])
def test_patchgan_grid(res, layers):
  out = nnx.eval_shape(lambda: disc_lib.PatchGAN(3, 8, layers, rngs=nnx.Rngs(
      0))(jnp.zeros((2, res, res, 3))))
  side = disc_lib.patch_grid(res, layers)
  assert out.shape == (2, side, side, 1)


@pytest.mark.slow  # 206 s measured alone (machine under load).
def test_gan_lpips_step():
  """One adversarial step: its critic terms and VQGAN's adaptive weight equal
  the same quantities recomputed from the initial state by plain autodiff
  through the whole tokenizer."""
  cfg = dataclasses.replace(
      load_vae_config("train_vae_tiny"), lpips_weight=0.5,
      lpips_weights="unused.npz", disc_weight=0.8, disc_start=3,
      disc_layers=2, disc_ndf=8)
  # Before disc_start the step without the critic runs: it stays untouched.
  assert [cfg.gan_at(s) for s in range(5)] == [False] * 3 + [True] * 2
  mesh = mesh_lib.make_mesh(None)
  spec, tx, dtx = vae_step.build(cfg, mesh)
  state = vae_step.init_state(spec, cfg, tx, dtx, seed=0)
  state0 = jax.tree.map(np.array, state)  # The step donates `state`.
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)),
                  jnp.float32)
  lpw = lpips_lib.random_lpips_weights(0)
  key = np.asarray(jax.random.key_data(jax.random.key(0)))
  step = vae_step.make_vae_step(spec, cfg, tx, dtx, mesh, gan=True)
  state, m = step(state, {"images": x}, lpw,
                  *vae_step.step_inputs(1e-3, 1e-3, 3), key)
  m = {k: np.asarray(v) for k, v in m.items()}
  assert all(np.all(np.isfinite(v)) for v in m.values())

  def rec_with(p0, b0, kernel):
    dec = {**p0["decoder"], "conv_out": {**p0["decoder"]["conv_out"],
                                         "kernel": kernel}}
    return vae_step.forward(spec.graphdef, {**p0, "decoder": dec}, b0, x).rec

  def nll(r):
    return (cfg.l1_weight * jnp.mean(jnp.abs(r - x))
            + cfg.l2_weight * jnp.mean((r - x) ** 2)
            + cfg.lpips_weight * jnp.mean(lpips_lib.lpips_distance(lpw, x, r)))

  @jax.jit
  def reference(p0, b0, d0):
    disc0 = nnx.merge(spec.disc_graphdef, d0)
    # Gradients at the last kernel through the whole tokenizer (the step
    # takes them from the decoder's last features instead).
    rec, to_kernel = jax.vjp(lambda k: rec_with(p0, b0, k),
                             p0["decoder"]["conv_out"]["kernel"])
    fake = disc0(rec)
    g_nll = to_kernel(jax.grad(nll)(rec))[0]
    g_gan = to_kernel(jax.grad(lambda r: disc_lib.hinge_g_loss(disc0(r)))(
        rec))[0]
    return {"g_loss": disc_lib.hinge_g_loss(fake),
            "d_loss": disc_lib.hinge_d_loss(disc0(x), fake),
            "lpips": jnp.mean(lpips_lib.lpips_distance(lpw, x, rec)),
            "d_weight": cfg.disc_weight * jnp.linalg.norm(g_nll) / (
                jnp.linalg.norm(g_gan) + 1e-4)}

  want = reference(state0["params"], state0["buffers"], state0["disc"])
  for k, rel in (("g_loss", 1e-5), ("d_loss", 1e-5), ("lpips", 1e-4),
                 ("d_weight", 1e-3)):
    assert m[k] == pytest.approx(float(want[k]), rel=rel), k
  assert m["loss"] == pytest.approx(
      m["l1"] + m["l2"] + 0.5 * m["lpips"] + m["vq_loss"]
      + m["d_weight"] * m["g_loss"], rel=1e-5)
  # The critic took its step (every kernel moved; the output bias may not:
  # with all logits inside the hinge its gradient is exactly 0).
  def kernels(tree):
    return [v for p, v in jax.tree_util.tree_leaves_with_path(tree)
            if "kernel" in jax.tree_util.keystr(p)]
  for a, b in zip(kernels(state0["disc"]), kernels(state["disc"])):
    assert not np.array_equal(a, np.asarray(b))


# ------------------------------------------------------------ LPIPS
def _torch_named(weights):
  vgg, lin = {}, {}
  for i, (k, b) in zip(lpips_lib.CONV_INDICES, weights["convs"]):
    vgg[f"features.{i}.weight"] = np.ascontiguousarray(k.transpose(3, 2, 0, 1))
    vgg[f"features.{i}.bias"] = b
  vgg["classifier.0.weight"] = np.zeros((4, 3), np.float32)  # Ignored.
  for k, w in enumerate(weights["lins"]):
    lin[f"lin{k}.model.1.weight"] = w.reshape(1, -1, 1, 1)
  return vgg, lin


def test_lpips_reads_pth_pair_and_npz(tmp_path):
  from pth_writer import write_pth
  w = lpips_lib.random_lpips_weights(1)
  vgg, lin = _torch_named(w)
  write_pth(tmp_path / "vgg16.pth", vgg)
  write_pth(tmp_path / "vgg.pth", lin)
  pair = f"{tmp_path}/vgg16.pth,{tmp_path}/vgg.pth"
  lpips_io.save_lpips_npz(tmp_path / "vgg16.pth", tmp_path / "vgg.pth",
                           tmp_path / "lpips.npz")
  for spec in (pair, str(tmp_path / "lpips.npz")):
    got = lpips_io.load_lpips_weights(spec)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(w)):
      np.testing.assert_array_equal(a, b)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1)
  y = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), -1, 1)
  dist = jax.jit(lpips_lib.lpips_distance)
  np.testing.assert_allclose(np.asarray(dist(w, x, x)), 0.0, atol=1e-6)
  d = np.asarray(dist(w, x, y))
  assert d.shape == (2,) and np.all(d > 0)
  np.testing.assert_allclose(np.asarray(dist(w, y, x)), d, rtol=1e-5)
  np.savez(tmp_path / "part.npz", **vgg)  # No heads.
  with pytest.raises(LpipsWeightsError, match="lin0"):
    lpips_io.load_lpips_weights(str(tmp_path / "part.npz"))


# ------------------------------------------------------------ CLI errors
def _lpips_config(tmp_path) -> str:
  path = tmp_path / "lpips_cfg.py"
  path.write_text(
      "import dataclasses\n"
      "from var_jax.training.config import VAETrainConfig, load_config\n"
      "def get_config():\n"
      "  return dataclasses.replace(\n"
      "      load_config('train_vae_tiny', VAETrainConfig), lpips_weight=1.0)\n")
  return str(path)


@pytest.mark.parametrize("extra,needle", [
    (["--config", "train_vae_tiny", "--data", "folder:/no/such/dir"],
     "/no/such/dir"),
    (["--config", "LPIPS", "--lpips-weights", "/no/vgg.npz"],
     "/no/vgg.npz: no such file"),
    (["--config", "LPIPS"], "needs VGG weights"),
    (["--config", "train_vae_tiny", "--lpips-weights", "/no/vgg.npz"],
     "lpips_weight is 0"),
    (["--config", "train_vae_tiny", "--mesh", "data=3"], "does not divide"),
    (["--config", "train_vae_tiny", "--global-batch", "0"],
     "global_batch must be >= 1"),
    (["--config", "no_such_config"], "neither a file"),
    (["--config", "train_d16"], "not VAETrainConfig"),
])
def test_cli_errors_are_one_line(capsys, tmp_path, extra, needle):
  extra = [_lpips_config(tmp_path) if a == "LPIPS" else a for a in extra]
  rc = cli.main(["train-vae", "--workdir", str(tmp_path / "w")] + extra)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_bundled_configs_validate():
  for name in ("train_vae_tiny", "train_vae_digits"):
    load_vae_config(name).validate()
  big = load_vae_config("train_vae_imagenet")
  with pytest.raises(UserError, match="--lpips-weights"):
    big.validate()
  dataclasses.replace(big, lpips_weights="x.npz").validate()
  assert big.gan and big.lpips_weight > 0 and big.vae_config().ch == 160
