"""The PyTorch reference models of the peer benchmark (the ``.[peers]`` extra).

Imported only by :mod:`vit_edge.tools.bench_peers`; torch is never a dependency
of the package.

* ``deit_*`` and ``mobilevitv2_*``: timm, the references of vit_edge's converters
  (README "Fidelity").
* ``edgevit_*``: the official saic-fi/edgevit ``src/edgevit.py``, loaded from the
  path given (``--edgevit_src``): it is not on PyPI, and it is not copied here.
* ``tformer_*``: TFormer has no reference code. :class:`TorchTFormer` types
  vit_edge's reconstruction (``vit_edge/models/tformer.py``) in PyTorch, with the
  parameter names its ``convert_torch_state_dict`` reads, so the benchmark's
  torch-vs-JAX parity check confirms the two compute the same function.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

TIMM_NAMES = {
    "deit_tiny_patch16": "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16": "deit_tiny_distilled_patch16_224",
    "deit_small_patch16": "deit_small_patch16_224",
    **{f"mobilevitv2_{w}": f"mobilevitv2_{w}"
       for w in ("050", "075", "100", "125", "150", "175", "200")},
}
EDGEVIT_NAMES = ("edgevit_xxs", "edgevit_xs", "edgevit_s")
TFORMER_DEPTHS = {"tformer_s": (2, 2, 6, 2), "tformer_m": (4, 4, 12, 4),
                  "tformer_l": (6, 6, 18, 6)}
SUPPORTED = tuple(TIMM_NAMES) + EDGEVIT_NAMES + tuple(TFORMER_DEPTHS)


def load_official_edgevit(path: Optional[str]):
  """The official saic-fi/edgevit ``src/edgevit.py`` as a module (loaded once)."""
  if not path:
    raise ValueError("EdgeViT's reference is the official saic-fi/edgevit code, which "
                     "is not on PyPI: clone https://github.com/saic-fi/edgevit and pass "
                     "--edgevit_src=<clone>/src/edgevit.py.")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--edgevit_src={path!r} is not a file; expected the "
                            "official repository's src/edgevit.py.")
  if "edgevit_official" not in sys.modules:
    spec = importlib.util.spec_from_file_location("edgevit_official", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's register_model looks the module up.
    spec.loader.exec_module(module)
  return sys.modules["edgevit_official"]


def build(name: str, num_classes: int, image_size: int,
          edgevit_src: Optional[str] = None) -> nn.Module:
  """The reference PyTorch model of registry name `name`, randomly initialised."""
  if name in TIMM_NAMES:
    import timm  # pylint: disable=g-import-not-at-top
    # ViTs have position embeddings for one grid; the others take any size.
    size = {"img_size": image_size} if name.startswith("deit") else {}
    return timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=num_classes,
                             **size)
  if name in EDGEVIT_NAMES:
    return getattr(load_official_edgevit(edgevit_src), name)(
        pretrained=False, num_classes=num_classes, img_size=image_size)
  if name in TFORMER_DEPTHS:
    return TorchTFormer(TFORMER_DEPTHS[name], num_classes=num_classes)
  raise ValueError(f"No PyTorch reference for {name!r}; the peer benchmark knows "
                   f"{', '.join(SUPPORTED)}.")


def randomize_batch_norm_statistics(model: nn.Module, seed: int = 0) -> None:
  """Non-trivial running statistics, so that the parity check covers them."""
  generator = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
      with torch.no_grad():
        module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape,
                                                    generator=generator))
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape,
                                                  generator=generator))


# ----------------------------------------------------------------------------------
# TFormer (reconstruction), in the PyTorch layout of tformer.convert_torch_state_dict.


class _HybridPool(nn.Module):
  """mean of avg/max pooling at 3, 5, 7 (stride 1, same padding) minus x, then 1x1."""

  def __init__(self, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(dim, dim, 1)

  def forward(self, x):
    pooled = []
    for k in (3, 5, 7):
      pooled.append(F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False))
      pooled.append(F.max_pool2d(x, k, 1, k // 2))
    return self.proj(torch.stack(pooled).mean(0) - x)


class _PcsFfn(nn.Module):
  """1x1 group conv d->4d (2 groups), channel shuffle, GELU, 1x1 group conv 4d->d."""

  def __init__(self, dim: int, groups: int = 2):
    super().__init__()
    self.groups = groups
    self.fc1 = nn.Conv2d(dim, 4 * dim, 1, groups=groups)
    self.fc2 = nn.Conv2d(4 * dim, dim, 1, groups=groups)

  def forward(self, x):
    x = self.fc1(x)
    b, c, h, w = x.shape
    x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)
    return self.fc2(F.gelu(x))


class _Block(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.norm1 = nn.GroupNorm(1, dim)
    self.token_mixer = _HybridPool(dim)
    self.norm2 = nn.GroupNorm(1, dim)
    self.mlp = _PcsFfn(dim)
    self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim))
    self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim))

  def forward(self, x):
    x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
    return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class _Downsample(nn.Module):

  def __init__(self, dim_in: int, dim_out: int):
    super().__init__()
    self.proj = nn.Conv2d(dim_in, dim_out, 3, 2, 1)

  def forward(self, x):
    return self.proj(x)


class TorchTFormer(nn.Module):
  """vit_edge's TFormer reconstruction in PyTorch (PoolFormer's module names)."""

  def __init__(self, depths: Sequence[int], widths: Sequence[int] = (64, 128, 320, 512),
               num_classes: int = 1000):
    super().__init__()
    self.patch_embed = _Downsample(3, widths[0])
    self.patch_embed.proj = nn.Conv2d(3, widths[0], 7, 4, 2)
    network = []
    for i, (depth, width) in enumerate(zip(depths, widths)):
      network.append(nn.Sequential(*[_Block(width) for _ in range(depth)]))
      if i + 1 < len(widths):
        network.append(_Downsample(width, widths[i + 1]))
    self.network = nn.ModuleList(network)
    self.norm = nn.GroupNorm(1, widths[-1])
    self.head = nn.Linear(widths[-1], num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    for stage in self.network:
      x = stage(x)
    return self.head(self.norm(x).mean((2, 3)))
