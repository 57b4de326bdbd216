"""Defaults shared by every experiment; experiment files override what differs.

Not an experiment itself: `configs/npp_b.py` etc. call `get_config()` here and change a few keys.
Every field is read by npp_jax; `npp_jax.config_lib.validate` checks them before anything compiles.
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0  # model init, dropout, label dropout and data order all derive from it.

  # Global batch (all processes). Must divide by data*fsdp devices and by the process count.
  c.global_batch_size = 256

  c.model = ml_collections.ConfigDict()
  c.model.variant = "B"  # LlamaGen size: B, L, XL, XXL, XXXL, 1B, 3B, 7B; None = set the sizes below.
  c.model.n_layer = ml_collections.FieldReference(None, field_type=int)  # overrides the variant's.
  c.model.n_head = ml_collections.FieldReference(None, field_type=int)  # overrides the variant's.
  c.model.dim = ml_collections.FieldReference(None, field_type=int)  # overrides the variant's.
  c.model.n_kv_head = ml_collections.FieldReference(None, field_type=int)  # None: no GQA.
  c.model.vocab_size = 16384  # VQ-16 codebook.
  c.model.num_classes = 1000  # the class table gets one more row: the null class for CFG.
  c.model.grid_size = 16  # 256 px / 16 px per token.
  c.model.token_dropout = 0.1
  c.model.resid_dropout = 0.1
  c.model.ffn_dropout = 0.1
  c.model.class_dropout = 0.1
  c.model.dtype = "bfloat16"  # matmul compute dtype; params, norms, logits and loss stay float32.
  c.model.remat = "none"  # none | full | dots | dots_no_batch.
  c.model.scan_unroll = 0  # layer-scan unroll; 0 = auto (full on CPU, rolled on TPU/GPU).
  # Kernel set (npp_jax/kernels.py): auto = chosen by the devices a program is compiled for
  # (cpu on CPU, xla on TPU/GPU, also when compiling for a TPU topology on a CPU host) | cpu | xla.
  c.model.kernels = "auto"
  c.model.rope_placement = "coarse"  # coarse (reference) | centre (patches at their fine-grid centre).

  # Next patch prediction schedule (paper: #L = 2, lambda = 1/2, 300 epochs).
  c.npp = ml_collections.ConfigDict()
  c.npp.epochs = 300
  c.npp.num_levels = 2  # #L; 1 = next-token prediction (LlamaGen baseline).
  c.npp.segment_factor = 0.5  # lambda.
  # Explicit patch sides per segment (paper Table 3a, e.g. (4, 1)); overrides the powers of two.
  c.npp.patch_sizes = ml_collections.FieldReference(None, field_type=tuple)
  c.npp.fractions = ml_collections.FieldReference(None, field_type=tuple)  # with patch_sizes.

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # token shards (local or gs://), see npp_jax/data.py.
  # A built-in data set (module npp_jax.NAME, see npp_jax/builtin_data.py) built into
  # <workdir>/NAME_tokens instead of data.path, with its own sample palette and report hooks:
  # "digits" = the CPU demo.
  c.data.builtin = ""
  c.data.train_split = "train"
  c.data.eval_split = ""  # "" = no evaluation.
  c.data.num_workers = 4  # grain worker processes per host (0 = in-process).
  c.data.steps_per_epoch = -1  # -1: num_train_records // global_batch_size, as the reference.

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4  # per 256 images of global batch; scaled linearly to global_batch_size.
  # "npp": per-segment warmup / constant / decay (the NPP code's --scheduler); "constant": the LR
  # never changes (LlamaGen's baselines, trained without --scheduler; end_lr, warmup_epochs and
  # decay_fraction are then unused).
  c.optim.schedule = "npp"
  c.optim.end_lr = 1e-5  # per 256 images; reached at the end of every segment ("npp").
  c.optim.warmup_epochs = 1.0  # per segment ("npp").
  c.optim.decay_fraction = 0.2  # linear decay over the last 20% of every segment ("npp").
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05  # on >= 2-D parameters only.
  c.optim.grad_clip = 1.0  # global norm.
  c.optim.ema_decay = 0.0  # 0 = no EMA of the params; e.g. 0.9999.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1 = the remaining devices: pure FSDP by default.
  c.mesh.tensor = 1

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 5000  # plus every segment boundary and the end.
  c.ckpt.keep = 3
  c.ckpt.init_from = ""  # params-only checkpoint dir, or hub weights (npp-b, hf://OWNER/REPO/FILE).

  # XLA options of the compiled train and eval steps when they are compiled for TPU (ignored on
  # CPU/GPU). XLA's windowed collective matmuls (all-gather / reduce-scatter decomposed into a
  # loop of partial matmuls) cost more HBM traffic than they hide for these models: off (the
  # figures are in README, "Making the TPU programs good").
  c.tpu_compiler_options = ml_collections.ConfigDict({
      "xla_tpu_enable_windowed_einsum_for_all_gather": False,
      "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False})

  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0 = only at the end (when data.eval_split is set).
  c.eval_batches = 50  # eval batches per evaluation (-1 = the whole split).
  c.sample_every_steps = 0  # > 0: a CFG class grid (sample.grid_classes) to TensorBoard every N.
  # > 0: a jax.profiler trace of this many steps, after each run's first 3, on every host,
  # into <workdir>/plugins/profile (TensorBoard's Profile tab).
  c.profile_steps = 0
  # Persistent compilation cache: a resumed run loads its compiled steps instead of compiling.
  # "{workdir}" is replaced by the workdir; a local path or gs://; "" = leave JAX's own setting
  # (off unless JAX_COMPILATION_CACHE_DIR is set). On a pod slice keep it on shared storage (the
  # gs:// workdir): only process 0 writes entries, every process reads them.
  c.compile_cache = "{workdir}/compile_cache"

  c.sample = ml_collections.ConfigDict()
  c.sample.cfg_scale = 2.0
  c.sample.cfg_interval = -1
  c.sample.temperature = 1.0
  c.sample.top_k = 0
  c.sample.top_p = 1.0
  c.sample.grid_classes = (207, 360, 387, 974, 88, 979, 417, 279)  # the reference's demo classes.
  c.sample.vq_checkpoint = ""  # VQ-16 for sample grids: "vq-16", hf://..., a converted dir, a .pt.
  return c
