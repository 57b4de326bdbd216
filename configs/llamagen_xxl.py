"""LlamaGen-XXL baseline: next-token prediction (#L=1) for 300 epochs at a constant LR, the NTP
reference of NPP-XXL.

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/llamagen_xxl.py --workdir=gs://BUCKET/runs/llamagen_xxl \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "XXL"
  c.npp.num_levels = 1
  c.optim.schedule = "constant"  # LlamaGen trains without --scheduler: a constant LR.
  c.global_batch_size = 512
  c.sample.cfg_scale = 1.75
  return c
