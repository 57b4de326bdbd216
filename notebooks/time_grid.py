"""Times the sampling notebook's grid on this machine: NPP-B and VQ-16 shapes with random weights
(the time does not depend on the weights), CFG, the notebook's mesh and dtype choice.

  python notebooks/time_grid.py [--classes=4] [--per_class=2] [--variant=B]

Prints the seconds of the first grid (compiling the sampler and the VQ decoder) and of a second
one (sampling and decoding only); README and the notebook quote these figures.
"""
import argparse
import dataclasses
import tempfile
import time

import jax
from flax import nnx

from npp_jax import checkpoint, load, sample, sharding, vq
from npp_jax import model as model_lib


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classes", type=int, default=4)
  parser.add_argument("--per_class", type=int, default=2)
  parser.add_argument("--variant", default="B")
  args = parser.parse_args()
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  cfg = model_lib.config_for(args.variant, dtype=dtype, **load.NO_DROPOUT)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = vq.VQModel(vq.VQ_16, rngs=nnx.Rngs(1))
    checkpoint.save_params(tmp, nnx.state(tokenizer),
                           model_config=dataclasses.asdict(tokenizer.config))
    decoder = sample.make_decoder("vq", cfg, mesh, vq_checkpoint=tmp)
  classes = list(range(args.classes))
  for run in ("first grid (compiles)", "second grid"):
    t0 = time.time()
    grid = sample.sample_grid(model, mesh, classes, jax.random.key(0), decoder=decoder,
                              per_class=args.per_class, cfg_scale=2.0)
    print(f"{run}: {args.classes * args.per_class} images in {time.time() - t0:.1f} s "
          f"(GPT-{args.variant} {dtype} + VQ-16 on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s); grid {grid.shape})", flush=True)


if __name__ == "__main__":
  main()
