"""NPP-L (343M): #L=2, lambda=1/2, 300 epochs, batch 256, cfg 1.75 (paper Table 1: FID 2.76).

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/npp_l.py --workdir=gs://BUCKET/runs/npp_l \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "L"
  c.global_batch_size = 256
  c.sample.cfg_scale = 1.75
  return c
