"""Tests for npp_jax.convert: strict key coverage, checkpoint layouts, variant inference, GQA.

Numerical parity of the converted fixture model with the PyTorch reference is in test_model.py.
"""
import functools
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import convert
from npp_jax import model as model_lib

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llamagen_gpt_tiny.npz"
NO_DROPOUT = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
# Compile time dominates these CPU tests: skip LLVM's optimisation passes (halves it; the HLO and
# so the math are unchanged).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def sd():
  with np.load(FIXTURE, allow_pickle=False) as z:
    return {k: z[k] for k in z.files if not k.startswith("io/")}


@pytest.fixture(scope="module")
def params(sd):
  return _pure(convert.load_gpt(sd, n_head=4))


def _pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_same_params(model, want):
  jax.tree.map(np.testing.assert_array_equal, _pure(model), want)


def export_gpt(model):
  """Our parameters back in the reference's state-dict layout (the converter's inverse)."""
  cfg, p = model.cfg, _pure(model)
  d, h, j, e = cfg.dim, cfg.n_head, cfg.kv_heads, cfg.head_dim
  att, ffn = p["layers"]["attention"], p["layers"]["feed_forward"]
  out = {"tok_embeddings.weight": p["tok_embeddings"]["embedding"],
         "cls_embedding.embedding_table.weight": p["cls_embedding"]["embedding"],
         "norm.weight": p["norm"]["scale"], "output.weight": p["output"].T}
  for i in range(cfg.n_layer):
    out[f"layers.{i}.attention.wqkv.weight"] = np.concatenate(
        [att["wq"][i].reshape(d, h * e).T, att["wk"][i].reshape(d, j * e).T,
         att["wv"][i].reshape(d, j * e).T])
    out[f"layers.{i}.attention.wo.weight"] = att["wo"][i].reshape(h * e, d).T
    for w in ("w1", "w2", "w3"):
      out[f"layers.{i}.feed_forward.{w}.weight"] = ffn[w][i].T
    out[f"layers.{i}.attention_norm.weight"] = p["layers"]["attention_norm"]["scale"][i]
    out[f"layers.{i}.ffn_norm.weight"] = p["layers"]["ffn_norm"]["scale"][i]
  return out


def _zero_views(shapes):
  """A state dict of the right shapes that allocates nothing (broadcast views of one zero)."""
  return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- strictness

def test_all_problems_are_listed_in_one_error(sd):
  bad = dict(sd)
  del bad["layers.0.ffn_norm.weight"]
  bad["layers.0.attention.bias"] = np.zeros(192, np.float32)
  bad["layers.1.feed_forward.w2.weight"] = np.zeros((256, 64), np.float32)
  with raises_naming(convert.ConversionError, "layers.0.ffn_norm.weight",
                     "layers.0.attention.bias", "layers.1.feed_forward.w2.weight", (256, 64),
                     (64, 256)) as err:
    convert.load_gpt(bad, n_head=4)
  assert isinstance(err.value, ValueError)


def test_missing_layer_and_extra_layer_are_reported(sd):
  extra = dict(sd)
  extra["layers.2.attention_norm.weight"] = np.ones(64, np.float32)  # a stray third layer
  with raises_naming(convert.ConversionError, "layers.2.attention.wqkv.weight"):
    convert.load_gpt(extra, n_head=4)


def test_reference_buffers_and_wrapper_prefixes_are_accepted(sd, params):
  ckpt = {f"module._orig_mod.{k}" if i % 2 else f"_orig_mod.{k}": v
          for i, (k, v) in enumerate(sd.items())}
  ckpt["freqs_cis"] = np.zeros((257, 8, 2), np.float32)
  ckpt["module.layers.0.attention.kv_cache.k_cache"] = np.zeros((2, 4, 264, 16), np.float32)
  ckpt["layers.1.attention.kv_cache.v_cache"] = np.zeros((2, 4, 264, 16), np.float32)
  _assert_same_params(convert.load_gpt(ckpt, n_head=4), params)


@pytest.mark.parametrize("layout", ["raw", "model", "module", "state_dict", "ema"])
def test_checkpoint_layouts_load(sd, params, layout):
  ckpt = sd if layout == "raw" else {layout: sd, "steps": 7}
  _assert_same_params(convert.load_gpt(ckpt, n_head=4, use_ema=layout == "ema"), params)


def test_use_ema_picks_the_ema_weights(sd, params):
  other = {k: v + 1.0 for k, v in sd.items()}
  model = convert.load_gpt({"model": sd, "ema": other}, n_head=4, use_ema=True)
  np.testing.assert_array_equal(model.norm.scale[...], params["norm"]["scale"] + 1.0)
  _assert_same_params(convert.load_gpt({"model": sd, "ema": other}, n_head=4), params)
  with pytest.raises(convert.ConversionError, match="'ema'"):
    convert.load_gpt({"model": sd}, n_head=4, use_ema=True)


def test_not_a_gpt_state_dict(sd):
  with pytest.raises(convert.ConversionError, match="tok_embeddings.weight"):
    convert.load_gpt({k: v for k, v in sd.items() if k != "tok_embeddings.weight"}, n_head=4)


# ----------------------------------------------------------------------------- config inference

def test_loaded_config_comes_from_the_shapes(sd):
  cfg = convert.gpt_config_from_state_dict(sd, n_head=4)
  assert (cfg.dim, cfg.n_layer, cfg.n_head, cfg.kv_heads) == (64, 2, 4, 4)
  assert (cfg.vocab_size, cfg.num_classes, cfg.ffn_dim) == (512, 1000, 256)
  with pytest.raises(convert.ConversionError, match="n_head"):
    convert.gpt_config_from_state_dict(sd)  # no named size has 2 layers of width 64


@pytest.mark.parametrize("variant", list(model_lib.VARIANTS))
def test_variant_inferred_from_shapes_without_allocating(variant):
  cfg = model_lib.config_for(variant)
  views = _zero_views(convert.gpt_expected_shapes(cfg))
  assert convert.gpt_config_from_state_dict(views) == cfg
  assert convert.gpt_config_from_state_dict(views, variant=variant) == cfg
  convert.check_coverage(views, convert.gpt_expected_shapes(cfg))  # strict coverage holds


@pytest.mark.parametrize("n_head", [0, -4, 3, 128])
def test_head_count_must_divide_the_width(sd, n_head):
  with raises_naming(convert.ConversionError, f"n_head={n_head}", "--n_head", 64):
    convert.gpt_config_from_state_dict(sd, n_head=n_head)


def test_gpt_b_reference_shapes():
  shapes = convert.gpt_expected_shapes(model_lib.config_for("B"))
  assert len(shapes) == 88
  assert shapes["layers.11.attention.wqkv.weight"] == (2304, 768)
  assert shapes["layers.0.feed_forward.w2.weight"] == (768, 2048)
  assert shapes["cls_embedding.embedding_table.weight"] == (1001, 768)
  assert sum(int(np.prod(s)) for s in shapes.values()) == model_lib.num_params("B")


def test_variant_mismatch_and_unknown_variant_raise():
  views = _zero_views(convert.gpt_expected_shapes(model_lib.config_for("B")))
  with pytest.raises(convert.ConversionError, match="variant=L"):
    convert.gpt_config_from_state_dict(views, variant="L")
  with pytest.raises(convert.ConversionError, match="'2B'"):
    convert.gpt_config_from_state_dict(views, variant="2B")
  odd = dict(views)
  odd["layers.0.feed_forward.w1.weight"] = np.broadcast_to(np.float32(0), (2000, 768))
  with raises_naming(convert.ConversionError, "FFN", 2000, 768):
    convert.gpt_config_from_state_dict(odd)


# ----------------------------------------------------------------------------- round trips

def test_export_is_the_inverse_of_load_on_the_reference(sd):
  exported = export_gpt(convert.load_gpt(sd, n_head=4))
  assert sorted(exported) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)


@functools.partial(_jit, static_argnums=0)
def _logits(graphdef, state, codes, labels):
  return nnx.merge(graphdef, state)(codes, labels, patch_size=2)


def test_grouped_query_attention_round_trips():
  cfg = model_lib.ModelConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, vocab_size=512,
                              num_classes=10, **NO_DROPOUT)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(3))
  model.output[...] = 0.3 * jax.random.normal(jax.random.key(4), model.output[...].shape)
  exported = export_gpt(model)
  assert exported["layers.0.attention.wqkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
  loaded = convert.load_gpt({"model": exported}, n_head=4, **NO_DROPOUT)
  assert loaded.cfg == cfg and loaded.cfg.kv_heads == 2
  _assert_same_params(loaded, _pure(model))
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 256)), jnp.int32)
  labels = jnp.array([1, 10], jnp.int32)
  want = _logits(*nnx.split(model), codes, labels)
  got = _logits(*nnx.split(loaded), codes, labels)
  assert np.abs(want).max() > 0.1
  np.testing.assert_array_equal(got, want)
