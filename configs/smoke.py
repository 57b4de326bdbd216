"""Tiny synthetic config for tests and dry runs: 2 layers, width 64, vocab 64, #L=2 over few steps.

It needs token shards of 16x16 grids with vocab <= 64 and <= 10 classes (the tests write synthetic
ones, tests/train_helpers.py): --config.data.path=DIR; or the CPU demo's digits, built into the
workdir (their vocabulary is 16):

  python -m npp_jax.main --config=configs/smoke.py --workdir=/tmp/npp_smoke \
      --config.data.builtin=digits --config.model.vocab_size=16
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.global_batch_size = 8
  c.model.variant = None
  c.model.n_layer = 2
  c.model.n_head = 4
  c.model.dim = 64
  c.model.vocab_size = 64
  c.model.num_classes = 10
  c.model.dtype = "float32"
  c.npp.epochs = 4
  c.npp.num_levels = 2
  c.data.path = ""  # set by the tests (synthetic shards).
  c.data.num_workers = 0
  c.data.steps_per_epoch = 3
  c.optim.lr = 1e-3
  c.optim.warmup_epochs = 0.5
  c.ckpt.every_steps = 4
  c.ckpt.keep = 2
  c.log_every_steps = 2
  c.sample.grid_classes = (0, 1, 2, 3)
  return c
