"""LlamaGen-L baseline: next-token prediction (#L=1) for 300 epochs at a constant LR, the NTP
reference of NPP-L.

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/llamagen_l.py --workdir=gs://BUCKET/runs/llamagen_l \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "L"
  c.npp.num_levels = 1
  c.optim.schedule = "constant"  # LlamaGen trains without --scheduler: a constant LR.
  c.global_batch_size = 256
  c.sample.cfg_scale = 2.0
  return c
