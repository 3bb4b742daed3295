"""The sampler and zero-shot editing against the official outputs."""

import numpy as np
import pytest
from conftest import assert_close_rel
from golden_models import golden_vae, golden_var

import jax.numpy as jnp
from flax import nnx

from var_jax.models.var import quantizer
from var_jax.sampling import filtering
from var_jax.sampling.var import edit
from var_jax.sampling.var.sampler import SampleOptions, Sampler

GREEDY = dict(top_k=1, top_p=0.0)
# (scale_loop, layer_loop): the two a job gets by default (`loops_for`) run
# in the default suite, the mixed pairs in the slow stage.
DEFAULT_LOOPS = [("python", "unrolled"), ("scan", "scan")]
LOOPS = DEFAULT_LOOPS + [pytest.param(("python", "scan"), marks=pytest.mark.slow),
                         pytest.param(("scan", "unrolled"),
                                      marks=pytest.mark.slow)]


def loop_opts(loops):
  return dict(scale_loop=loops[0], layer_loop=loops[1])


def guided_logits(vae, var, labels, idx, cfg):
  """Teacher-forced guided logits per scale for the ids `idx` (B, pn*pn):
  `(1 + t) cond - t uncond` with `t = cfg * si / (K - 1)`, as the sampler
  mixes them."""
  pn = var.cfg.patch_nums
  x = quantizer.idx_to_var_input(vae.quantize, [jnp.asarray(a) for a in idx],
                                 pn)
  labels = jnp.asarray(labels, jnp.int32)
  b = labels.shape[0]
  both = jnp.concatenate([labels, jnp.full_like(labels, var.cfg.num_classes)])
  logits = np.asarray(nnx.jit(lambda m, l, x: m(l, x))(
      var, both, jnp.concatenate([x, x])))
  cond, uncond = logits[:b], logits[b:]
  out, start = [], 0
  for si, n in enumerate(pn):
    t = cfg * si / (len(pn) - 1)
    sl = slice(start, start + n * n)
    out.append((1 + t) * cond[:, sl] - t * uncond[:, sl])
    start += n * n
  return out


def _nchw_to_nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def assert_tokens_equal(ours, ref, logits=None, name="idx"):
  """Identical ids, except where the official top two logits tie within 1e-4."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  bad = np.argwhere(ours != ref)
  for pos in bad:
    assert logits is not None, f"{name}: token differs at {tuple(pos)}"
    top2 = np.sort(np.asarray(logits)[tuple(pos)])[-2:]
    gap = top2[1] - top2[0]
    assert gap < 1e-4, f"{name}: token differs at {tuple(pos)} (gap {gap})"


def _check_greedy(out, g, pre):
  for si in range(len(out.idx)):
    assert_tokens_equal(out.idx[si], g[f"{pre}_idx_{si}"], name=f"idx_{si}")
  err = np.abs(np.asarray(out.images_BHWC)
               - _nchw_to_nhwc(g[f"{pre}_img"])).max()
  assert err <= 1e-3, err


@pytest.mark.parametrize("k,p", [(5, 0.0), (0, 0.9), (10, 0.8), (1, 0.0),
                                 (0, 0.5)])
def test_top_k_top_p_keep_masks(golden, k, p):
  g = golden("topk_topp")
  keep = filtering.keep_mask(g["logits"], k, p)
  np.testing.assert_array_equal(np.asarray(keep), g[f"keep_k{k}_p{p}"])


def test_teacher_forced_guided_logits_match_official(golden_dir, golden):
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  idx = [g[f"greedy_cfg1.5_idx_{si}"] for si in range(10)]
  ours = guided_logits(vae, var, g["label"], idx, 1.5)
  for si in range(10):
    assert_close_rel(ours[si], g[f"greedy_cfg1.5_logits_{si}"],
                     name=f"logits_{si}")


@pytest.mark.parametrize("loops", LOOPS)
def test_greedy_cfg15_tokens_and_images(golden_dir, golden, loops):
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  opts = SampleOptions(cfg=1.5, **loop_opts(loops), **GREEDY)
  out = Sampler(vae, var, opts)(g["label"], seed=0)
  for si in range(len(var.cfg.patch_nums)):
    assert_tokens_equal(out.idx[si], g[f"greedy_cfg1.5_idx_{si}"],
                        g[f"greedy_cfg1.5_logits_{si}"], name=f"idx_{si}")
  err = np.abs(np.asarray(out.images_BHWC)
               - _nchw_to_nhwc(g["greedy_cfg1.5_img"])).max()
  assert err <= 1e-3, err


def test_greedy_cfg4_tokens_and_images(golden_dir, golden):
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  out = Sampler(vae, var, SampleOptions(cfg=4.0, **GREEDY))(g["label"])
  _check_greedy(out, g, "greedy_cfg4.0")


@pytest.mark.parametrize("loops", [("scan", "scan"), pytest.param(
    ("python", "unrolled"), marks=pytest.mark.slow)])
def test_greedy_512px_shared_adaln(golden_dir, golden, loops):
  g = golden("var_tiny_saln512_io")
  vae = golden_vae(golden_dir, "tiny_saln512")
  var = golden_var(golden_dir, "tiny_saln512")
  opts = SampleOptions(cfg=1.5, **loop_opts(loops), **GREEDY)
  out = Sampler(vae, var, opts)(g["label"])
  _check_greedy(out, g, "greedy_cfg1.5")


@pytest.mark.parametrize("mode", ["inpaint", "outpaint", "classedit"])
def test_zero_shot_edits(golden_dir, golden, mode):
  g = golden("var_tiny_io")
  vae, var = golden_vae(golden_dir), golden_var(golden_dir)
  pre = f"edit_{mode}_"
  mask = edit.box_mask(16, (0.1, 0.1, 0.8, 0.8), inpaint=mode != "outpaint")
  np.testing.assert_array_equal(mask, g[pre + "mask"])
  images = np.asarray(g["img_u8"], np.float32) / 255  # [0, 1], as edit takes
  # An edit is one call: the job's default loops are the scan ones.
  sampler = Sampler(vae, var, SampleOptions(cfg=3.0, scale_loop="scan",
                                            layer_loop="scan", **GREEDY))
  out = edit.zero_shot_edit(sampler, vae, _nchw_to_nhwc(images), mask,
                            g[pre + "label"], seed=0, allow_null=True)
  keep = edit.keep_tokens(mask, var.cfg.patch_nums)
  start = 0
  for si in range(len(var.cfg.patch_nums)):
    # The golden ids are the drawn ones (the notebook replaces code vectors
    # only); the edited image's ids take the given ones where kept.
    ref = g[f"{pre}idx_{si}"]
    assert_tokens_equal(out.drawn[si], ref, name=f"drawn_{si}")
    k = keep[start:start + ref.shape[1]][None]
    np.testing.assert_array_equal(out.idx[si],
                                  np.where(k, g[f"idx_{si}"], ref))
    start += ref.shape[1]
  err = np.abs(np.asarray(out.images_BHWC)
               - _nchw_to_nhwc(g[pre + "img"])).max()
  assert err <= 1e-3, err


def test_scale_masks_follow_torch_bilinear():
  # Hand-checked against F.interpolate(bilinear) > 0.5 on the 16x16 box mask:
  # pn=13 row 6 sits exactly on a 0.5 weight, where rounding decides.
  m = edit.box_mask(16, (0.1, 0.1, 0.8, 0.8), inpaint=False)
  assert edit.scale_mask(m, 1).all()
  keep = edit.keep_tokens(m, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
  assert keep.shape == (680,)
  assert keep[-256:].sum() == m.sum()
  with pytest.raises(ValueError, match="must satisfy 0 <= y0"):
    edit.box_mask(16, (0.5, 0.1, 0.4, 0.8), inpaint=True)
