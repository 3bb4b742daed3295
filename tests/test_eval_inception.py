"""The FID InceptionV3 against torch-fidelity's outputs (golden `eval/`).

The golden weights are random (rebuilt here from the seed recipe of the
golden README), written as a torch `.pth` and loaded through the torch-free
reader and the name table, so the whole path a user's weights take is tested.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx
from pth_writer import write_pth

from var_jax.convert import inception as ci
from var_jax.errors import InceptionWeightsError
from var_jax.models import inception as mi

# golden name -> our output name. `spatial` is TF `mixed_6/conv` (Mixed_6d's
# 1x1 branch, the ADM sFID feature); `mixed_6a_branch3x3` is the same cut of
# TF `mixed_3/conv` (Mixed_6a's 3x3 branch).
_OUTPUTS = {"64": "64", "192": "192", "768": "768", "2048": "pool",
            "logits_unbiased": "logits_unbiased", "logits": "logits",
            "spatial": "spatial", "mixed_6a_branch3x3": "mixed_3_spatial"}
_TAGS = ("256", "64x96", "299")


@pytest.fixture(scope="module")
def golden_keys(golden_dir):
  return json.loads((golden_dir / "eval" / "inception_keys.json").read_text())


@pytest.fixture(scope="module")
def golden_io(golden_dir):
  return dict(np.load(golden_dir / "eval" / "inception_io.npz"))


@pytest.fixture(scope="module")
def golden_model(golden_keys, tmp_path_factory):
  sd = ci.random_state_dict(golden_keys["seed"], keys=golden_keys["keys"])
  path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
  write_pth(path, sd)
  return ci.load_inception(path)


def test_our_key_list_is_torch_fidelitys_state_dict(golden_keys):
  ours = [[k, list(shape), dtype] for k, shape, dtype in ci.torch_keys()]
  assert ours == golden_keys["keys"]


def test_features_match_torch_fidelity(golden_model, golden_io):
  # Every input size resized on its own (the resize is checked bit for bit
  # below), the network compiled once for all of them.
  sizes = [len(golden_io[f"img_{tag}"]) for tag in _TAGS]
  resized = jnp.concatenate([mi.resize_tf1(jnp.asarray(golden_io[f"img_{t}"]))
                             for t in _TAGS])
  out = jax.device_get(nnx.jit(lambda m, x: m.features(x))(golden_model,
                                                           resized))
  starts = np.cumsum([0] + sizes)
  for tag, a, b in zip(_TAGS, starts[:-1], starts[1:]):
    for gname, ours in _OUTPUTS.items():
      assert_close_rel(out[ours][a:b], golden_io[f"{tag}_{gname}"], rel=1e-4,
                       name=f"{tag}/{gname}")
    assert out["spatial"][a:b].shape == (b - a, 2023)


@pytest.mark.parametrize("tag", _TAGS)
def test_resize_is_bit_exact_tf1(golden_io, tag):
  resized = mi.resize_tf1(jnp.asarray(golden_io[f"img_{tag}"][:1]))
  np.testing.assert_array_equal(np.asarray(resized), golden_io[f"{tag}_resized"])


@pytest.mark.slow
def test_spatial_is_the_adm_tensor_mixed_6_conv(golden_model, golden_io):
  # mixed_6/conv is Mixed_6d's 1x1 branch: recompute it from the blocks.
  m = golden_model
  x = mi.resize_tf1(jnp.asarray(golden_io["img_299"][:1]))
  x = (x - 128.0) / 128.0
  x = m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x)))
  x = mi._max_pool(x, 2, 0)
  x = mi._max_pool(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(x)), 2, 0)
  for blk in (m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b,
              m.Mixed_6c):
    x = jnp.concatenate(blk(x), axis=-1)
  tap = m.Mixed_6d.branch1x1(x)
  assert tap.shape == (1, 17, 17, 192)
  out = m(jnp.asarray(golden_io["img_299"][:1]))
  assert_close_rel(out["spatial"], tap[..., :7].reshape(1, -1), rel=1e-5,
                   name="spatial")


def _zeros_state_dict():
  return {k: np.zeros(s, np.int64 if d == "int64" else np.float32)
          for k, s, d in ci.torch_keys()}


def test_all_problems_in_one_error():
  sd = _zeros_state_dict()
  del sd["Mixed_7c.branch_pool.conv.weight"]
  sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  sd["aux.weight"] = np.zeros((3,), np.float32)
  with pytest.raises(InceptionWeightsError) as e:
    ci.convert_state_dict(sd, where="w.pth")
  msg = str(e.value)
  assert "Mixed_7c.branch_pool.conv.weight" in msg
  assert "fc.weight (1000,2048) != (1008,2048)" in msg
  assert "aux.weight" in msg
  assert "\n" not in msg


def test_num_batches_tracked_optional_and_module_prefix(tmp_path):
  sd = {k: v for k, v in _zeros_state_dict().items()
        if not k.endswith("num_batches_tracked")}
  sd["fc.bias"] = np.arange(1008, dtype=np.float32)
  path = tmp_path / "w.pth"
  write_pth(path, {f"module.{k}": v for k, v in sd.items()})
  model = ci.load_inception(path)
  np.testing.assert_array_equal(np.asarray(model.fc.bias.value), sd["fc.bias"])


def test_missing_file_names_the_release_url(tmp_path):
  with pytest.raises(InceptionWeightsError, match=ci.WEIGHTS_URL):
    ci.load_inception(tmp_path / "nope.pth")
