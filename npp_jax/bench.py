"""Benchmark: `python -m npp_jax.bench --variant=B --batch_size=8 --patch_sizes=1,2 [--json]`.

Measures, on the current device, in one run:
  * a matmul peak (the best FLOP/s of 7 runs of a 2048^3 matmul in the benchmark dtype), the
    yardstick;
  * per patch size, the real training step (forward, backward, clipping, AdamW update): compile
    time, ms/step (median of >= 5 after warm-up), images/s, tokens/s, FLOPs per step from XLA's
    cost analysis and from the analytic count side by side, achieved FLOP/s and its fraction of
    the matmul peak, and peak memory from the compiled memory analysis;
  * the schedule's whole-run cost ratio measured from those step times against
    `patching.training_cost`;
  * data-loader samples/s (grain over token shards written to a temp dir);
  * sampling with CFG at each --sample_batch_sizes: token-by-token KV-cache decoding (tokens/s,
    images/s, speed-up over recomputing the prefix) and speculative Jacobi decoding at each
    --sjd_windows (tokens/s, forward passes per image, tokens accepted per forward pass);
  * with --checkpoint, the sampler runs the trained weights (SJD's acceptance depends on them: a
    randomly initialised model's zero output layer gives uniform logits, so every draft is
    accepted, SJD's best case); with --digits_quality also each method's samples' digit
    classifier agreement and the model's NLL of them (the digits demo).
Prints a markdown table, and with --json one JSON line.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time

from absl import app, flags, logging

from npp_jax import malloc  # imports no JAX: tune_malloc runs before JAX starts.

_VARIANT = flags.DEFINE_string("variant", "B", "Named model size; ignored when --dim is set.")
_N_LAYER = flags.DEFINE_integer("n_layer", 4, "Layers of a custom size (with --dim).")
_N_HEAD = flags.DEFINE_integer("n_head", 4, "Heads of a custom size (with --dim).")
_DIM = flags.DEFINE_integer("dim", None, "Width of a custom size (overrides --variant).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global training batch.")
_VOCAB = flags.DEFINE_integer("vocab_size", 16384, "Vocabulary.")
_PATCH = flags.DEFINE_list("patch_sizes", ["1", "2"], "Patch sizes to time.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_SAMPLE_BATCH = flags.DEFINE_list("sample_batch_sizes", ["8"], "Sampling batches ('' = skip).")
_CFG = flags.DEFINE_float("cfg_scale", 2.0, "CFG scale for the sampling benchmark.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per patch size (median reported).")
_JSON = flags.DEFINE_bool("json", False, "Also print one JSON line.")
_CONFIG = flags.DEFINE_string("config", None, "Take model/batch settings from this config file.")
_SJD_WINDOWS = flags.DEFINE_list("sjd_windows", ["4"], "SJD windows to sample with beside "
                                 "token-by-token decoding ('' = none).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Sample with these weights (training "
                                  "workdir or params checkpoint of --config's model).")
_QUALITY = flags.DEFINE_integer("digits_quality", 0, "With a digits --checkpoint: images per "
                                "class to score per method (0 = skip).")


_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "Keep freed memory in one glibc malloc arena (malloc.tune_malloc); off to "
    "measure with the allocator's defaults.")


def _median_time(fn, n):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak_gflops(dtype, n=2048, reps=7) -> float:
  """Best FLOP/s of an n^3 matmul over `reps` runs: the device's practical peak for this dtype.

  The best run, not the median: on a shared machine other jobs only ever slow a run down, and a
  median peak taken in a busy moment made steps read as > 100% of it.
  """
  import jax
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times) / 1e9


def bench_train(cfg, batch_size, patch_sizes, steps):
  import jax
  import jax.numpy as jnp
  import ml_collections
  from npp_jax import flops, optim, patching, sharding, train
  config = ml_collections.ConfigDict({
      "seed": 0, "global_batch_size": batch_size,
      "optim": {"lr": 1e-4, "end_lr": 1e-5, "schedule": "npp", "warmup_epochs": 1.0, "decay_fraction": 0.2,
                "b1": 0.9, "b2": 0.95, "weight_decay": 0.05, "grad_clip": 1.0, "ema_decay": 0.0}})
  schedule = patching.make_schedule(total_steps=1000, steps_per_epoch=10, epochs=100,
                                    grid_size=cfg.grid_size, num_levels=1)
  tx = optim.make_optimizer(config, schedule, 10)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rows = []
  for p in patch_sizes:
    import flax.nnx as nnx
    from npp_jax import model as model_lib
    model = sharding.create_sharded(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model)
    with sharding.use_mesh(mesh):
      state = {"step": jnp.zeros((), jnp.int32), "params": params,
               "opt_state": jax.jit(tx.init)(params)}
    fns = train.StepFns(graphdef, tx, optim.learning_rate(config, schedule, 10), config, mesh, state)
    rng = jax.random.key(1)
    batch = {"codes": jax.random.randint(rng, (batch_size, cfg.num_tokens), 0, cfg.vocab_size),
             "labels": jax.random.randint(rng, (batch_size,), 0, cfg.num_classes)}
    batch = jax.device_put(batch, fns.batch_shardings)
    t0 = time.perf_counter()
    state, m = fns(p, state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    compiled = fns.compiled[p]
    holder = {"state": state}

    def run():
      holder["state"], mm = fns(p, holder["state"], batch)
      jax.block_until_ready(mm)
    run()
    dt = _median_time(run, steps)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    peak = None if mem is None else int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                        + mem.output_size_in_bytes - mem.alias_size_in_bytes)
    rows.append({"patch_size": p, "batch_size": batch_size, "compile_s": compile_s,
                 "ms_per_step": dt * 1e3, "images_per_s": batch_size / dt,
                 "tokens_per_s": batch_size * cfg.num_tokens / dt,
                 "gflops_xla": float(cost.get("flops", 0.0)) / 1e9,
                 "gflops_analytic": batch_size * flops.train_flops_per_image(cfg, p) / 1e9,
                 "peak_memory_bytes": peak})
  return rows


def bench_data(steps=50, batch_size=32):
  import numpy as np
  from npp_jax import data
  with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    with data.ShardWriter(d, "train", grid_size=16, vocab_size=16384, num_classes=1000,
                          num_views=20) as w:
      for _ in range(4096):
        w.write(int(rng.integers(1000)), rng.integers(0, 16384, (20, 256)))
    data.finalize(d, num_processes=1)
    it = iter(data.make_train_dataset(d, split="train", global_batch_size=batch_size, seed=0,
                                      process_index=0, process_count=1))
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
      next(it)
    return steps * batch_size / (time.perf_counter() - t0)


def bench_sample(cfg, batch_sizes, cfg_scale, windows, model=None):
  """Token-by-token KV-cache decoding with CFG (and its speed-up over recomputing the prefix at
  every step), then SJD at each window: one row per (batch size, method)."""
  import jax
  import jax.numpy as jnp
  import flax.nnx as nnx
  import numpy as np
  from npp_jax import model as model_lib
  from npp_jax import sample, sharding
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  if model is None:
    model = sharding.create_sharded(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  rows = []
  for b in batch_sizes:
    labels = np.arange(b, dtype=np.int32) % cfg.num_classes
    ar = None
    for window in [0] + list(windows):
      method = "sjd" if window else "ar"
      sampler = sample.make_sampler(model, mesh, cfg_scale=cfg_scale, method=method,
                                    window=window, return_forwards=True)
      _, forwards = jax.block_until_ready(sampler(labels, jax.random.key(0), 0))
      dt = _median_time(lambda: jax.block_until_ready(sampler(labels, jax.random.key(0), 0)), 3)
      row = {"batch_size": b, "cfg_scale": cfg_scale, "method": method,
             "tokens_per_s": b * cfg.num_tokens / dt, "images_per_s": b / dt}
      if method == "ar":
        ar = dt
        # A recompute decoder runs the full-length forward (2B rows with CFG) once per token.
        rows_cfg = 2 * b if cfg_scale != 1.0 else b
        codes = jnp.zeros((rows_cfg, cfg.num_tokens), jnp.int32)
        lab = jnp.zeros((rows_cfg,), jnp.int32)
        step = jax.jit(lambda c, l: model.logits(model.hidden(c, l)[:, -1:]))
        jax.block_until_ready(step(codes, lab))
        t_step = _median_time(lambda: jax.block_until_ready(step(codes, lab)), 3)
        row["speedup_vs_recompute"] = t_step * cfg.num_tokens / dt
        row["ms_per_forward"] = dt / cfg.num_tokens * 1e3
      else:
        forwards = np.asarray(forwards)
        # Each image needs forwards[i] passes; the batch runs until its slowest image is done.
        row.update(window=window, forward_passes_per_image=float(forwards.mean()),
                   forward_passes_per_batch=int(forwards.max()),
                   accepted_per_step=cfg.num_tokens / float(forwards.mean()),
                   ms_per_forward=dt / int(forwards.max()) * 1e3, speedup_vs_ar=ar / dt)
      logging.info("sampling: %s", row)
      rows.append(row)
  return rows


def digits_quality(model, windows, cfg_scale, per_class):
  """Per method: how often a digit classifier agrees with the sampled class, and the model's
  mean NLL (nats/token, class-conditional, no guidance) of the sampled tokens."""
  import jax
  import numpy as np
  from npp_jax import digits, sample
  classify = digits.fit_digits_classifier()
  labels = np.repeat(np.arange(model.cfg.num_classes, dtype=np.int32), per_class)
  nll_fn = jax.jit(lambda c, l: -jax.nn.log_softmax(model(c, l), -1))
  rows = []
  for window in [0] + list(windows):
    method = "sjd" if window else "ar"
    codes = np.asarray(sample.generate(model, labels, jax.random.key(1), cfg_scale=cfg_scale,
                                       method=method, window=window))
    nll = np.take_along_axis(np.asarray(nll_fn(codes, labels)), codes[..., None], -1)
    agree = classify(digits.palette_decode(codes)) == labels
    rows.append({"method": method, "window": window, "images": len(labels),
                 "classifier_agreement": float(agree.mean()), "nll_per_token": float(nll.mean())})
  return rows


def main(argv):
  del argv
  malloc_tuned = _MALLOC.value and malloc.tune_malloc()
  import jax
  import jax.numpy as jnp
  from npp_jax import model as model_lib
  from npp_jax import patching
  if _CONFIG.value:
    from npp_jax import config_lib
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_config", _CONFIG.value)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    cfg = config_lib.model_config(config)
    batch = config.global_batch_size
  else:
    kw = dict(vocab_size=_VOCAB.value, dtype=_DTYPE.value)
    cfg = (model_lib.ModelConfig(dim=_DIM.value, n_layer=_N_LAYER.value, n_head=_N_HEAD.value, **kw)
           if _DIM.value else model_lib.config_for(_VARIANT.value, **kw))
    batch = _BATCH.value
  patch_sizes = [int(p) for p in _PATCH.value]
  peak = matmul_peak_gflops(jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)
  rows = bench_train(cfg, batch, patch_sizes, max(_STEPS.value, 5))
  for r in rows:
    r["achieved_gflops"] = r["gflops_analytic"] / (r["ms_per_step"] / 1e3)
    r["fraction_of_peak"] = r["achieved_gflops"] / peak
  step_ms = {r["patch_size"]: r["ms_per_step"] for r in rows}
  schedule_cost = None
  if 1 in step_ms and len(step_ms) > 1:
    sched = patching.make_schedule(total_steps=3000, steps_per_epoch=10, epochs=300,
                                   grid_size=cfg.grid_size, num_levels=len(step_ms),
                                   segment_factor=0.5)
    if set(sched.patch_sizes) <= set(step_ms):
      measured = sum((s.end - s.start) * step_ms[s.patch_size] for s in sched.segments)
      schedule_cost = {"analytic": patching.training_cost(sched),
                       "measured": measured / (sched.total_steps * step_ms[1])}
  windows = [int(w) for w in _SJD_WINDOWS.value if w]
  model = quality = None
  if _CHECKPOINT.value:
    if not _CONFIG.value:
      raise app.UsageError("--checkpoint needs --config (the config of the checkpoint's model).")
    from npp_jax import load, sharding
    model = load.load_model(_CHECKPOINT.value, config,
                            mesh=sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    cfg = model.cfg
  if _QUALITY.value:
    if model is None or config.data.builtin != "digits":
      raise app.UsageError("--digits_quality needs --config=configs/digits.py and a --checkpoint "
                           "of the digits model.")
    quality = digits_quality(model, windows, _CFG.value, _QUALITY.value)
  samples = bench_sample(cfg, [int(b) for b in _SAMPLE_BATCH.value if b], _CFG.value, windows,
                         model)
  result = {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
            "malloc_tuned": malloc_tuned,
            "model": {"dim": cfg.dim, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                      "vocab_size": cfg.vocab_size, "dtype": cfg.dtype},
            "matmul_peak_gflops": peak, "train": rows, "sample": samples,
            "schedule_cost": schedule_cost, "data_samples_per_s": bench_data(),
            "checkpoint": _CHECKPOINT.value, "digits_quality": quality}
  print(f"device: {result['device']}; matmul peak {peak:.1f} GFLOP/s ({cfg.dtype}); "
        f"malloc tuned: {malloc_tuned}")
  print("| patch | batch | compile s | ms/step | img/s | tok/s | GFLOP xla | GFLOP analytic | "
        "GFLOP/s | of peak | peak mem MB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mem = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
    print(f"| {r['patch_size']} | {r['batch_size']} | {r['compile_s']:.1f} | "
          f"{r['ms_per_step']:.0f} | {r['images_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
          f"{r['gflops_xla']:.1f} | {r['gflops_analytic']:.1f} | {r['achieved_gflops']:.1f} | "
          f"{r['fraction_of_peak']:.0%} | {mem} |")
  if schedule_cost:
    print(f"schedule cost (#L={len(step_ms)}, lambda=1/2): analytic {schedule_cost['analytic']:.3f}, "
          f"measured {schedule_cost['measured']:.3f}")
  print(f"sampling with {'the weights of ' + _CHECKPOINT.value if model else 'random weights'}:")
  for s in samples:
    head = (f"sampling batch {s['batch_size']} cfg {s['cfg_scale']} {s['method']}"
            f"{' window %d' % s['window'] if s['method'] == 'sjd' else ''}: "
            f"{s['tokens_per_s']:.0f} tokens/s, {s['images_per_s']:.2f} images/s, ")
    if s["method"] == "ar":
      print(head + f"{s['ms_per_forward']:.1f} ms per forward pass, "
            f"{s['speedup_vs_recompute']:.0f}x a full-recompute decode")
    else:
      print(head + f"{s['forward_passes_per_image']:.1f} forward passes per image (batch "
            f"{s['forward_passes_per_batch']}), {s['accepted_per_step']:.2f} tokens per pass, "
            f"{s['ms_per_forward']:.1f} ms per pass, {s['speedup_vs_ar']:.2f}x token by token")
  for q in quality or []:
    print(f"digits quality {q['method']}{' window %d' % q['window'] if q['window'] else ''} "
          f"({q['images']} images): classifier agrees on {q['classifier_agreement']:.1%}, NLL "
          f"{q['nll_per_token']:.4f} nats/token")
  print(f"data loader: {result['data_samples_per_s']:.0f} samples/s")
  if _JSON.value:
    print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
