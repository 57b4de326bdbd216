"""NPP-B (111M): #L=2, lambda=1/2, 300 epochs, batch 256, cfg 2.0 (paper Table 1: FID 4.47).

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/npp_b.py --workdir=gs://BUCKET/runs/npp_b \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "B"
  c.global_batch_size = 256
  c.sample.cfg_scale = 2.0
  return c
