"""NPP-XXL (1.4B): #L=2, lambda=1/2, 300 epochs, batch 512 (lr 2e-4), cfg 1.65 (FID 2.55).

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/npp_xxl.py --workdir=gs://BUCKET/runs/npp_xxl \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "XXL"
  c.global_batch_size = 512  # lr 1e-4 per 256 -> 2e-4, as LlamaGen-XXL.
  c.sample.cfg_scale = 1.65
  c.model.remat = "none"  # fits v5p's HBM without remat (python -m npp_jax.aot; README "Cost").
  return c
