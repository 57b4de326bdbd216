"""NPP ablations of the paper (Tables 2-4) on NPP-B by default; pick one with the config argument.

  --config=configs/ablation.py:ps4          patch 4x4 for the first half, then 1x1 (Table 3a)
  --config=configs/ablation.py:ps2          patch 2x2 then 1x1 (= NPP default)
  --config=configs/ablation.py:lambda_2_3   #L=2, lambda=2/3 (cost 0.5)   also lambda_3_4, lambda_4_5
  --config=configs/ablation.py:levels_3     #L=3, lambda=1/2 (cost 0.578) also levels_4
  append ",L" for NPP-L, e.g. configs/ablation.py:lambda_3_4,L

Launch:
  python -m npp_jax.main --config=configs/ablation.py:levels_3 --workdir=gs://BUCKET/runs/levels_3 \\
      --config.data.path=gs://BUCKET/imagenet256_tokens
"""
from configs import common

_ABLATIONS = {
    "ps2": dict(patch_sizes=(2, 1), fractions=(0.5, 0.5)),
    "ps4": dict(patch_sizes=(4, 1), fractions=(0.5, 0.5)),
    "lambda_2_3": dict(num_levels=2, segment_factor=2 / 3),
    "lambda_3_4": dict(num_levels=2, segment_factor=3 / 4),
    "lambda_4_5": dict(num_levels=2, segment_factor=4 / 5),
    "levels_3": dict(num_levels=3, segment_factor=0.5),
    "levels_4": dict(num_levels=4, segment_factor=0.5),
}


def get_config(arg="ps2"):
  name, _, variant = (arg or "ps2").partition(",")
  if name not in _ABLATIONS:
    raise ValueError(f"configs/ablation.py: unknown ablation {name!r}; choose one of {sorted(_ABLATIONS)}.")
  c = common.get_config()
  c.model.variant = variant or "B"
  for key, value in _ABLATIONS[name].items():
    c.npp[key] = value
  return c
