"""npp_jax: Next Patch Prediction (NPP) in JAX/Flax NNX."""
import os

# etils.epath would route gs:// through tf.io.gfile whenever TensorFlow is installed (clu's
# writers need it installed); use fsspec/gcsfs instead so training never imports TensorFlow.
os.environ.setdefault("EPATH_USE_TF", "false")
