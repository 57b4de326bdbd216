"""npp_jax: Next Patch Prediction (NPP) in JAX/Flax NNX."""
