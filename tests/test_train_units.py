"""Training pieces in one process: loss, progressive schedule, mesh flags,
config loading, accumulation, bfloat16, and one-line CLI errors."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_models import small_var

from var_jax import cli
from var_jax.cli import UserError
from var_jax.training import loss as loss_lib
from var_jax.training import mesh as mesh_lib
from var_jax.training import metrics as metrics_lib
from var_jax.training import schedule
from var_jax.training import sharding
from var_jax.training.config import TrainConfig, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ loss
def test_label_smoothing_matches_definition():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  tgt = jnp.asarray(rng.integers(0, 7, (2, 5)))
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  nll = -np.take_along_axis(logp, np.asarray(tgt)[..., None], -1)[..., 0]
  want = 0.9 * nll + 0.1 * (-logp.mean(-1))
  np.testing.assert_allclose(loss_lib.token_ce(logits, tgt, 0.1), want,
                             rtol=1e-6)


def test_scale_metrics_and_weights():
  pn = (1, 2, 3)
  logits = jnp.zeros((2, 14, 4)).at[:, :, 1].set(5.0)
  tgt = jnp.ones((2, 14), jnp.int32).at[:, 5:].set(0)  # Scale 3 all wrong.
  m = loss_lib.finalize_metrics(loss_lib.scale_metrics(logits, tgt, pn))
  np.testing.assert_allclose(m["scale_acc"], [100.0, 100.0, 0.0])
  np.testing.assert_allclose(m["acc"], 100.0 * 5 / 14, rtol=1e-6)
  w = loss_lib.loss_weights(pn)
  np.testing.assert_allclose(w, np.full(14, 1 / 14))


def _official_prog(num_its, *, pg, pg0, wp_it, max_it, k, prog_wp_it):
  """The reference trainer's stateful stage / ramp bookkeeping, replayed."""
  out, last_si, prog_it, first = [], -1, 0, True
  for it in range(num_its):
    if it <= wp_it:
      si = pg0
    elif it >= max_it * pg:
      si = k - 1
    else:
      progress = min(max((it - wp_it) / (max_it * pg - wp_it), 0), 1)
      si = pg0 + round(progress * (k - 1 - pg0))
    if last_si != si:
      if last_si != -1:
        first = False
      last_si, prog_it = si, 0
    prog_it += 1
    wp = 1.0 if first else max(min(prog_it / prog_wp_it, 1), 0.01)
    out.append((si, wp))
  return out


def test_progressive_stage_and_ramp_match_reference():
  kw = dict(pg=0.6, pg0=2, wp_it=10, max_it=200)
  ref = _official_prog(200, k=10, prog_wp_it=7, **kw)
  for it, (si, wp) in enumerate(ref):
    assert schedule.prog_stage(it, num_scales=10, **kw) == si, it
    assert schedule.prog_warmup(it, num_scales=10, prog_wp_it=7,
                                **kw) == pytest.approx(wp), it


def test_progressive_weights_truncate_like_reference():
  pn = (1, 2, 3, 4)
  w = loss_lib.loss_weights(pn, prog_si=2, prog_wp=0.5)
  seq = 30
  np.testing.assert_allclose(w[:5], 1 / seq)
  np.testing.assert_allclose(w[5:14], 0.5 / seq)
  np.testing.assert_allclose(w[14:], 0.0)
  # The last stage is plain training: no ramp, nothing cut.
  np.testing.assert_allclose(loss_lib.loss_weights(pn, 3, 0.1), 1 / seq)


def test_block_causal_prefix_is_independent_of_later_scales():
  """Why progressive training may run the full sequence: a prefix's logits
  do not depend on the tokens after it."""
  var = small_var()  # Digits scales (1, 2, 3, 4), two blocks.
  cfg = var.cfg
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, cfg.seq_len - 1, cfg.cvae)), jnp.float32)
  labels = jnp.array([1, 2])
  end = 14  # Scales (1, 2, 3).
  x2 = x.at[:, end - 1:].set(7.0)  # Inputs of scale 4 only.
  a, b = var(labels, x), var(labels, x2)
  np.testing.assert_array_equal(np.asarray(a[:, :end]), np.asarray(b[:, :end]))
  assert not np.allclose(a[:, end:], b[:, end:])


# ------------------------------------------------------------ mesh / sharding
@pytest.mark.parametrize("spec,n,want", [
    (None, 4, {"data": 4, "fsdp": 1}),
    ("data=2,fsdp=2", 4, {"data": 2, "fsdp": 2}),
    ("fsdp=4", 8, {"data": 2, "fsdp": 4}),
    ("data=-1,fsdp=2", 8, {"data": 4, "fsdp": 2}),
])
def test_parse_mesh(spec, n, want):
  assert mesh_lib.parse_mesh(spec, n) == want


@pytest.mark.parametrize("spec", ["data=3", "data=2,fsdp=3", "model=2",
                                  "data=x", "data=-1,fsdp=-1", "data=0"])
def test_parse_mesh_errors(spec):
  with pytest.raises(UserError):
    mesh_lib.parse_mesh(spec, 4)


def test_fit_spec_falls_back_to_replicated():
  class FakeMesh:
    shape = {"data": 2, "fsdp": 4}
  P = jax.sharding.PartitionSpec
  assert sharding._fit_spec(P(None, "fsdp"), (3, 8), FakeMesh) == P(None, "fsdp")
  assert sharding._fit_spec(P(None, "fsdp"), (3, 6), FakeMesh) == P(None, None)
  assert sharding._fit_spec(P("model"), (8,), FakeMesh) == P(None)


# ------------------------------------------------------------ config / errors
def test_bundled_configs_load():
  for name in ("d16", "d20", "d24", "d30", "d36", "tiny"):
    cfg = load_config(f"train_{name}" if name != "tiny" else "train_tiny")
    assert isinstance(cfg, TrainConfig)
    cfg.validate()
    assert cfg.model_config().var is not None
  d30 = load_config(str(ROOT / "configs" / "train_d30.py"))
  assert (d30.global_batch, d30.epochs, d30.tblr, d30.wd_end) == (
      1024, 350, 8e-5, 0.08)
  assert d30.peak_lr == pytest.approx(8e-5 * 4)
  assert load_config("train_d36").model_config().var.shared_aln


def test_warmup_and_schedule_type():
  cfg = TrainConfig(epochs=200)
  assert cfg.warmup_steps(10000) == pytest.approx(200)  # ep / 50 epochs.
  assert TrainConfig(pg=0.8).schedule_type == "lin0.8"


def test_non_finite_names_step_and_metric():
  with pytest.raises(metrics_lib.TrainingDiverged,
                     match=r"non-finite loss \(nan\) at step 7"):
    metrics_lib.check_finite(7, {"loss": float("nan"), "grad_norm": 1.0})
  metrics_lib.check_finite(7, {"loss": 1.0, "grad_norm": 1.0})


def _cli_error(capsys, argv):
  rc = cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  return rc, err


@pytest.mark.parametrize("argv,needle", [
    (["--config", "configs/does_not_exist.py"], "config file not found"),
    (["--config", "no_such_config"], "neither a file"),
    (["--config", "train_tiny", "--mesh", "data=3"], "does not divide"),
    (["--config", "train_tiny", "--mesh", "data=2,fsdp=2"], "needs 4 devices"),
    (["--config", "train_tiny"], "needs a tokenizer"),
])
def test_train_cli_user_errors(capsys, tmp_path, argv, needle):
  rc, err = _cli_error(capsys, ["train", "--workdir", str(tmp_path / "w")]
                       + argv)
  assert rc == 2
  assert len(err) == 1 and needle in err[0], err


def test_train_cli_missing_data_dir(capsys, tmp_path, tiny_vae_dir):
  rc, err = _cli_error(capsys, [
      "train", "--config", "train_tiny", "--workdir", str(tmp_path / "w"),
      "--vae-ckpt", str(tiny_vae_dir), "--data", "folder:/no/such/dir"])
  assert rc == 2 and len(err) == 1 and "/no/such/dir" in err[0], err


def test_train_takes_model_names_for_its_weights(capsys, tmp_path):
  """--vae-ckpt and --init-ckpt take a model name, as every --ckpt does."""
  from var_jax import api
  from var_jax.training.trainer import resolve_sources
  cfg = load_config("train_digits", TrainConfig)
  digits = api.model_dir("digits")
  src = resolve_sources(dataclasses.replace(cfg, vae_ckpt="digits"))
  assert src.vae_dir == digits and src.var_dir is None
  src = resolve_sources(dataclasses.replace(cfg, init_ckpt="digits"))
  assert src.vae_dir == src.var_dir == digits
  # On the command line the name is taken, and the run goes on to its data
  # (refused here: nothing trains).
  argv = ["train", "--config", "train_digits", "--workdir",
          str(tmp_path / "w"), "--data", "folder:/no/such/dir"]
  rc, err = _cli_error(capsys, argv + ["--vae-ckpt", "digits"])
  assert rc == 2 and len(err) == 1 and "/no/such/dir" in err[0], err
  # A misspelt name is one line listing the names.
  rc, err = _cli_error(capsys, argv + ["--init-ckpt", "digts"])
  assert rc == 2 and len(err) == 1, err
  assert err[0] == (
      "var-jax train: error: digts is not a var-jax model directory (no "
      f"config.json) nor a model name ({', '.join(api.model_names())}; "
      "`var-jax list`)"), err[0]


@pytest.fixture(scope="module")
def tiny_vae_dir(random_digits_vae_dir):
  return random_digits_vae_dir


@pytest.mark.parametrize("body,says", [
    ("def get_config():\n  return 3\n",
     "{bad}: get_config() returned int, not TrainConfig"),
    ("import sys\nsys.exit(3)\n", "cannot load config {bad}: SystemExit: 3"),
    ("def get_config():\n  raise SystemExit(4)\n",
     "{bad}: get_config() failed: SystemExit: 4"),
    (None, "{bad} is a directory, not a config file")])
def test_bad_config_file_is_one_line(capsys, tmp_path, body, says):
  bad = tmp_path / "cfg.py"
  if body is None:
    bad.mkdir()
  else:
    bad.write_text(body)
  rc, err = _cli_error(capsys, ["train", "--config", str(bad), "--workdir",
                                str(tmp_path / "w")])
  assert rc == 2 and len(err) == 1, err
  assert err[0].startswith("var-jax train: error: ") and err[0].endswith(
      says.format(bad=bad)), err[0]
  assert not (tmp_path / "w").exists()


# ------------------------------------------------------------ nothing written
@pytest.mark.parametrize("command,config", [("train", "train_tiny"),
                                            ("train-vae", "train_vae_tiny")])
def test_empty_data_root_writes_nothing(capsys, tmp_path, tiny_vae_dir,
                                        command, config):
  """Refused at start-up (a data root without class folders): one line, and
  no workdir at all (no empty checkpoints/, metrics or events)."""
  (tmp_path / "data").mkdir()
  extra = ["--vae-ckpt", str(tiny_vae_dir)] if command == "train" else []
  rc, err = _cli_error(capsys, [
      command, "--config", config, "--workdir", str(tmp_path / "w"),
      "--data", f"folder:{tmp_path / 'data'}"] + extra)
  assert rc == 2 and len(err) == 1 and str(tmp_path / "data") in err[0], err
  assert not (tmp_path / "w").exists()


def test_resume_with_another_config_is_one_line(capsys, tmp_path,
                                                tiny_vae_dir):
  """A workdir holding a `train_tiny` checkpoint, resumed with
  `train_digits`: one line naming the differing fields, before any array
  is read, and the checkpoint left as it was."""
  from var_jax.training import run as run_lib
  from var_jax.training.trainer import VARTask
  work = tmp_path / "w"
  cfg = dataclasses.replace(load_config("train_tiny"),
                            vae_ckpt=str(tiny_vae_dir))
  r = run_lib.Run(cfg, work, VARTask)  # Real state and run record.
  assert r.ckpts.maybe_save(2, r.state, r.record, force=True)
  r.ckpts.close()
  r.loader.close()
  r.lock.release()  # As a finished run does.
  before = sorted(p.name for p in (work / "checkpoints").iterdir())
  rc, err = _cli_error(capsys, [
      "train", "--config", "train_digits", "--workdir", str(work),
      "--vae-ckpt", str(tiny_vae_dir)])
  assert rc == 2 and len(err) == 1, err
  line = err[0]
  assert line.startswith(f"var-jax train: error: {work}/checkpoints holds "
                         "another run; differing: "), line
  for field in ("model.name (checkpoint 'train_tiny', now 'digits')",
                "model.var.depth (checkpoint 2, now 4)",
                "total_steps (checkpoint 6, now"):
    assert field in line, line
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before
  # Fields that may change on resume (here: how often to save) are accepted.
  assert "ckpt_every" not in line


def test_run_record_differences_name_fields():
  from var_jax.training.checkpointing import run_differences
  saved = {"config": {"seed": 0, "ckpt_every": 2, "model": "a"},
           "model": {"var": {"depth": 2}}}
  now = {"config": {"seed": 1, "ckpt_every": 5, "model": "b"},
         "model": {"var": {"depth": 2}}}
  assert run_differences(saved, now, ["config.ckpt_every", "config.model"]
                         ) == ["config.seed (checkpoint 0, now 1)"]


@pytest.mark.parametrize("command", ["train", "train-vae", "tokenize"])
def test_data_help_lists_what_the_folder_reader_takes(capsys, monkeypatch,
                                                      command):
  """--help names exactly the extensions a folder source lists, and how
  images are read."""
  import re

  from var_jax.data.sources import IMG_EXTENSIONS
  monkeypatch.setenv("COLUMNS", "2000")  # One line per flag: no hyphen breaks.
  with pytest.raises(SystemExit):
    cli.main([command, "--help"])
  text = " ".join(capsys.readouterr().out.split())
  listed = re.search(r"\(folder: ([^,]*), any case;", text)
  assert listed, text
  assert sorted(listed.group(1).split()) == sorted(IMG_EXTENSIONS)
  assert ("images are read as a viewer shows them: EXIF orientation applied, "
          "16/32-bit scaled to 8 bits, transparency composited over white)"
          in text)
