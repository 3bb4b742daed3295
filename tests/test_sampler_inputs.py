"""Values outside their domain are refused at the Python API and the CLI.

Each case names the value in one line (a `UserError`, also a ValueError)
before anything is compiled or written.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from golden_models import golden_vae, golden_var

from var_jax import cli
from var_jax.models.abstract import abstract_model
from var_jax.models.var.config import VARConfig
from var_jax.errors import IncompatibleModelsError, UserError
from var_jax.models.var.transformer import VAR
from var_jax.sampling.var import edit
from var_jax.sampling.var.sampler import SampleOptions, Sampler


@pytest.mark.parametrize("kw,needle", [
    (dict(cfg=float("nan")), "cfg must be a finite number"),
    (dict(cfg=float("inf")), "cfg must be a finite number"),
    (dict(top_p=1.5), "top_p must be a number in [0, 1]"),
    (dict(top_p=float("nan")), "top_p must be a number in [0, 1]"),
    (dict(top_p=(0.9, -0.1)), "top_p must be a number in [0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(top_k=()), "top_k must not be an empty list"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(cfg_until=-1), "cfg_until must be a scale index >= 0"),
    (dict(draft_steps=0), "draft_steps must be an integer >= 1"),
    (dict(scale_loop="loop"), "scale_loop must be one of"),
    (dict(layer_loop="loop"), "layer_loop must be one of"),
    (dict(more_smooth=1), "more_smooth must be True or False"),
])
def test_bad_options_name_the_value(kw, needle):
  with pytest.raises(UserError, match=None) as e:
    SampleOptions(**kw)
  assert needle in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def models(golden_dir):
  return golden_vae(golden_dir), golden_var(golden_dir)


@pytest.mark.parametrize("kw,needle", [
    (dict(top_k=(1, 2, 3)), "top_k has 3 values but the model has 10 scales"),
    (dict(cfg_until=11), "cfg_until must be in [0, 10]"),
    (dict(draft_steps=3), "needs both a drafter model and draft_steps"),
])
def test_bad_options_for_the_model(models, kw, needle):
  vae, var = models
  with pytest.raises(UserError) as e:
    Sampler(vae, var, SampleOptions(**kw))
  assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("n", [0, 10, 11])
def test_draft_steps_outside_1_to_k_minus_1(models, n):
  vae, var = models
  with pytest.raises(UserError, match="draft_steps must be"):
    Sampler(vae, var, SampleOptions(draft_steps=n), drafter=var)


def test_drafter_must_share_scales_and_classes(models):
  vae, var = models
  for change in (dict(num_classes=11), dict(patch_nums=(1, 2, 3, 4, 5, 6, 8,
                                                        10, 12, 16))):
    cfg = VARConfig(**{**var.cfg.__dict__, **change, "depth": 1})
    other = abstract_model(VAR, cfg)  # Refused before any weight is read.
    field = next(iter(change))
    with pytest.raises(IncompatibleModelsError, match=f"differ in {field}"):
      Sampler(vae, var, SampleOptions(draft_steps=4), drafter=other)
  with pytest.raises(UserError, match="drafter model needs draft_steps"):
    Sampler(vae, var, SampleOptions(), drafter=var)


@pytest.mark.parametrize("call,needle", [
    (dict(labels=[15]), "label 15 is outside [0, 10)"),
    (dict(labels=[-1]), "label -1 is outside [0, 10)"),
    (dict(labels=[-11]), "label -11 is outside [0, 10)"),
    (dict(labels=[10]), "needs allow_null=True"),
    (dict(labels=[11], allow_null=True), "label 11 is outside [0, 11)"),
    (dict(labels=[]), "labels must not be empty"),
    (dict(labels=[1.5]), "integer class ids"),
    (dict(labels=[1], seed=2 ** 32), "seed must be an integer in [0, 2**32)"),
    (dict(labels=[1], seed=2 ** 64), "seed must be an integer in [0, 2**32)"),
    (dict(labels=[1], seed=-1), "seed must be an integer in [0, 2**32)"),
    (dict(labels=[1], offset=-1), "offset must be"),
    (dict(batch=0), "batch must be an integer >= 1"),
    (dict(labels=[1, 2], batch=3), "batch=3 but 2 labels"),
    (dict(labels=[1], given=[np.zeros((1, 1), int)]), "given and keep go"),
])
def test_bad_call_arguments(models, call, needle):
  vae, var = models
  with pytest.raises(UserError) as e:
    Sampler(vae, var)(**call)
  assert needle in str(e.value), str(e.value)


def test_null_class_only_when_asked(models):
  vae, var = models
  s = Sampler(vae, var)
  np.testing.assert_array_equal(s.check_labels([0, 10], allow_null=True),
                                [0, 10])
  with pytest.raises(UserError, match="allow_null"):
    s.check_labels([0, 10])


def test_zero_shot_edit_checks_labels_and_images(models):
  vae, var = models
  s = Sampler(vae, var)
  img = np.zeros((1, 256, 256, 3), np.float32)
  mask = np.ones((16, 16), np.float32)
  with pytest.raises(UserError, match="label 10 is outside"):
    edit.zero_shot_edit(s, vae, img, mask, 10)
  with pytest.raises(UserError, match="label 12 is outside"):
    edit.zero_shot_edit(s, vae, img, mask, 12, allow_null=True)
  with pytest.raises(UserError, match="finite"):
    edit.zero_shot_edit(s, vae, img * np.nan, mask, 1)
  # One range in and out: [0, 1]. 8-bit and [-1, 1] pixels are named.
  with pytest.raises(UserError, match=r"images must be floats in \[0, 1\], "
                     r"got values in \[0, 255\]; divide 8-bit pixels by 255"):
    edit.zero_shot_edit(s, vae, img + np.linspace(0, 255, 256)[:, None, None],
                        mask, 1)
  with pytest.raises(UserError, match=r"got values in \[-1, 0\]"):
    edit.zero_shot_edit(s, vae, img - 1 + np.eye(256)[None, ..., None], mask,
                        1)
  with pytest.raises(UserError, match="seed"):
    edit.zero_shot_edit(s, vae, img, mask, 1, seed=2 ** 40)


# --------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,needle", [
    (["--seed", str(2 ** 64)],
     "argument --seed: expected an integer in [0, 2**32), got"),
    (["--cfg", "nan"], "argument --cfg: expected a finite number"),
    (["--top-p", "0.9,nan"], "argument --top-p: expected numbers in [0, 1]"),
    (["--top-k", "a"], "argument --top-k: expected integers >= 0, got 'a'"),
    (["--temperature", "0"], "argument --temperature: expected finite"),
    (["--batch", "0"], "argument --batch: expected an integer >= 1"),
])
def test_bad_flags_are_one_usage_line(tmp_path, capsys, argv, needle):
  with pytest.raises(SystemExit) as e:
    cli.main(["sample", "--out", str(tmp_path / "o.png")] + argv)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,needle", [
    (["--top-k", "1,2"], "top_k has 2 values but the model has 10 scales"),
    (["--cfg-until", "12"], "cfg_until must be in [0, 10]"),
    (["--draft-steps", "4"], "--drafter-ckpt and --draft-steps go together"),
    (["--drafter-ckpt", "CKPT", "--draft-steps", "10"],
     "draft_steps must be in [1, 9]"),
    (["--labels", "11"], "class ids in [0, 10]"),
])
@pytest.mark.parametrize("cmd", ["sample", "sample-many"])
def test_flags_that_need_the_model_are_one_line(model_dir, tmp_path, capsys,
                                                argv, needle, cmd):
  out = tmp_path / ("o.png" if cmd == "sample" else "o.npz")
  argv = [str(model_dir) if a == "CKPT" else a for a in argv]
  if cmd == "sample-many" and argv[0] == "--labels":
    argv = ["--classes", argv[1]]
  rc = cli.main([cmd, "--ckpt", str(model_dir), "--out", str(out)] + argv)
  err = capsys.readouterr().err.strip()
  if cmd == "sample-many" and argv[0] == "--classes":
    needle = "class ids in [0, 10]"
  assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
  assert list(tmp_path.iterdir()) == []


def test_sample_many_batch_not_dividing_devices_writes_nothing(model_dir,
                                                               tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3",
             JAX_PLATFORMS="cpu")
  out = tmp_path / "out.npz"
  r = subprocess.run(
      [sys.executable, "-m", "var_jax.cli", "sample-many", "--ckpt",
       str(model_dir), "--per-class", "1", "--batch", "4", "--out", str(out)],
      env=env, capture_output=True, text=True, timeout=300)
  err = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(err) == 1, r.stderr
  assert "multiple of the 3 local devices" in err[0]
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,needle", [
    (["sample", "--out", "{d}"], "--out {d} is a directory"),
    (["sample", "--out", "{d}/x.png", "--save-npz", "{d}/x.png"],
     "--save-npz must end in .npz"),
    (["sample", "--out", "{d}/file.txt/x.png"], "is a file, not a directory"),
    (["edit", "--image", "{d}/in.png", "--box", "0,0,1,1", "--out", "{d}"],
     "is a directory"),
    (["sample-many", "--out", "{d}/samples.png"], "--out must end in .npz"),
    (["sample", "--out", "{d}/x.gif"],
     "--out {d}/x.gif: .gif is not an image format written here; end the "
     "name in .png, .jpg, .jpeg or .webp"),
    (["sample", "--out", "{d}/grid"], "no extension names the image format"),
    (["edit", "--image", "{d}/in.png", "--box", "0,0,1,1", "--out",
      "{d}/x.bmp"], ".bmp is not an image format written here"),
    (["sample", "--out-dir", "{d}/file.txt"],
     "--out-dir {d}/file.txt is a file, not a directory"),
])
def test_unwritable_outputs_are_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch, argv, needle):
  from var_jax import checkpoint

  def no_loading(*a, **k):
    raise AssertionError("the model was loaded before --out was checked")

  monkeypatch.setattr(checkpoint, "load_model", no_loading)
  (tmp_path / "file.txt").write_text("x")
  before = sorted(p.name for p in tmp_path.iterdir())
  d = str(tmp_path)
  rc = cli.main([a.format(d=d) for a in argv])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err.count("\n") == 0, err
  assert needle.format(d=d) in err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
