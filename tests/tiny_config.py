"""A tiny, fast training config for tests (digits at 32x32, a narrow TFormer).

arg: comma-separated "model=NAME" to pick another registered model (kept tiny with
overrides below), e.g. ``tests/tiny_config.py:model=edgevit_xxs``.
"""

from vit_edge import recipes

# Overrides that make each family small enough to compile in seconds.
TINY_OVERRIDES = {
    "tformer_s": {"depths": (1, 1, 1, 1), "widths": (8, 16, 24, 32)},
    "edgevit_xxs": {"depths": (1, 1, 1, 1)},
    "deit_tiny_patch16": {"embed_dim": 32, "depth": 2, "num_heads": 2},
}


def get_config(arg=None):
  options = dict(a.split("=", 1) for a in (arg or "").split(",") if a)
  model = options.get("model", "tformer_s")
  c = recipes.base_config(model)
  c.model_overrides.update(TINY_OVERRIDES.get(model, {}))
  c.image_size = 32
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint.every_steps = 2
  c.checkpoint.async_save = False
  c.optim.warmup_steps = 1
  c.lock()
  return c


def make(arg=None, **updates):
  """get_config(arg) with dotted-field updates, e.g. ``make(**{"optim.lr": 1e-2})``."""
  config = get_config(arg)
  with config.unlocked():
    for key, value in updates.items():
      *parents, leaf = key.split(".")
      target = config
      for p in parents:
        target = target[p]
      target[leaf] = value
  return config
