"""The T5 text encoder against the official run's (a random 2-layer
gated-GELU T5EncoderModel saved as the Hub lays out google/flan-t5-xl)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel

from var_jax.convert.infinity import t5 as t5_convert
from var_jax.errors import ConvertError
from var_jax.models.infinity import t5


@pytest.fixture(scope="module")
def text(golden_dir):
  with np.load(golden_dir / "infinity" / "golden_infinity.npz") as z:
    return {k[len("text/"):]: z[k] for k in z.files if k.startswith("text/")}


@pytest.fixture(scope="module")
def t5_dir(golden_dir):
  return golden_dir / "infinity" / "t5_tiny"


@pytest.fixture(scope="module")
def encoder(t5_dir):
  return t5_convert.load_encoder(t5_dir)


def test_config_is_read_from_the_hub_file(encoder):
  assert encoder.cfg == t5.T5Config(vocab_size=256, d_model=256, d_kv=64,
                                    d_ff=512, num_layers=2, num_heads=4)


def test_hidden_states_match_official(encoder, text):
  lt = int(text["lens"].max())
  # Padded to 512 as Infinity pads; the first max(lens) positions are the
  # golden's (a key never depends on later padding: it is masked).
  ids, mask = text["input_ids"], text["attention_mask"]
  full = jax.jit(lambda i, m: encoder(i, m))(ids, mask)
  assert_close_rel(full[:, :lt], text["t5_hidden"], name="t5_hidden")
  short = encoder(ids[:, :lt], mask[:, :lt])
  assert_close_rel(short, text["t5_hidden"], name="t5_hidden (cut)")
  packed = np.concatenate([np.asarray(full[i, :n])
                           for i, n in enumerate(text["lens"])])
  assert_close_rel(packed, text["kv_compact"], name="kv_compact")


def test_relative_buckets_follow_the_t5_rule():
  b = np.asarray(t5.relative_buckets(1, 300, 32, 128))[0]
  back = np.asarray(t5.relative_buckets(300, 1, 32, 128))[:, 0]
  # Keys after the query use buckets 16..31, before it 0..15: exact below 8
  # positions away, then 8 + 8 log(n / 8) / log(16) (n = 16 -> 10), the
  # last bucket of each half from 128 on.
  assert b[0] == 0 and b[1:8].tolist() == list(range(17, 24))
  assert back[1:8].tolist() == list(range(1, 8))
  assert b[16] == 16 + 10 and back[16] == 10 and back[32] == 12
  assert b[128:].tolist() == [31] * 172 and back[200] == 15
  assert (np.diff(b[1:]) >= 0).all() and (np.diff(back[1:]) >= 0).all()


def test_checkpoint_problems_are_one_error(t5_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  sd = load_file(str(t5_dir / "model.safetensors"))
  sd["encoder.final_layer_norm.weight"] = np.ones(7, np.float32)
  sd.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight")
  sd["encoder.extra.weight"] = np.zeros(2, np.float32)
  sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros(
      (2, 2), np.float32)  # A full encoder-decoder file: not read.
  save_file(sd, str(tmp_path / "model.safetensors"))
  shutil.copy(t5_dir / "config.json", tmp_path / "config.json")
  with pytest.raises(ConvertError) as e:
    t5_convert.load_encoder(tmp_path)
  msg = str(e.value)
  assert "encoder.final_layer_norm.weight: expected (256), found (7)" in msg
  assert "missing keys: encoder.block.1.layer.1.DenseReluDense.wo.weight" in msg
  assert "unknown keys: encoder.extra.weight" in msg and "decoder" not in msg


@pytest.mark.slow  # A second encoder.
def test_sharded_checkpoint_with_an_index(t5_dir, tmp_path, encoder, text):
  from safetensors.numpy import load_file, save_file
  sd = load_file(str(t5_dir / "model.safetensors"))
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for f, keys in shards.items():
    save_file({k: sd[k] for k in keys}, str(tmp_path / f))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
  shutil.copy(t5_dir / "config.json", tmp_path / "config.json")
  got = t5_convert.load_encoder(tmp_path)
  ids = jnp.asarray(text["input_ids"][:, :16])
  np.testing.assert_array_equal(got(ids), encoder(ids))
  (tmp_path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(ConvertError, match="names shards the directory lacks: "
                     "model-00002-of-00002.safetensors"):
    t5_convert.load_encoder(tmp_path)


@pytest.mark.parametrize("change,needle", [
    ({"feed_forward_proj": "relu"}, "only flan-t5's gated-gelu"),
    ({"d_model": None}, "missing field 'd_model'")])
def test_unsupported_configs_are_one_line(t5_dir, tmp_path, change, needle):
  cfg = json.loads((t5_dir / "config.json").read_text())
  for k, v in change.items():
    if v is None:
      cfg.pop(k)
    else:
      cfg[k] = v
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConvertError, match=needle):
    t5_convert.read_encoder_dir(tmp_path)
