"""`var-jax convert` / `encode` end to end, and every kind of bad input."""

import numpy as np
import pytest
from conftest import assert_close_rel
from pth_writer import write_hostile_pth, write_pth

import jax.numpy as jnp

from var_jax.checkpoint import load_model
from var_jax.cli import main
from var_jax.models.var.config import get_preset
from var_jax.convert.pth import read_pth


def run(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("ck") / "tiny"
  assert main(["convert", "--vae", str(golden_dir / "vae_tiny.pth"), "--var",
               str(golden_dir / "var_tiny.pth"), "--out", str(out),
               "--preset", "tiny"]) == 0
  return out


def test_convert_then_logits_match(converted, golden):
  cfg, vae, var = load_model(converted)
  tiny = get_preset("tiny")
  assert cfg.var == tiny.var and cfg.vae == tiny.vae
  g = golden("var_tiny_io")
  logits = var(jnp.asarray(g["label"]), jnp.asarray(g["var_input"]))
  assert_close_rel(logits, g["logits_tf"], name="logits after convert")


def test_encode_cli_tokens_identical(converted, golden, tmp_path, capsys):
  g = golden("vae_tiny_io")
  np.save(tmp_path / "imgs.npy", g["img_u8"].transpose(0, 2, 3, 1))
  code, out, _ = run(capsys, "encode", "--ckpt", str(converted), "--images",
                     str(tmp_path / "imgs.npy"), "--out",
                     str(tmp_path / "tok.npz"), "--batch", "1")
  assert code == 0, out
  tok = np.load(tmp_path / "tok.npz")
  for si in range(10):
    assert tok[f"idx_{si}"].dtype == np.int32
    np.testing.assert_array_equal(tok[f"idx_{si}"], g[f"idx_{si}"])


def test_encode_rejects_wrong_images(converted, tmp_path, capsys):
  np.save(tmp_path / "f.npy", np.zeros((1, 256, 256, 3), np.float32))
  np.save(tmp_path / "s.npy", np.zeros((1, 64, 64, 3), np.uint8))
  for name, msg in [("f.npy", "must be uint8"), ("s.npy", "model takes 256x256"),
                    ("none.npy", "no such file")]:
    code, _, err = run(capsys, "encode", "--ckpt", str(converted), "--images",
                       str(tmp_path / name), "--out", str(tmp_path / "t.npz"))
    assert code == 2 and msg in err and err.count("\n") == 1
  assert not (tmp_path / "t.npz").exists()


def test_single_inputs_and_nested_training_checkpoint(golden_dir, tmp_path,
                                                      capsys):
  var_sd = read_pth(golden_dir / "var_tiny.pth")
  vae_sd = read_pth(golden_dir / "vae_tiny.pth")
  nested = {"epoch": 7, "trainer": {
      "var_wo_ddp": {f"module._orig_mod.{k}": v for k, v in var_sd.items()},
      "vae_local": dict(vae_sd), "config": {"prog_it": 0}}}
  write_pth(tmp_path / "ar-ckpt-last.pth", nested)
  code, out, err = run(capsys, "convert", "--var",
                       str(tmp_path / "ar-ckpt-last.pth"), "--vae",
                       str(tmp_path / "ar-ckpt-last.pth"), "--out",
                       str(tmp_path / "nested"))
  assert code == 0, err
  _, _, var = load_model(tmp_path / "nested")
  np.testing.assert_array_equal(np.asarray(var.head.kernel[...]),
                                var_sd["head.weight"].T)
  code, _, err = run(capsys, "convert", "--var",
                     str(golden_dir / "var_tiny.pth"), "--out",
                     str(tmp_path / "var_only"))
  assert code == 0, err
  code, _, err = run(capsys, "convert", "--vae",
                     str(golden_dir / "vae_tiny.pth"), "--out",
                     str(tmp_path / "vae_only"))
  assert code == 0, err
  cfg, vae, var = load_model(tmp_path / "vae_only", need_var=False)
  assert var is None and cfg.vae.vocab_size == 256


def _edited(golden_dir, tmp_path, edit):
  sd = dict(read_pth(golden_dir / "var_tiny.pth"))
  edit(sd)
  path = tmp_path / "edited.pth"
  write_pth(path, sd)
  return path


BAD = {
    "wrong_shape": (lambda sd: sd.__setitem__("head.bias", np.zeros(7, np.float32)),
                    "head.bias: expected (256), found (7)"),
    "missing_key": (lambda sd: sd.pop("blocks.1.ffn.fc2.weight"),
                    "missing keys: blocks.1.ffn.fc2.weight"),
    "extra_key": (lambda sd: sd.__setitem__("blocks.0.attn.rope", np.zeros(3, np.float32)),
                  "unknown keys: blocks.0.attn.rope"),
}


# Each problem alone, beside a good --vae: nothing is written. One case runs
# by default; every message is also checked, all at once, by the next test.
@pytest.mark.parametrize("case", [
    c if c == "wrong_shape" else pytest.param(c, marks=pytest.mark.slow)
    for c in BAD])
def test_bad_state_dicts(golden_dir, tmp_path, capsys, case):
  edit, msg = BAD[case]
  path = _edited(golden_dir, tmp_path, edit)
  out = tmp_path / "out"
  code, _, err = run(capsys, "convert", "--vae", str(golden_dir / "vae_tiny.pth"),
                     "--var", str(path), "--out", str(out))
  assert code == 2 and msg in err and err.count("\n") == 1, err
  assert not out.exists()
  assert [p.name for p in tmp_path.iterdir()] == ["edited.pth"]


def test_all_key_problems_listed_at_once(golden_dir, tmp_path, capsys):
  def edit(sd):
    for e, _ in BAD.values():
      e(sd)
  path = _edited(golden_dir, tmp_path, edit)
  code, _, err = run(capsys, "convert", "--var", str(path), "--out",
                     str(tmp_path / "o"), "--preset", "tiny")
  assert code == 2
  for _, msg in BAD.values():
    assert msg in err


def test_bad_files(golden_dir, tmp_path, capsys):
  data = (golden_dir / "var_tiny.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 3])
  (tmp_path / "text.pth").write_text("not a checkpoint")
  write_hostile_pth(tmp_path / "evil.pth", "os", "system",
                    f"touch {tmp_path / 'pwned'}")
  cases = [("cut.pth", "cut.pth"), ("text.pth", "not a PyTorch checkpoint"),
           ("evil.pth", "global os.system"), ("nope.pth", "no such file")]
  for name, msg in cases:
    out = tmp_path / f"out_{name}"
    code, _, err = run(capsys, "convert", "--var", str(tmp_path / name),
                       "--out", str(out))
    assert code == 2 and msg in err and err.count("\n") == 1, (name, err)
    assert not out.exists()
  assert not (tmp_path / "pwned").exists()


def test_wrong_preset_and_existing_output(golden_dir, converted, tmp_path,
                                          capsys):
  out = tmp_path / "o"
  code, _, err = run(capsys, "convert", "--var",
                     str(golden_dir / "var_tiny.pth"), "--out", str(out),
                     "--preset", "d16")
  assert code == 2 and "depth: preset 16, file 2" in err
  assert not out.exists()
  code, _, err = run(capsys, "convert", "--vae",
                     str(golden_dir / "vae_tiny.pth"), "--out", str(converted))
  assert code == 2 and "--overwrite" in err
  assert (converted / "var").exists()  # Untouched.
  code, _, err = run(capsys, "convert", "--var", str(golden_dir / "var_tiny.pth"),
                     "--vae", str(golden_dir / "vae_tiny.pth"), "--out", str(out),
                     "--preset", "tiny_saln512")
  assert code == 2 and "shared_aln" in err


def test_outputs_get_umask_permissions(tmp_path):
  """Atomic writes (mkstemp/mkdtemp: 0600/0700) end with ordinary modes."""
  import os
  import stat

  from var_jax import io as var_io
  old = os.umask(0o022)
  try:
    f = var_io.atomic_file(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
    with var_io.atomic_dir(tmp_path / "model") as d:
      (d / "config.json").write_text("{}")
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
  assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
  assert f.read_bytes() == b"x"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "model"]
