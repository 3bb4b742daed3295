"""The official Infinity code (FoundationVision/Infinity), run on a CPU.

Imported by tools/make_infinity_patchify_reference.py and
tools/bench_infinity_torch.py:

  import official_infinity as oi
  oi.import_official("/tmp/Infinity")          # a checkout (or `git archive`)
  vae = oi.build_vae(codebook_dim=32)          # the 2B model's tokenizer shape
  model = oi.build_infinity(vae, depth=2, embed_dim=128, num_heads=2,
                            text_channels=256)
  text = oi.pack_text([states_0, states_1])   # each (len_i, text_channels)
  out = oi.sample(model, vae, text, cfg=3.0, tau=0.5, top_k=900, top_p=0.97)

What stands in for what the official code needs and this machine lacks (as
`shared/golden/infinity/README.md` describes the golden set's run):
- flash_attn: `flash_attn_varlen_kvpacked_func` (the cross-attention and the
  text pool) becomes exact float32 attention over each sequence, its result
  returned in the input dtype; the official `CrossAttention` hands it
  bfloat16 q and kv even in float32, so its output is rounded to bfloat16 as
  flash-attn's is. `flash_attn_func` (used only with the customised
  flash-attn kernel, never here) is exact attention too. flash_attn.ops is
  absent, so the blocks use the official RMSNorm and MLP fallbacks.
- torch.compile: the fused adaptive norms (`infinity/models/fused_op.py`,
  used with `fused_norm=True`) run eagerly.
- timm (DropPath, drop_path, register_model, SoftTargetCrossEntropy), pytz,
  imageio and torchvision: small stand-ins, only where the module is
  missing; on the sampling path they are imported but not used (DropPath is
  the identity in eval mode).

Models are built through the official constructors (`vae_model` of
infinity/models/bsq_vae/vae.py, `Infinity` of infinity/models/infinity.py)
with the settings of tools/run_infinity.py, and random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import pathlib
import subprocess
import sys
import time
import types

_IMPORTED = {}


# --- stand-ins -------------------------------------------------------------

def _attend(q, k, v, scale, causal=False):
  """Exact attention in float32: q (H, Lq, c), k and v (H, Lk, c)."""
  import torch
  s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
  if causal:
    lq, lk = s.shape[-2:]
    keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    s = s.masked_fill(~keep, -math.inf)
  return torch.matmul(torch.softmax(s, -1), v.float())


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    **ignored):
  """flash-attn's dense call: q, k, v (B, L, H, c) -> (B, Lq, H, c), exact,
  in q's dtype."""
  if dropout_p:
    raise NotImplementedError("dropout in the attention stand-in")
  scale = softmax_scale or q.shape[-1] ** -0.5
  out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                scale, causal)
  return out.transpose(1, 2).to(q.dtype)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None,
                                    causal=False, **ignored):
  """flash-attn's packed call: q (Nq, H, c), kv (Nk, 2, H, c), sequence i
  being rows cu[i]:cu[i+1] of each -> (Nq, H, c); exact float32 attention
  over each sequence, returned in q's dtype."""
  import torch
  if dropout_p:
    raise NotImplementedError("dropout in the attention stand-in")
  scale = softmax_scale or q.shape[-1] ** -0.5
  cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
  out = torch.empty(q.shape, dtype=torch.float32)
  for i in range(len(cq) - 1):
    rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
    o = _attend(q[rows].transpose(0, 1), kv[keys, 0].transpose(0, 1),
                kv[keys, 1].transpose(0, 1), scale, causal)
    out[rows] = o.transpose(0, 1)
  return out.to(q.dtype)


def _module(name, **attrs):
  mod = types.ModuleType(name)
  mod.__dict__.update(attrs)
  return mod


def _missing(name) -> bool:
  try:
    importlib.import_module(name)
    return False
  except ImportError:
    return True


def _timm_stand_in():
  import torch
  from torch import nn

  def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    if drop_prob == 0.0 or not training:
      return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
      mask.div_(keep)
    return x * mask

  class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
      super().__init__()
      self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
      return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

  class SoftTargetCrossEntropy(nn.Module):
    def forward(self, x, target):
      return torch.sum(-target * torch.log_softmax(x, -1), -1).mean()

  layers = _module("timm.models.layers", DropPath=DropPath,
                   drop_path=drop_path)
  models = _module("timm.models", register_model=lambda fn: fn,
                   layers=layers)
  loss = _module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy)
  timm = _module("timm", models=models, loss=loss)
  return {"timm": timm, "timm.models": models, "timm.models.layers": layers,
          "timm.loss": loss}


@contextlib.contextmanager
def _eager_compile():
  """`torch.compile` as a no-op decorator while the official modules load."""
  import torch
  real = torch.compile

  def eager(fn=None, **unused):
    return fn if fn is not None else (lambda f: f)

  torch.compile = eager
  try:
    yield
  finally:
    torch.compile = real


def import_official(repo) -> types.SimpleNamespace:
  """Makes the checkout at `repo` importable and imports what sampling
  needs; returns its modules (`infinity`, `basic`, `vae`,
  `dynamic_resolution`). Idempotent."""
  repo = str(pathlib.Path(repo).resolve())
  if repo in _IMPORTED:
    return _IMPORTED[repo]
  if _IMPORTED:
    raise RuntimeError("another official checkout is already imported")
  if not (pathlib.Path(repo) / "infinity" / "models" / "infinity.py").is_file():
    raise FileNotFoundError(f"{repo}: not an Infinity checkout (no "
                            "infinity/models/infinity.py)")
  sys.path.insert(0, repo)
  # The official `infinity` folder has no __init__.py: bind the name to it
  # explicitly, so that no other `infinity` module on sys.path can win.
  pkg = _module("infinity")
  pkg.__path__ = [str(pathlib.Path(repo) / "infinity")]
  sys.modules["infinity"] = pkg
  # The official flash_attn imports must find these; no real flash-attn is
  # used even where installed (it needs a GPU).
  sys.modules["flash_attn"] = _module(
      "flash_attn", flash_attn_func=flash_attn_func,
      flash_attn_varlen_kvpacked_func=flash_attn_varlen_kvpacked_func)
  if _missing("timm"):
    sys.modules.update(_timm_stand_in())
  if _missing("pytz"):
    sys.modules["pytz"] = _module("pytz", timezone=lambda name: None)
  if _missing("imageio"):
    sys.modules["imageio"] = _module("imageio")
  if _missing("torchvision"):
    transforms = _module("torchvision.transforms")
    sys.modules["torchvision"] = _module("torchvision", transforms=transforms)
    sys.modules["torchvision.transforms"] = transforms
  with contextlib.redirect_stdout(sys.stderr), _eager_compile():
    importlib.import_module("infinity.models.fused_op")
    ns = types.SimpleNamespace(
        infinity=importlib.import_module("infinity.models.infinity"),
        basic=importlib.import_module("infinity.models.basic"),
        vae=importlib.import_module("infinity.models.bsq_vae.vae"),
        dynamic_resolution=importlib.import_module(
            "infinity.utils.dynamic_resolution"))
  if ns.basic.flash_attn_varlen_kvpacked_func is not \
      flash_attn_varlen_kvpacked_func:
    raise RuntimeError("the official code did not take the attention "
                       "stand-in")
  _IMPORTED[repo] = ns
  return ns


def _official():
  if not _IMPORTED:
    raise RuntimeError("call import_official(repo) first")
  return next(iter(_IMPORTED.values()))


def official_commit(repo) -> str | None:
  """The checkout's commit, when `repo` is a git work tree."""
  try:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                         capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return out.stdout.strip() or None


# --- models ----------------------------------------------------------------

def scale_schedule(pn: str = "0.06M", h_div_w: float = 1.0):
  """The official (1, h, w) schedule of the transformer (tools/run_infinity.py
  takes `dynamic_resolution_h_w[h_div_w][pn]['scales']`)."""
  dr = _official().dynamic_resolution
  return [(1, h, w) for _, h, w in dr.dynamic_resolution_h_w[h_div_w][pn]
          ["scales"]]


def build_vae(codebook_dim: int = 32, apply_spatial_patchify: bool = False,
              base_ch: int = 128, num_res_blocks: int = 2, ch_mult=None,
              seed: int = 0, ckpt=None):
  """The official BSQ tokenizer (`vae_model`, eval mode) with PyTorch's
  default init. patch_size and ch_mult follow run_infinity.py's
  `load_visual_tokenizer` (16, (1, 2, 4, 4, 4); with spatial patchify 8,
  (1, 2, 4, 4)) unless `ch_mult` is given; `vae_model` fixes base_ch=128 and
  num_res_blocks=2, so other values are passed through to `AutoEncoder`.
  Widths must be multiples of 32 or 24 (the official GroupNorm). `ckpt`: a
  `{'vae': state_dict}` file for `vae_model` to load (default: none)."""
  import torch
  off = _official()
  patch = 8 if apply_spatial_patchify else 16
  if ch_mult is None:
    ch_mult = (1, 2, 4, 4) if apply_spatial_patchify else (1, 2, 4, 4, 4)
  if 2 ** (len(ch_mult) - 1) != patch:
    raise ValueError(f"ch_mult {ch_mult} does not shrink by the patch size "
                     f"{patch}")
  real = off.vae.AutoEncoder

  def autoencoder(args):
    args = argparse.Namespace(**{**vars(args), "base_ch": base_ch,
                                 "num_res_blocks": num_res_blocks})
    return real(args)

  torch.manual_seed(seed)
  off.vae.AutoEncoder = autoencoder
  try:
    with contextlib.redirect_stdout(sys.stderr):
      vae = off.vae.vae_model(None if ckpt is None else str(ckpt), "dynamic",
                              codebook_dim, 2 ** codebook_dim,
                              test_mode=True, patch_size=patch,
                              encoder_ch_mult=list(ch_mult),
                              decoder_ch_mult=list(ch_mult))
  finally:
    off.vae.AutoEncoder = real
  return vae.eval()


def build_infinity(vae, *, depth: int, embed_dim: int, num_heads: int,
                   text_channels: int = 2048, block_chunks: int | None = None,
                   pn: str = "0.06M", apply_spatial_patchify: bool = False,
                   text_maxlen: int = 512, mlp_ratio: float = 4.0,
                   drop_path_rate: float = 0.1, seed: int = 0):
  """The official `Infinity` with tools/run_infinity.py's `load_infinity`
  settings, its constructor's init (eval mode, no grads). `block_chunks`
  defaults to 8 where it divides depth (the released models), else the
  largest of 4, 2 that does; sampling needs more than one chunk."""
  import torch
  off = _official()
  if block_chunks is None:
    block_chunks = next((c for c in (8, 4, 2) if depth % c == 0), None)
  if not block_chunks or block_chunks < 2 or depth % block_chunks:
    raise ValueError(f"depth {depth}: the official sampler needs block_chunks"
                     " > 1 dividing depth")
  torch.manual_seed(seed)
  with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
    model = off.infinity.Infinity(
        vae_local=vae, text_channels=text_channels, text_maxlen=text_maxlen,
        shared_aln=True, raw_scale_schedule=None, checkpointing="full-block",
        customized_flash_attn=False, fused_norm=True, pad_to_multiplier=128,
        use_flex_attn=False, add_lvl_embeding_only_first_block=1,
        use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2,
        pn=pn, apply_spatial_patchify=int(bool(apply_spatial_patchify)),
        inference_mode=True, train_h_div_w_list=[1.0], depth=depth,
        embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate, block_chunks=block_chunks)
  model.eval()
  model.requires_grad_(False)
  return model


def perturb_constants(module, std: float = 0.1, seed: int = 0) -> list[str]:
  """Adds N(0, std^2) noise to every parameter whose entries are all equal
  (biases, norm weights, attention scales the constructors set to a
  constant), so that a name-mapping mistake cannot hide. Returns their
  names."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  names = []
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.is_floating_point() and p.numel() and bool(p.min() == p.max()):
        p.add_(torch.randn(p.shape, generator=gen) * std)
        names.append(name)
  return names


def round_floats(module, dtype) -> None:
  """Rounds every float parameter and buffer to values of `dtype` (kept in
  float32), so that a state dict saved in `dtype` holds the exact weights."""
  import torch
  with torch.no_grad():
    for t in list(module.parameters()) + list(module.buffers()):
      if t.dtype == torch.float32:
        t.copy_(t.to(dtype).float())


# --- sampling --------------------------------------------------------------

def pack_text(states):
  """The official text input `(kv_compact, lens, cu_seqlens_k,
  max_seqlen_k)` of per-prompt states, each (len_i, text_channels)."""
  import torch
  states = [torch.as_tensor(s, dtype=torch.float32) for s in states]
  lens = [int(s.shape[0]) for s in states]
  cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0,
                                                          dtype=torch.int32)
  return torch.cat(states), lens, cu, max(lens)


def null_text(model, lens):
  """The packed null text the official sampler pairs with prompts of these
  lengths (its `cfg_uncond[:len]` per prompt)."""
  import torch
  return torch.cat([model.cfg_uncond.detach()[:n] for n in lens])


@contextlib.contextmanager
def _watch(model, vae, record: bool):
  """Records, during one official sampling call, the time in `vae.decode`,
  its input and output, and when `record` each scale's sampler input
  (logits after guidance and 1/tau), drawn bits, bits as the tokenizer
  takes them, and next input."""
  off = _official()
  seen = {"decode_s": 0.0, "logits": [], "bits": [], "next_inputs": [],
          "tokenizer_bits": []}
  real_draw = off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_
  real_decode = vae.decode
  lfq = vae.quantizer.lfq
  real_to_codes = lfq.indices_to_codes

  def draw(logits, **kw):  # logits (B, l * D, 2); filtered in place.
    if record:
      seen["logits"].append(logits.detach().clone())
    idx = real_draw(logits, **kw)
    if record:
      seen["bits"].append(idx[:, :, 0].clone())
    return idx

  def decode(z):
    t0 = time.perf_counter()
    img = real_decode(z)
    seen["decode_s"] += time.perf_counter() - t0
    seen["summed_codes"], seen["image"] = z, img
    return img

  def to_codes(idx, *args, **kw):  # idx (B, 1, h, w, d) at the tokenizer's grid
    seen["tokenizer_bits"].append(idx.detach().clone())
    return real_to_codes(idx, *args, **kw)

  def embed_hook(mod, args):
    seen["next_inputs"].append(args[0].detach().clone())

  hook = model.word_embed.register_forward_pre_hook(embed_hook) if record \
      else None
  if record:
    off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = draw
    lfq.indices_to_codes = to_codes
  vae.decode = decode
  try:
    yield seen
  finally:
    off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = \
        real_draw
    del vae.decode
    if record:
      del lfq.indices_to_codes
    if hook is not None:
      hook.remove()


def sample(model, vae, text, *, cfg=3.0, tau=0.5, top_k=900, top_p=0.97,
           cfg_insertion_layer: int = 0, seed: int = 0, pn: str = "0.06M",
           h_div_w: float = 1.0, record: bool = False,
           autocast_dtype=None) -> dict:
  """One official `autoregressive_infer_cfg` call (kv-cache, vae_type =
  the tokenizer's bits, `inference_mode=True`, ret_img).

  `text`: `pack_text`'s tuple; `cfg`, `tau`: a number or one per scale;
  `cfg_insertion_layer`: 0 guides the logits, n < 0 the hidden states after
  block depth + n.

  Returns a dict: `image` (B, 3, H, W) float in [-1, 1] (vae.decode's
  output), `image_uint8` (B, H, W, 3) as returned (BGR), `summed_codes`
  (B, d, 1, h, w) at the tokenizer's grid, `total_s`, `decode_s`; with
  `record`, per scale lists `logits` (B, h*w, 2*D) (after guidance and
  1/tau, before top-k/top-p; D bits per token as the transformer sees
  them), `bits` (B, h*w, D) int, `next_inputs` (B, h*w, D) of scales
  1.. (the transformer's input before word_embed) and `tokenizer_bits`
  (B, h', w', d): the bits as the tokenizer takes them (after the
  unpatchify, when the tokenizer patchifies space). `autocast_dtype`
  (e.g. torch.bfloat16): the call under `torch.autocast("cpu", ...)`, as
  tools/run_infinity.py runs it under CUDA autocast."""
  import contextlib
  import torch
  sched = scale_schedule(pn, h_div_w)
  n = len(sched)
  cfg_list = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * n
  tau_list = list(tau) if isinstance(tau, (list, tuple)) else [tau] * n
  kv, lens, cu, maxlen = text
  bsz = len(lens)
  amp = (contextlib.nullcontext() if autocast_dtype is None else
         torch.autocast("cpu", dtype=autocast_dtype))
  with _watch(model, vae, record) as seen, torch.inference_mode(), amp:
    t0 = time.perf_counter()
    _, _, img = model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=sched, label_B_or_BLT=(kv, lens, cu, maxlen),
        g_seed=seed, B=bsz, negative_label_B_or_BLT=None, cfg_list=cfg_list,
        tau_list=tau_list, top_k=top_k, top_p=top_p, returns_vemb=1,
        cfg_insertion_layer=[cfg_insertion_layer],
        vae_type=vae.codebook_dim, ret_img=True, inference_mode=True)
    total = time.perf_counter() - t0
  out = {"image": seen["image"], "image_uint8": img,
         "summed_codes": seen["summed_codes"].unsqueeze(2),
         "total_s": total, "decode_s": seen["decode_s"]}
  if record:
    d = model.codebook_dim
    out["logits"] = [l.reshape(bsz, -1, 2 * d) for l in seen["logits"]]
    out["bits"] = [b.reshape(bsz, -1, d) for b in seen["bits"]]
    out["next_inputs"] = seen["next_inputs"]
    out["tokenizer_bits"] = [t[:, 0] for t in seen["tokenizer_bits"]]
  return out
