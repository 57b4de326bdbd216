"""NPP-XL (775M): #L=2, lambda=1/2, 300 epochs, batch 256 at lr 2e-4 as LlamaGen-XL, cfg 1.70 (FID 2.65).

Launch (every worker of a TPU pod slice, see launch/):
  python -m npp_jax.main --config=configs/npp_xl.py --workdir=gs://BUCKET/runs/npp_xl \
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common


def get_config(arg=None):
  c = common.get_config(arg)
  c.model.variant = "XL"
  c.global_batch_size = 256
  c.optim.lr = 2e-4  # LlamaGen trained XL at 2e-4 with batch 256.
  c.sample.cfg_scale = 1.70
  # FSDP in groups of 8 devices, data parallel across groups (python -m npp_jax.aot on v5p-64:
  # estimated MFU 41% / 51% at p = 2 / 1, vs 21-33% / 40-48% with 32, 4 or 1 devices per FSDP
  # group; see README "Compile for the slice before renting it"). No remat: it fits v5p's HBM.
  c.mesh.data = -1
  c.mesh.fsdp = 8
  c.model.remat = "none"
  return c
