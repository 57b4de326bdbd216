"""Tests for npp_jax.model: sizes, config validation, causality, NTP equivalence, reference parity.

Parity uses the PyTorch fixture `tests/fixtures/llamagen_gpt_tiny.npz` (see
tests/fixtures/README.md, section 1): logits, losses, patch means and greedy CFG generation.
"""
import dataclasses
import functools
import pathlib

from flax import nnx
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from npp_jax import convert, kernels
from npp_jax import model as model_lib
from npp_jax import patching

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llamagen_gpt_tiny.npz"
TAU = 1e-4  # near-tie threshold for greedy tokens (fixture README)
NO_DROPOUT = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
TINY = model_lib.ModelConfig(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10,
                             **NO_DROPOUT)
# Compile time dominates these CPU tests: skip LLVM's optimisation passes (halves it; the HLO and
# so the math are unchanged).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(_jit, static_argnums=(0, 4))
def _logits(graphdef, state, codes_BxN, labels_B, p):
  return nnx.merge(graphdef, state)(codes_BxN, labels_B, patch_size=p)


def _abstract(cfg):
  return nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))


def _random_params(cfg, seed=0):
  """graphdef and random params (non-zero output, norms near 1), drawn in numpy: no compiles."""
  graphdef, state = _abstract(cfg)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = "/".join(str(k.key) for k in path)
    if name.endswith("scale"):
      return 1.0 + 0.1 * rng.standard_normal(x.shape, np.float32)
    return (0.25 if name == "output" else 0.02) * rng.standard_normal(x.shape, np.float32)

  values = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, values))
  return graphdef, state


@pytest.fixture(scope="module")
def tiny():
  graphdef, state = _random_params(TINY)
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 256)), jnp.int32)
  labels = jnp.array([3, 10], jnp.int32)  # 10 = the null class
  base = {p: np.asarray(_logits(graphdef, state, codes, labels, p)) for p in (1, 2, 4)}
  return dict(graphdef=graphdef, state=state, codes=codes, labels=labels, base=base)


# ----------------------------------------------------------------------------- sizes and config

PARAMS = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672,
          "XXXL": 3_893_027_840, "1B": 1_199_616_000, "3B": 3_096_659_200, "7B": 6_614_589_440}
FFN = {"B": 2048, "L": 2816, "XL": 3584, "XXL": 4096, "XXXL": 6912, "1B": 5632, "3B": 8704,
       "7B": 11008}


@pytest.mark.parametrize("variant", list(PARAMS))
def test_param_counts_and_ffn_sizes_match_llamagen(variant):
  assert model_lib.num_params(variant) == PARAMS[variant]
  assert model_lib.config_for(variant).ffn_dim == FFN[variant]


def test_tiny_shapes_and_zero_initialised_output():
  model = model_lib.Transformer(TINY, rngs=nnx.Rngs(0))
  assert model_lib.num_params(TINY) == sum(
      x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  np.testing.assert_array_equal(model.output[...], 0.0)
  np.testing.assert_array_equal(model.norm.scale[...], 1.0)
  assert model.cls_embedding.embedding[...].shape == (11, 64)  # + the null class
  assert model.layers.attention.wq[...].shape == (2, 64, 4, 16)
  assert model.layers.feed_forward.w1[...].shape == (2, 64, 256)


@pytest.mark.parametrize("fields, key", [
    (dict(dim=60, n_head=8), "model.dim"),
    (dict(dim=12, n_head=4), "head_dim"),  # head_dim 3 is odd: no RoPE pairs
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(token_dropout=1.0), "model.token_dropout"),
    (dict(resid_dropout=-0.1), "model.resid_dropout"),
    (dict(ffn_dropout=1.5), "model.ffn_dropout"),
    (dict(class_dropout=1.0), "model.class_dropout"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(remat="everything"), "model.remat"),
    (dict(rope_placement="middle"), "model.rope_placement"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(n_layer=0), "model.n_layer"),
])
def test_bad_model_config_raises_naming_the_field(fields, key):
  args = dict(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10)
  args.update(fields)
  with pytest.raises(ValueError, match=key):
    model_lib.Transformer(model_lib.ModelConfig(**args), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fields, key", [
    (dict(n_kv_head=0), "model.n_kv_head"),  # today: accepted, silently multi-head attention
    (dict(n_kv_head=-1), "model.n_kv_head"),  # today: accepted, negative parameter shapes
    (dict(n_head=0), "model.n_head"),  # today: ZeroDivisionError in validate
    (dict(multiple_of=0), "model.multiple_of"),  # today: accepted, ZeroDivisionError in ffn_dim
    (dict(dim=0), "model.dim"),  # today: accepted, a zero-width model
])
def test_bad_sizes_raise_naming_the_field(fields, key):
  """Fails until ModelConfig.validate checks sizes (reported to the lead)."""
  args = dict(dim=64, n_layer=2, n_head=4, vocab_size=512, num_classes=10)
  args.update(fields)
  with pytest.raises(ValueError, match=key):
    model_lib.ModelConfig(**args).validate()


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="model.variant"):
    model_lib.config_for("2B")
  with pytest.raises(ValueError, match="model.variant"):
    model_lib.num_params("GPT-B")


# ----------------------------------------------------------------------------- causality

def _changed_token(codes, p, j, k, new):
  """codes with in-patch element k of patch j set to `new` (shifted if equal to the old value)."""
  g = 16
  pr, pc = divmod(j, g // p)
  n = g * (p * pr + k // p) + p * pc + k % p
  codes = np.array(codes)
  codes[:, n] = new if new != codes[0, n] else (new + 1) % 512
  return jnp.asarray(codes)


@settings(max_examples=15, deadline=None)
@given(p=st.sampled_from([1, 2, 4]), data=st.data())
def test_causal_at_token_and_patch_level(tiny, p, data):
  k_per_patch, n_patch = p * p, 256 // (p * p)
  j = data.draw(st.one_of(st.just(n_patch - 1), st.integers(0, n_patch - 1)), label="patch")
  k = data.draw(st.integers(0, k_per_patch - 1), label="token in patch")
  new = data.draw(st.integers(0, 511), label="new token")
  codes = _changed_token(tiny["codes"], p, j, k, new)
  got = np.asarray(_logits(tiny["graphdef"], tiny["state"], codes, tiny["labels"], p))
  base = tiny["base"][p]
  # Position i predicts patch i from patches < i: nothing at positions <= j may change ...
  np.testing.assert_allclose(got[:, : j + 1], base[:, : j + 1], rtol=0, atol=1e-6)
  # ... while the next position sees the changed patch (the last patch is never an input).
  if j + 1 < n_patch:
    assert np.abs(got[:, j + 1] - base[:, j + 1]).max() > 1e-4


def test_class_label_conditions_every_position(tiny):
  labels = jnp.array([7, 10], jnp.int32)  # row 0 changes, row 1 (null class) does not
  for p in (1, 2, 4):
    got = np.asarray(_logits(tiny["graphdef"], tiny["state"], tiny["codes"], labels, p))
    base = tiny["base"][p]
    assert np.abs(got[0, 0] - base[0, 0]).max() > 1e-3  # the class position's own prediction
    assert np.abs(got[0, -1] - base[0, -1]).max() > 1e-4
    np.testing.assert_array_equal(got[1], base[1])  # rows are independent


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_patch_size_1_is_next_token_prediction(tiny, seed):
  codes = jnp.asarray(np.random.default_rng(seed).integers(0, 512, (2, 256)), jnp.int32)
  logits = _logits(tiny["graphdef"], tiny["state"], codes, tiny["labels"], 1)
  assert logits.shape == (2, 256, 512) and logits.dtype == jnp.float32
  ntp = optax.softmax_cross_entropy_with_integer_labels(logits, codes).mean()
  npp = patching.patch_loss(logits, patching.group_targets(codes, 1))
  np.testing.assert_allclose(npp, ntp, rtol=1e-6, atol=1e-6)
  assert float(ntp) > 0


def test_output_shapes_per_patch_size(tiny):
  for p, n in ((1, 256), (2, 64), (4, 16)):
    assert tiny["base"][p].shape == (2, n, 512)
    assert np.isfinite(tiny["base"][p]).all()


def test_dropout_needs_an_rng_and_is_reproducible():
  cfg = dataclasses.replace(TINY, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1,
                            class_dropout=0.5)
  graphdef, state = _random_params(cfg)
  codes = jnp.zeros((2, 256), jnp.int32)
  labels = jnp.array([1, 2], jnp.int32)
  with pytest.raises(ValueError, match="rng"):
    nnx.merge(graphdef, state)(codes, labels, patch_size=4, deterministic=False)

  @_jit
  def train_and_eval_logits(state, key):
    model = nnx.merge(graphdef, state)
    return (model(codes, labels, patch_size=4, deterministic=False, rng=key),
            model(codes, labels, patch_size=4))

  a, eval_ = train_and_eval_logits(state, jax.random.key(0))
  b, _ = train_and_eval_logits(state, jax.random.key(0))
  c, _ = train_and_eval_logits(state, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-4
  assert np.abs(a - eval_).max() > 1e-4


def test_grouped_query_attention_shares_kv_heads_like_repeat_interleave():
  graphdef, state = _random_params(dataclasses.replace(TINY, n_kv_head=2))
  values = nnx.to_pure_dict(state)
  att = values["layers"]["attention"]
  assert att["wk"].shape == (2, 64, 2, 16)
  # LlamaGen repeats each kv head n_head / n_kv_head times consecutively (repeat_interleave).
  att["wk"], att["wv"] = jnp.repeat(att["wk"], 2, axis=2), jnp.repeat(att["wv"], 2, axis=2)
  mha_graphdef, full = _abstract(TINY)
  nnx.replace_by_pure_dict(full, values)
  codes = jnp.asarray(np.random.default_rng(1).integers(0, 512, (2, 256)), jnp.int32)
  labels = jnp.array([0, 4], jnp.int32)
  got = _logits(graphdef, state, codes, labels, 4)
  want = _logits(mha_graphdef, full, codes, labels, 4)  # plain multi-head attention
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p,chunks", [(1, 1), (1, 4), (2, 2)])
def test_train_loss_and_gradients_equal_the_straightforward_formulation(tiny, p, chunks,
                                                                         monkeypatch):
  """train.loss_fn (fused, optionally chunked output loss; CPU attention and matmuls) against
  patch_loss(model logits): same loss, same gradients for every parameter."""
  from npp_jax import train
  monkeypatch.setattr(kernels, "auto_loss_chunks", lambda *_: chunks)
  graphdef, state = tiny["graphdef"], tiny["state"]
  batch = {"codes": tiny["codes"], "labels": tiny["labels"]}

  def plain(s):
    logits = nnx.merge(graphdef, s)(batch["codes"], batch["labels"], patch_size=p)
    return patching.patch_loss(logits, patching.group_targets(batch["codes"], p))

  ours, want = _jit(lambda s: [
      jax.value_and_grad(lambda s: train.loss_fn(graphdef, s, batch, p, None))(s),
      jax.value_and_grad(plain)(s)])(state)
  np.testing.assert_allclose(ours[0], want[0], rtol=1e-6)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(ours[1]), jax.tree.leaves(want[1])):
    assert np.abs(r).max() > 0, path
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * np.abs(r).max(), err_msg=str(path))


# ----------------------------------------------------------------------------- reference parity

@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURE, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  sd = {k: v for k, v in arrays.items() if not k.startswith("io/")}
  io = {k[3:]: v for k, v in arrays.items() if k.startswith("io/")}
  model = convert.load_gpt(sd, n_head=4, **NO_DROPOUT)
  graphdef, state = nnx.split(model)
  idx, gen = io["idx"].astype(np.int32), io["gen/tokens"].astype(np.int32)
  null = np.full((2,), 1000, np.int32)
  # One p = 1 batch: the training forward, then the conditional and unconditional CFG rows.
  codes = np.concatenate([idx, gen, gen])
  labels = np.concatenate([io["labels"], io["gen/labels"], null]).astype(np.int32)
  p1 = np.asarray(_logits(graphdef, state, jnp.asarray(codes), jnp.asarray(labels), 1))
  p2 = np.asarray(_logits(graphdef, state, jnp.asarray(idx), jnp.asarray(io["labels"]), 2))
  return dict(model=model, io=io, idx=idx, p1=p1[:2], cond=p1[2:4], uncond=p1[4:], p2=p2)


def test_reference_training_logits_and_losses(ref):
  io, idx = ref["io"], ref["idx"]
  np.testing.assert_allclose(ref["p1"], io["p1_train/logits"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(ref["p1"], io["p1_eval/logits"][:, :256], rtol=0, atol=1e-4)
  np.testing.assert_allclose(ref["p2"], io["p2_train/logits"], rtol=0, atol=1e-4)
  loss1 = patching.patch_loss(ref["p1"], patching.group_targets(idx, 1))
  loss2 = patching.patch_loss(ref["p2"], patching.group_targets(idx, 2))
  np.testing.assert_allclose(loss1, io["p1_train/loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss2, io["p2_train/loss"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(loss2, io["p2_train/loss_manual"], rtol=0, atol=1e-5)


def test_reference_patch_targets_and_patch_means(ref):
  io, idx, model = ref["io"], ref["idx"], ref["model"]
  np.testing.assert_array_equal(patching.group_targets(idx, 2), io["p2_train/patch_targets"])
  means = patching.average_patches(model.tok_embeddings(jnp.asarray(idx)), 2)
  np.testing.assert_allclose(means, io["p2_train/patch_mean_emb"], rtol=0, atol=1e-6)


def test_reference_greedy_cfg_generation_teacher_forced(ref):
  io = ref["io"]
  cfg_logits = ref["uncond"] + 2.0 * (ref["cond"] - ref["uncond"])  # position i predicts token i
  np.testing.assert_allclose(cfg_logits[:, io["gen/logit_steps"]], io["gen/logits"],
                             rtol=0, atol=1e-4)
  top2 = np.sort(cfg_logits, axis=-1)[..., -2:]
  np.testing.assert_allclose(top2[..., 1] - top2[..., 0], io["gen/margin"], rtol=0, atol=2e-4)
  sure = io["gen/margin"] >= TAU
  assert sure.all()  # the README: with tau = 1e-4 all 2 x 256 tokens must match
  np.testing.assert_array_equal(cfg_logits.argmax(-1)[sure], io["gen/tokens"][sure])
