"""The VAR training loss, its per-scale metrics and progressive weighting.

The official loss is per-token cross entropy weighted 1/L, summed over the
L tokens and averaged over the batch. Progressive training (train only the
scales up to a stage, with the newest one ramped in) changes only those
weights: tokens past the stage get weight 0. The reference truncates the
sequence instead; because attention is block-causal, the logits of the kept
tokens are identical either way, and one full-length program avoids a
recompilation per stage (at the cost of computing the unused tail).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from var_jax.models import scales
from var_jax.training import schedule


def token_ce(logits_BLV: jax.Array, targets_BL: jax.Array,
             label_smooth: float = 0.0) -> jax.Array:
  """`nn.CrossEntropyLoss(label_smoothing=ls, reduction='none')`, (B, L)."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  if not label_smooth:
    return nll_BL
  smooth_BL = -jnp.mean(logp_BLV, axis=-1)
  return (1 - label_smooth) * nll_BL + label_smooth * smooth_BL


def loss_weights(patch_nums, prog_si: int = -1, prog_wp: float = 1.0
                 ) -> np.ndarray:
  """(L,) token weights: 1/L, zero past stage `prog_si`, its scale x prog_wp."""
  lay = scales.layout(tuple(patch_nums))
  w_L = np.full((lay.seq_len,), 1.0 / lay.seq_len, np.float32)
  if 0 <= prog_si < lay.num_scales - 1:  # The last stage is plain training.
    begin, end = lay.begin_ends[prog_si]
    w_L[begin:end] *= min(max(prog_wp, 0.0), 1.0)
    w_L[end:] = 0.0
  return w_L


def step_loss_weights(it: int, *, patch_nums, pg: float, pg0: int,
                      wp_it: float, max_it: int, prog_wp_it: float
                      ) -> tuple[np.ndarray, int]:
  """Token weights and progressive stage of iteration `it` (official rule)."""
  kw = dict(pg=pg, pg0=pg0, wp_it=wp_it, max_it=max_it,
            num_scales=len(patch_nums))
  si = schedule.prog_stage(it, **kw)
  wp = schedule.prog_warmup(it, prog_wp_it=prog_wp_it, **kw)
  return loss_weights(patch_nums, si, wp), si


def weighted_loss(logits_BLV, targets_BL, weights_L, label_smooth=0.0):
  """The training objective: sum_t w_t CE_t, averaged over the batch."""
  ce_BL = token_ce(logits_BLV, targets_BL, label_smooth)
  return jnp.mean(jnp.sum(ce_BL * weights_L[None], axis=1))


def scale_metrics(logits_BLV, targets_BL, patch_nums
                  ) -> dict[str, jax.Array]:
  """Unsmoothed CE and top-1 accuracy (%) per scale, and over all tokens.

  Returns batch sums (`*_sum`, with `count` = batch size) so that data-
  parallel shards and accumulation steps combine by addition.
  """
  ce_BL = token_ce(logits_BLV, targets_BL)
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  lay = scales.layout(tuple(patch_nums))
  ce_s = [jnp.sum(jnp.mean(c, axis=1)) for c in lay.split(ce_BL)]
  acc_s = [jnp.sum(jnp.mean(h, axis=1)) for h in lay.split(hit_BL)]
  return {
      "ce_sum": jnp.sum(jnp.mean(ce_BL, axis=1)),
      "acc_sum": jnp.sum(jnp.mean(hit_BL, axis=1)) * 100.0,
      "scale_ce_sum": jnp.stack(ce_s),
      "scale_acc_sum": jnp.stack(acc_s) * 100.0,
      "count": jnp.asarray(ce_BL.shape[0], jnp.float32),
  }


def finalize_metrics(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Batch sums -> means: Lm, accuracy, per-scale loss/accuracy (tail = last)."""
  n = sums["count"]
  scale_ce, scale_acc = sums["scale_ce_sum"] / n, sums["scale_acc_sum"] / n
  return {"loss_mean": sums["ce_sum"] / n, "acc": sums["acc_sum"] / n,
          "loss_tail": scale_ce[-1], "acc_tail": scale_acc[-1],
          "scale_loss": scale_ce, "scale_acc": scale_acc}
