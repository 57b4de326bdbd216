"""NPP-XL (775M): #L=2, lambda=1/2, 300 epochs, batch 256, lr 1e-4, cfg 1.70 (FID 2.65).

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/npp_xl.py --workdir=gs://BUCKET/runs/npp_xl \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "XL"
  # The paper: 1e-4 per 256 for all models (common's default). LlamaGen's own XL used 2e-4 at
  # batch 256 (LlamaGen issues #8, #14; see llamagen_xl.py); NPP's paper states no exception.
  c.global_batch_size = 256
  c.sample.cfg_scale = 1.70
  return c
