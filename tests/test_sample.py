"""Tests for npp_jax.sample / sample_cli: KV-cache decoding, CFG, sampling math, reference parity,
sharding invariance, grids and the resumable ADM `.npz` CLI (loading: test_load.py).

The reference parity uses `tests/fixtures/llamagen_gpt_tiny.npz` (fixture README section 1,
"Greedy generation with CFG"). The other tests use a tiny GQA model on an 8x8 token grid.
"""
import dataclasses
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings, strategies as st
from PIL import Image

from configs import smoke
from naming import raises_naming
from npp_jax import checkpoint as ckpt_lib
from npp_jax import config_lib, convert, decode, sample, sample_cli, sharding, token_choice
from npp_jax import model as model_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TAU = 1e-4  # near-tie threshold for greedy tokens (fixture README)
TINY = model_lib.ModelConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=64,
                             num_classes=10, grid_size=8, **sample.NO_DROPOUT)
LABELS = np.array([3, 10, 0, 7, 7, 1, 9, 4], np.int32)  # 10 = the null class


def _randomised(cfg, seed=0):
  """A model whose zero-initialised output layer and unit norms are redrawn, so logits vary."""
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 4))
  state["output"][...] = 0.5 * jax.random.normal(next(keys), state["output"][...].shape)
  for norm in (state["norm"]["scale"], state["layers"]["attention_norm"]["scale"],
               state["layers"]["ffn_norm"]["scale"]):
    norm[...] = 1.0 + 0.1 * jax.random.normal(next(keys), norm[...].shape)
  nnx.update(model, state)
  return model


@pytest.fixture(scope="module")
def tiny():
  return _randomised(TINY)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, codes_BxN, labels_B):
  return nnx.merge(graphdef, state)(codes_BxN, labels_B)


def _teacher_forced(model, codes, labels, cfg_scale):
  """Cond, uncond and CFG-combined logits of a full forward on the generated tokens."""
  graphdef, state = nnx.split(model)
  both = _forward(graphdef, state, jnp.concatenate([codes, codes]),
                  jnp.concatenate([labels, jnp.full_like(labels, model.cfg.num_classes)]))
  cond, uncond = np.split(np.asarray(both), 2)
  return cond, uncond, uncond + (cond - uncond) * cfg_scale


@functools.partial(jax.jit, static_argnames="opts")
def _redraw(logits_BxNxV, rng, offset, opts):
  """Every step's token from its logits with the documented keys fold_in(fold_in(rng, i), t)."""
  b, n, _ = logits_BxNxV.shape
  rows = jax.vmap(jax.random.fold_in, (None, 0))(rng, offset + jnp.arange(b))
  keys_BxN = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, jnp.arange(n)))(rows)
  return jax.vmap(lambda k, l: sample.draw(l, k, opts), in_axes=1, out_axes=1)(
      keys_BxN, logits_BxNxV)


def _generated(model, cfg_scale, rng=0, **kw):
  codes, logits = sample.generate(model, LABELS, jax.random.key(rng), cfg_scale=cfg_scale,
                                  return_logits=True, **kw)
  return np.asarray(codes), np.asarray(logits)


@pytest.fixture(scope="module")
def cfg2(tiny):
  return _generated(tiny, 2.0)


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("cfg_scale", [2.0, 1.0])
def test_kv_cache_logits_equal_full_forward_at_every_step(tiny, cfg2, cfg_scale):
  codes, logits = cfg2 if cfg_scale == 2.0 else _generated(tiny, cfg_scale)
  assert codes.shape == (8, 64) and codes.dtype == np.int32 and logits.shape == (8, 64, 64)
  cond, _, combined = _teacher_forced(tiny, codes, LABELS, cfg_scale)
  np.testing.assert_allclose(logits, combined, rtol=0, atol=2e-5)
  if cfg_scale == 1.0:  # no null rows: plain conditional sampling.
    np.testing.assert_allclose(logits, cond, rtol=0, atol=2e-5)
  # Every token is the draw from its step's logits with the keys of its global sample index.
  opts = sample.SamplingOptions(cfg_scale=cfg_scale)
  np.testing.assert_array_equal(codes, _redraw(logits, jax.random.key(0), 0, opts))


def test_full_recompute_reference_gives_the_same_samples(tiny, cfg2):
  codes, logits = sample.generate_full_recompute(tiny, LABELS, jax.random.key(0), cfg_scale=2.0,
                                                 return_logits=True)
  np.testing.assert_array_equal(codes, cfg2[0])
  np.testing.assert_allclose(logits, cfg2[1], rtol=0, atol=2e-5)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), phase=st.integers(1, 100))
def test_cache_phases_cover_every_step_with_a_long_enough_cache(n, phase):
  phases = decode.cache_phases(n, phase)
  ends = [end for end, _ in phases]
  assert ends == sorted(set(ends)) and ends[-1] == n and all(e % phase == 0 for e in ends[:-1])
  # Step t writes position t and reads 0..t: the phase ending at `end` needs `end` positions.
  assert all(end <= length < end + 8 and length % 8 == 0 for end, length in phases)


def test_bfloat16_decoding_follows_the_bfloat16_forward(tiny):
  """The decode layouts (fused qkv / w13, flat wo, bf16 cache) keep the compute dtype's maths."""
  model = _randomised(dataclasses.replace(TINY, dtype="bfloat16"))
  codes, logits = sample.generate(model, LABELS, jax.random.key(0), cfg_scale=2.0,
                                  return_logits=True)
  _, _, combined = _teacher_forced(model, np.asarray(codes), LABELS, 2.0)
  scale = np.abs(combined).max()
  assert np.abs(np.asarray(logits) - combined).max() < 0.02 * scale  # measured: 0.003


def test_cfg_interval_temperature_top_k_top_p(tiny):
  opts = dict(cfg_scale=3.0, cfg_interval=5, temperature=0.7, top_k=20, top_p=0.9)
  codes, logits = _generated(tiny, rng=1, **opts)
  cond, _, combined = _teacher_forced(tiny, codes, LABELS, 3.0)
  # Steps 0..6 are guided (prefill + decode steps i <= 5); later steps use cond logits only.
  # cfg_scale 3 makes logits up to ~35, where a float32 ulp is ~4e-6: the cached and the full
  # forward sum in different orders (and XLA:CPU's threaded matmuls split sums by load), so
  # allow ~12 ulps there.
  np.testing.assert_allclose(logits[:, :7], combined[:, :7], rtol=2e-6, atol=5e-5)
  np.testing.assert_allclose(logits[:, 7:], cond[:, 7:], rtol=2e-6, atol=5e-5)
  assert np.abs(combined[:, 7:] - cond[:, 7:]).max() > 1e-2
  np.testing.assert_array_equal(
      codes, _redraw(logits, jax.random.key(1), 0, sample.SamplingOptions(**opts)))
  flat = logits.reshape(-1, 64) / 0.7
  kept = np.isfinite(_hf_filter(flat, 20, 0.9))
  assert kept[np.arange(len(flat)), codes.reshape(-1)].all()
  assert 1 < kept.sum(-1).mean() < 20


def test_reference_greedy_cfg_generation():
  """top_k=1 is greedy; tokens equal the fixture's up to its near-tie rule, step logits 1e-4."""
  z = np.load(FIXTURES / "llamagen_gpt_tiny.npz")
  sd = {k: z[k] for k in z.files if not k.startswith("io/")}
  model = convert.load_gpt(sd, n_head=4, **sample.NO_DROPOUT)
  labels = z["io/gen/labels"].astype(np.int32)
  codes, logits = sample.generate(model, labels, jax.random.key(5), cfg_scale=2.0, top_k=1,
                                  return_logits=True)
  codes, logits = np.asarray(codes), np.asarray(logits)
  np.testing.assert_array_equal(codes, logits.argmax(-1))  # greedy
  ref, margin = z["io/gen/tokens"], z["io/gen/margin"]
  for b in range(2):
    tie = np.flatnonzero(margin[b] < TAU)
    s = tie[0] if len(tie) else 256
    assert s == 256  # the fixture promises no near-tie at TAU = 1e-4: all tokens must match.
    np.testing.assert_array_equal(codes[b, :s], ref[b, :s])
  np.testing.assert_allclose(logits[:, z["io/gen/logit_steps"]], z["io/gen/logits"],
                             rtol=0, atol=1e-4)


def test_same_seed_same_images_on_1_or_8_devices_and_any_batch_split(tiny, cfg2):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sampled = sample.make_sampler(tiny, mesh, cfg_scale=2.0)(LABELS, jax.random.key(0))
  assert sampled.sharding.spec[0] == sharding.BATCH_AXES
  np.testing.assert_array_equal(sample.to_host(sampled), cfg2[0])
  local = sample.to_global(mesh, LABELS, process_local=True)  # one process: its slice is all
  again = sample.make_sampler(tiny, mesh, cfg_scale=2.0)(local, jax.random.key(0))
  np.testing.assert_array_equal(sample.to_host(again), cfg2[0])
  halves = [sample.generate(tiny, LABELS[i:i + 4], jax.random.key(0), cfg_scale=2.0,
                            sample_offset=i, return_logits=True)[0] for i in (0, 4)]
  np.testing.assert_array_equal(np.concatenate(halves), cfg2[0])


def test_sampler_rejects_a_batch_that_does_not_split_over_the_mesh(tiny):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  with raises_naming(ValueError, "batch size", 6, 4, "fsdp"):
    sample.make_sampler(tiny, mesh, cfg_scale=2.0)(LABELS[:6], jax.random.key(0))


@pytest.mark.parametrize("labels, names", [
    (np.array([11]), ("labels_B", "[0, 10]", 11)),
    (np.array([-1, 2]), ("labels_B", "[0, 10]", -1)),
    (np.array([1.5]), ("labels_B", "float64")),
    (np.zeros((2, 2), np.int32), ("labels_B", (2, 2))),
])
def test_bad_labels_raise(tiny, labels, names):
  with raises_naming(ValueError, *names):
    sample.generate(tiny, labels, jax.random.key(0), cfg_scale=2.0)


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"), (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(cfg_interval=-2), "cfg_interval=-2"), (dict(cfg_scale=float("nan")), "cfg_scale"),
])
def test_bad_sampling_options_raise(kw, match):
  with pytest.raises(ValueError, match=match):
    sample.SamplingOptions(**kw).validate()


# ----------------------------------------------------------------------------- sampling math

def _hf_filter(logits, top_k, top_p):
  """HF transformers v3 `top_k_top_p_filtering`, literally, in float32 numpy (as torch runs it)."""
  logits = np.array(logits, np.float32)
  if top_k > 0:
    kth = np.sort(logits, -1)[..., -min(top_k, logits.shape[-1])][..., None]
    logits[logits < kth] = -np.inf
  if top_p < 1.0:
    order = np.argsort(-logits, -1, kind="stable")
    srt = np.take_along_axis(logits, order, -1)
    probs = np.exp(srt - srt[..., :1])
    cum = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].copy()
    remove[..., 0] = False
    mask = np.zeros_like(remove)
    np.put_along_axis(mask, order, remove, -1)
    logits[mask] = -np.inf
  return logits


def _kept(logits, top_k=0, top_p=1.0):
  filtered = token_choice.filter_logits(jnp.asarray(logits, jnp.float32), top_k, top_p)
  return np.isfinite(np.asarray(filtered))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 5.0),
       top_k=st.sampled_from([0, 1, 3, 10, 24, 30]), top_p=st.floats(0.01, 1.0))
def test_filter_matches_hf_v3(seed, scale, top_k, top_p):
  logits = (np.random.default_rng(seed).normal(size=(3, 24)) * scale).astype(np.float32)
  assume(len(np.unique(logits)) == logits.size)  # ties: HF keeps an arbitrary subset
  ref = _hf_filter(logits, top_k, top_p)
  srt = np.sort(ref, -1)[..., ::-1]
  probs = np.exp(srt - srt[..., :1])
  cum = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
  assume(np.abs(cum - top_p).min() > 1e-5)  # not at float32 rounding distance from the cut
  np.testing.assert_array_equal(_kept(logits, top_k, top_p), np.isfinite(ref))


def test_top_p_edge_cases():
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
  assert _kept(logits, top_p=1.0).all()
  np.testing.assert_array_equal(_kept(logits, top_p=1e-6),
                                logits == logits.max(-1, keepdims=True))
  # Exact thresholds (these probabilities are exact in float32): the first token whose
  # cumulative probability reaches or crosses top_p is kept, as in HF v3.
  probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float32)
  logits = np.log(probs)[None]
  np.testing.assert_array_equal(np.asarray(jax.nn.softmax(logits)), probs[None])
  for top_p, n in [(0.5, 2), (0.5 - 1e-3, 1), (0.5 + 1e-3, 2), (0.75, 3), (0.875, 4),
                   (0.8, 3)]:
    expected = np.isfinite(_hf_filter(logits, 0, top_p))
    assert expected.sum() == n
    np.testing.assert_array_equal(_kept(logits, top_p=top_p), expected)


def test_top_k_keeps_ties_and_clamps_to_vocab():
  np.testing.assert_array_equal(_kept([[1.0, 3.0, 3.0, 2.0]], top_k=2), [[0, 1, 1, 0]])
  np.testing.assert_array_equal(_kept([[3.0, 1.0, 1.0, 0.0]], top_k=2), [[1, 1, 1, 0]])
  assert _kept([[3.0, 1.0, 1.0, 0.0]], top_k=10).all()
  np.testing.assert_array_equal(_kept([[0.5, 2.0, -1.0]], top_k=1), [[0, 1, 0]])


def test_categorical_draws_follow_softmax_and_never_filtered_tokens():
  n, v = 40000, 37
  logits = np.random.default_rng(1).normal(size=v).astype(np.float32) * 1.5
  logits[[0, 5, 36]] = -np.inf
  keys = jax.random.split(jax.random.key(3), n)
  toks = np.asarray(jax.jit(token_choice.categorical)(keys, jnp.broadcast_to(logits, (n, v))))
  freq = np.bincount(toks, minlength=v) / n
  probs = np.asarray(jax.nn.softmax(logits))
  assert freq[[0, 5, 36]].sum() == 0
  assert np.all(np.abs(freq - probs) <= 4.5 * np.sqrt(probs * (1 - probs) / n) + 1e-9)
  one = np.full((8, v), -np.inf, np.float32)
  one[np.arange(8), np.arange(8) * 4] = 0.0
  np.testing.assert_array_equal(token_choice.categorical(keys[:8], jnp.asarray(one)), np.arange(8) * 4)


def test_temperature():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(64, 30)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 64)
  greedy = sample.draw(logits, keys, sample.SamplingOptions(temperature=0.0))
  np.testing.assert_array_equal(greedy, np.asarray(logits).argmax(-1))
  hot = sample.draw(logits, keys, sample.SamplingOptions(temperature=2.5))
  np.testing.assert_array_equal(hot, token_choice.categorical(keys, logits / 2.5))
  assert (np.asarray(hot) != np.asarray(greedy)).any()


# ----------------------------------------------------------------------------- configs

def _smoke_config(**model):
  c = smoke.get_config()
  for k, v in model.items():
    c.model[k] = v
  return c


# ----------------------------------------------------------------------------- images and CLI

def test_class_grid_writes_labels():
  images = np.zeros((6, 16, 16, 3), np.uint8) + 128
  grid = sample.class_grid(images, [0, 1, 2, 3, 4, 5], ncols=3)
  assert grid.dtype == np.uint8 and grid.shape == (2 * (64 + 14 + 4) + 4, 3 * 68 + 4, 3)
  strip = grid[4:4 + 14, 4:4 + 64]  # the first tile's label strip: dark text on white
  assert strip.min() < 100 and strip.max() == 255
  with pytest.raises(ValueError, match="labels for"):
    sample.class_grid(images, [0], ncols=3)
  with pytest.raises(ValueError, match="uint8"):
    sample.class_grid(images.astype(np.float32), list(range(6)), ncols=3)


def test_decoder_choice(tiny):
  digits_cfg = dataclasses.replace(TINY, vocab_size=16, grid_size=16)
  dec = sample.make_decoder("auto", digits_cfg, builtin="digits")  # the data set's palette.
  assert dec.name == "builtin" and dec(np.full((2, 256), 15)).shape == (2, 16, 16, 3)
  with raises_naming(ValueError, "config.sample.vq_checkpoint"):
    sample.make_decoder("auto", digits_cfg)  # no built-in data set: a VQ, whatever the vocab.
  with pytest.raises(ValueError, match=r"config\.data\.builtin='model'"):
    sample.make_decoder("builtin", TINY, builtin="model")  # a module, but no data set.
  with raises_naming(FileNotFoundError, "/nonexistent/vq.npz"):
    sample.make_decoder("vq", TINY, vq_checkpoint="/nonexistent/vq.npz")
  tokens = sample.make_decoder("tokens", TINY)
  assert tokens(np.arange(128).reshape(2, 64) % 64).shape == (2, 8, 8, 3)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
  """A smoke-size params checkpoint (vocab 64, 8x8 tokens) and the small VQ fixture's weights."""
  root = tmp_path_factory.mktemp("cli")
  config = _smoke_config(grid_size=8)
  model = _randomised(config_lib.model_config(config, **sample.NO_DROPOUT))
  ckpt_lib.save_params(root / "ckpt", nnx.state(model), model_config=dataclasses.asdict(model.cfg))
  with np.load(FIXTURES / "llamagen_vq_small.npz") as z:
    np.savez(root / "vq.npz", **{k: z[k] for k in z.files if not k.startswith("io/")})
  config.sample.vq_checkpoint = str(root / "vq.npz")
  return config, str(root / "ckpt"), root


def test_cli_writes_adm_npz_resumes_and_writes_a_grid(cli_setup):
  config, ckpt, root = cli_setup
  kw = dict(num_samples=20, per_device_batch=1, seed=3)  # chunks of 8, 8 and 4 images
  full = sample_cli.run(config, ckpt, root / "full", grid=True, grid_per_class=2, **kw)
  assert full == dict(sampled=3, skipped=0, complete=True, out=str(root / "full"))
  with np.load(root / "full" / "samples.npz") as z:
    images, labels = z["arr_0"], z["labels"]
  assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 3)  # the small VQ: 2x upsampling
  assert np.bincount(labels, minlength=10).tolist() == [2] * 10
  assert len(np.unique(images.reshape(20, -1), axis=0)) == 20
  grid = np.asarray(Image.open(root / "full" / "grid.png"))
  assert grid.shape == (4 * (64 + 14 + 4) + 4, 2 * 68 + 4, 3)  # 4 grid classes x 2
  # Pre-empted after one chunk, then restarted: the finished chunk is kept, not redone.
  part = sample_cli.run(config, ckpt, root / "resumed", max_chunks=1, **kw)
  assert part["complete"] is False and not (root / "resumed" / "samples.npz").exists()
  first = root / "resumed" / "chunks" / "chunk_00000.npz"
  stamp = os.stat(first).st_mtime_ns
  rest = sample_cli.run(config, ckpt, root / "resumed", png=True, **kw)
  assert (rest["sampled"], rest["skipped"], rest["complete"]) == (2, 1, True)
  assert os.stat(first).st_mtime_ns == stamp
  with np.load(root / "resumed" / "samples.npz") as z:
    np.testing.assert_array_equal(z["arr_0"], images)
    np.testing.assert_array_equal(z["labels"], labels)
  png = np.asarray(Image.open(root / "resumed" / "png" / "000019.png"))
  np.testing.assert_array_equal(png, images[19])
  # Run again on the finished directory (e.g. to add a grid): nothing is sampled again and the
  # .npz is rewritten in place.
  again = sample_cli.run(config, ckpt, root / "resumed", grid=True, grid_per_class=1, **kw)
  assert (again["sampled"], again["skipped"], again["complete"]) == (0, 3, True)
  assert (root / "resumed" / "grid.png").exists()
  assert not list((root / "resumed").glob("*.tmp"))
  with np.load(root / "resumed" / "samples.npz") as z:
    np.testing.assert_array_equal(z["arr_0"], images)
  with raises_naming(ValueError, root / "resumed" / "run.json", "'seed'"):
    sample_cli.run(config, ckpt, root / "resumed", **dict(kw, seed=4))


def test_cli_labels_and_bad_input(cli_setup):
  assert np.bincount(sample_cli.make_labels(25, 10, 0, "balanced")).tolist() == [3] * 5 + [2] * 5
  uniform = sample_cli.make_labels(5000, 10, 0, "uniform")
  assert 400 < np.bincount(uniform).min() and np.bincount(uniform).max() < 600
  with pytest.raises(ValueError, match="num_samples=0"):
    sample_cli.make_labels(0, 10, 0, "balanced")
  config, ckpt, root = cli_setup
  with pytest.raises(ValueError, match="top_p=2.0"):
    sample_cli.run(config, ckpt, root / "bad", num_samples=4, top_p=2.0)
  with raises_naming(FileNotFoundError, root / "missing"):
    sample_cli.run(config, str(root / "missing"), root / "bad", num_samples=4)
  # The checkpoint's model_config.json (10 classes) decides the labels, not a config saying 4.
  fewer = config.copy_and_resolve_references()
  fewer.model.num_classes = 4
  sample_cli.run(fewer, ckpt, root / "classes", num_samples=20, per_device_batch=1)
  with np.load(root / "classes" / "samples.npz") as z:
    assert np.bincount(z["labels"], minlength=10).tolist() == [2] * 10


def test_cli_damaged_files_are_named(cli_setup):
  config, ckpt, root = cli_setup
  kw = dict(num_samples=8, per_device_batch=1, seed=5)  # one chunk of 8
  out = root / "damaged"
  sample_cli.run(config, ckpt, out, **kw)
  chunk = out / "chunks" / "chunk_00000.npz"
  chunk.write_bytes(chunk.read_bytes()[:100])  # truncated by a crash of the disk, say
  (out / "samples.npz").unlink()
  with raises_naming(ValueError, chunk, "delete"):
    sample_cli.run(config, ckpt, out, **kw)
  assert not list(out.glob("*.tmp"))  # the failed assembly left no temporary file
  (out / "run.json").write_text("{not json")
  with raises_naming(ValueError, out / "run.json", "JSON"):
    sample_cli.run(config, ckpt, out, **kw)
  with pytest.raises(ValueError, match="grid_per_class=0"):
    sample_cli.run(config, ckpt, root / "nogrid", grid=True, grid_per_class=0, **kw)


def test_vq_decoder_must_match_the_vocabulary(cli_setup):
  config, _, _ = cli_setup
  model_cfg = config_lib.model_config(config)
  other = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size + 1)
  with raises_naming(ValueError, config.sample.vq_checkpoint, model_cfg.vocab_size, "vocab_size",
                     other.vocab_size):
    sample.make_decoder("vq", other, vq_checkpoint=config.sample.vq_checkpoint)
