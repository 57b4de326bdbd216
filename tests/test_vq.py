"""Tests for npp_jax.vq: parity with the PyTorch reference fixture, shapes, loading, sharding."""
import pathlib

from flax import nnx
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import vq, vq_weights

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llamagen_vq_small.npz"
TAU = 1e-4  # Near-tie threshold for codes (fixture README section 2).


def _nhwc(x_BxCxHxW):
  return np.transpose(x_BxCxHxW, (0, 2, 3, 1))


# Shared jitted entry points, so tests reuse one compilation per input shape.
_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, c: m.decode_from_indices(c))


@pytest.fixture(scope="module")
def fx():
  with np.load(FIXTURE, allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  sd = {k: v for k, v in arrays.items() if not k.startswith("io/")}
  io = {k[3:]: v for k, v in arrays.items() if k.startswith("io/")}
  # Load through the wrapped, prefixed layout a DDP + torch.compile checkpoint could have.
  model = vq_weights.load_vq_state_dict({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}})
  out = _encode(model, _nhwc(io["image"]))
  dec = _decode(model, io["codes"].astype(np.int32))
  return dict(sd=sd, io=io, model=model, out=jax.device_get(out), dec=np.asarray(dec))


# ----------------------------------------------------------------------------- parity

def test_encoder_intermediates_match_reference(fx):
  io, out = fx["io"], fx["out"]
  np.testing.assert_allclose(out["enc_out"], _nhwc(io["enc_out"]), rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["h"], _nhwc(io["h"]), rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["z_l2"], io["z_l2"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(fx["model"].quantize.codebook(), io["codebook_l2"], rtol=0, atol=1e-6)


def test_codes_match_reference_with_near_tie_rule(fx):
  io, codes = fx["io"], fx["out"]["codes"]
  assert codes.dtype == np.int32 and codes.shape == (2, 256)
  sure = io["code_margin"] >= TAU
  assert (~sure).sum() == 1  # The README's one near-tie: image 1, position 196.
  np.testing.assert_array_equal(codes[sure], io["codes"][sure])
  ok_tie = (codes == io["codes"]) | (codes == io["code_second"])
  assert ok_tie[~sure].all()
  # The reference's flat encoder output is the same codes, row-major per image.
  np.testing.assert_array_equal(io["indices"], io["codes"].reshape(-1))


def test_quant_matches_reference_where_codes_agree(fx):
  io, out = fx["io"], fx["out"]
  same = out["codes"] == io["codes"]
  quant_ref = _nhwc(io["quant"]).reshape(2, 256, 8)
  np.testing.assert_allclose(out["quant"].reshape(2, 256, 8)[same], quant_ref[same],
                             rtol=0, atol=1e-6)


def test_decoder_from_stored_codes_matches_reference(fx):
  ref = _nhwc(fx["io"]["decoded"])
  assert fx["dec"].shape == ref.shape == (2, 32, 32, 3)
  assert np.abs(fx["dec"] - ref).max() / np.abs(ref).max() <= 1e-4


def test_round_trip_decode_of_encode(fx):
  model, io = fx["model"], fx["io"]
  img = _decode(model, _encode(model, _nhwc(io["image"]))["codes"])
  assert img.shape == (2, 32, 32, 3) and img.dtype == jnp.float32
  # Every code agrees with the reference here, so the round trip reproduces its decode.
  np.testing.assert_array_equal(fx["out"]["codes"], io["codes"])
  ref = _nhwc(io["decoded"])
  assert np.abs(np.asarray(img) - ref).max() / np.abs(ref).max() <= 1e-4


# ----------------------------------------------------------------------------- quantizer

_nearest = jax.jit(vq.nearest_codes)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 50.0]),
       n_distinct=st.integers(1, 32))
def test_argmin_distance_is_max_cosine(seed, scale, n_distinct):
  rng = np.random.default_rng(seed)
  # Rows of varying norm; repeated rows (n_distinct < 32) create exact ties.
  e_KxD = rng.normal(size=(n_distinct, 8)) * rng.uniform(0.1, 3.0, size=(n_distinct, 1))
  e_KxD = e_KxD[rng.integers(0, n_distinct, size=32)]
  z_BxNxD = rng.normal(size=(1, 24, 8)) * scale
  z_l2, codes = _nearest(jnp.asarray(z_BxNxD, jnp.float32), jnp.asarray(e_KxD, jnp.float32))
  codes = np.asarray(codes)[0]
  np.testing.assert_allclose(np.linalg.norm(z_l2, axis=-1), 1.0, atol=1e-6)
  cos_NxK = (z_BxNxD[0] / np.linalg.norm(z_BxNxD[0], axis=-1, keepdims=True)) @ (
      e_KxD / np.linalg.norm(e_KxD, axis=-1, keepdims=True)).T
  best = cos_NxK.max(-1)
  # The chosen row has the maximal cosine (up to fp32 error) ...
  np.testing.assert_allclose(cos_NxK[np.arange(24), codes], best, atol=1e-5)
  # ... and is the first such row wherever the float64 winner is clear of other values.
  winners = np.isclose(cos_NxK, best[:, None], rtol=0, atol=1e-12)
  others = np.where(winners, -np.inf, cos_NxK).max(-1)
  clear = best - others > 1e-5
  np.testing.assert_array_equal(codes[clear], winners.argmax(-1)[clear])


def test_exact_tie_takes_first_index_and_zero_vector_is_safe():
  e_KxD = jnp.array([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, -1.0]])
  z = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])  # Rows 1 and 2 tie exactly after normalisation.
  z_l2, codes = vq.nearest_codes(z, e_KxD)
  assert codes.tolist() == [[1, 0]]  # F.normalize maps 0 to 0: every distance ties, pick 0.
  np.testing.assert_array_equal(z_l2, z)


def test_codebook_rows_are_l2_normalised():
  cfg = vq.VQConfig(codebook_size=16)
  quantizer = vq.VectorQuantizer(cfg, vq.HIGHEST, nnx.Rngs(1))
  init = np.asarray(quantizer.embedding.embedding[...])
  np.testing.assert_allclose(np.linalg.norm(init, axis=-1), 1.0, atol=1e-6)  # As the reference.
  raw_KxD = np.random.default_rng(0).normal(size=(16, 8)) * 7
  quantizer.embedding.embedding[...] = jnp.asarray(raw_KxD, jnp.float32)
  np.testing.assert_allclose(np.linalg.norm(quantizer.codebook(), axis=-1), 1.0, atol=1e-6)
  codes = jnp.arange(16)[None]
  np.testing.assert_allclose(quantizer.lookup(codes)[0], quantizer.codebook(), atol=0)


# ----------------------------------------------------------------------------- uint8

def test_to_uint8_matches_reference_formula():
  x = np.array([-2.0, -1.0, -0.9961, 0.0, 0.5, 0.99, 1.0, 3.0], np.float32)
  assert vq.to_uint8(x).tolist() == [0, 0, 0, 128, 191, 254, 255, 255]
  y = np.random.default_rng(0).uniform(-1.2, 1.2, size=1000).astype(np.float32)
  want = np.floor(np.clip(np.float32(127.5) * y + np.float32(128.0), 0, 255)).astype(np.uint8)
  np.testing.assert_array_equal(vq.to_uint8(y), want)
  assert vq.to_uint8(y).dtype == jnp.uint8


# ----------------------------------------------------------------------------- VQ-16 shapes

def test_vq16_shapes_and_parameter_count():
  model = vq_weights.abstract_model(vq.VQ_16)
  n_params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n_params(model) == 71_883_403
  assert n_params(model.encoder) == 29_298_176
  assert n_params(model.decoder) == 42_449_795
  for size, grid in ((256, 16), (384, 24)):
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    codes = nnx.eval_shape(lambda m, x: m.encode_to_indices(x), model, images)
    assert codes.shape == (2, grid * grid) and codes.dtype == jnp.int32
    out = nnx.eval_shape(lambda m, c: m.decode_from_indices(c), model, codes)
    assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32


def test_vq16_state_dict_keys_match_reference_listing():
  shapes = vq_weights.expected_state_dict_shapes(vq.VQ_16)
  assert len(shapes) == 343  # 344 reference keys minus the dropped codebook_used buffer.
  assert sum(int(np.prod(s)) for s in shapes.values()) == 71_883_403
  for key, shape in {  # Spot checks from the facts' Appendix A.
      "encoder.conv_in.weight": (128, 3, 3, 3),
      "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
      "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
      "encoder.conv_blocks.4.attn.1.proj_out.bias": (512,),
      "encoder.mid.1.q.weight": (512, 512, 1, 1),
      "encoder.conv_out.weight": (256, 512, 3, 3),
      "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
      "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
      "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
      "decoder.conv_blocks.4.res.2.norm2.weight": (128,),
      "decoder.conv_out.weight": (3, 128, 3, 3),
      "quantize.embedding.weight": (16384, 8),
      "quant_conv.weight": (8, 256, 1, 1),
      "post_quant_conv.weight": (256, 8, 1, 1)}.items():
    assert shapes[key] == shape, key
  assert "decoder.conv_blocks.4.upsample.conv.weight" not in shapes
  assert "encoder.conv_blocks.3.attn.0.q.weight" not in shapes


# ----------------------------------------------------------------------------- loading

def _fake_sd(config):
  # Zero-stride arrays: full reference shapes without allocating 72M floats.
  shapes = vq_weights.expected_state_dict_shapes(config)
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  sd["quantize.codebook_used"] = np.zeros(65536, np.float32)
  return sd


def test_config_inferred_from_vq16_shapes():
  assert vq_weights.vq_config_from_state_dict(_fake_sd(vq.VQ_16)) == vq.VQ_16
  wrapped = {"model": {f"_orig_mod.{k}": v for k, v in _fake_sd(vq.VQ_16).items()}}
  assert vq_weights.vq_config_from_state_dict(wrapped) == vq.VQ_16


def test_config_inferred_from_vq8_shapes():
  # Only the shapes the inference reads; building the full VQ-8 table costs seconds.
  sd = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (256, 512, 3, 3),
        "quantize.embedding.weight": (16384, 8)}
  cin = 128
  for i, m in enumerate((1, 2, 2, 4)):
    for j in range(2):
      sd[f"encoder.conv_blocks.{i}.res.{j}.conv1.weight"] = (128 * m, cin, 3, 3)
      cin = 128 * m
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in sd.items()}
  assert vq_weights.vq_config_from_state_dict(sd) == vq.VQ_8


def test_config_inferred_from_fixture(fx):
  assert vq_weights.vq_config_from_state_dict(fx["sd"]) == vq.VQConfig(
      ch=64, ch_mult=(1, 2), num_res_blocks=2, z_channels=64, codebook_size=64,
      codebook_embed_dim=8)
  assert fx["model"].config == vq_weights.vq_config_from_state_dict(fx["sd"])


def test_loaded_weights_are_transposed_reference_weights(fx):
  sd, model = fx["sd"], fx["model"]
  np.testing.assert_array_equal(model.encoder.conv_blocks[1].res[0].nin_shortcut.kernel[...],
                                sd["encoder.conv_blocks.1.res.0.nin_shortcut.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(model.decoder.conv_blocks[0].attn[2].norm.scale[...],
                                sd["decoder.conv_blocks.0.attn.2.norm.weight"])
  np.testing.assert_array_equal(model.quantize.embedding.embedding[...],
                                sd["quantize.embedding.weight"])


def test_strict_loading_reports_every_problem_at_once(fx):
  sd = dict(fx["sd"])
  del sd["decoder.conv_out.bias"]
  del sd["encoder.mid.1.q.weight"]
  sd["encoder.extra.weight"] = np.zeros(3, np.float32)
  sd["decoder.conv_blocks.0.upsample.conv.weight"] = np.zeros((128, 128, 1, 1), np.float32)
  with raises_naming(ValueError, "decoder.conv_out.bias", "encoder.mid.1.q.weight",
                     "encoder.extra.weight", "decoder.conv_blocks.0.upsample.conv.weight",
                     (128, 128, 1, 1), (128, 128, 3, 3)):
    vq_weights.load_vq_state_dict(sd)


def test_bad_inputs_raise_clear_errors(fx):
  with pytest.raises(ValueError, match="encoder.conv_in.weight"):
    vq_weights.vq_config_from_state_dict({"quantize.embedding.weight": np.zeros((4, 8))})
  with pytest.raises(ValueError, match="ch_mult"):
    vq.VQConfig(ch=48)
  model = fx["model"]
  with raises_naming(ValueError, "BxHxWx3", (2, 3, 32, 32)):
    model.encode_to_indices(jnp.zeros((2, 3, 32, 32)))
  with raises_naming(ValueError, 10, (3, 3)):  # 10 codes do not fill a 3 x 3 grid
    model.decode_from_indices(jnp.zeros((1, 10), jnp.int32))


# ----------------------------------------------------------------------------- sharding

def test_sharded_encode_and_decode_equal_unsharded(fx):
  model, io = fx["model"], fx["io"]
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  images = np.concatenate([_nhwc(io["image"]), -_nhwc(io["image"])])  # B = 4 = data * fsdp.
  codes = vq.make_encode_fn(model, mesh)(images)
  assert codes.sharding.spec == P(("data", "fsdp"))
  want = np.concatenate([_encode(model, images[:2])["codes"], _encode(model, images[2:])["codes"]])
  np.testing.assert_array_equal(codes, want)
  decoded = vq.make_decode_fn(model, mesh)(codes)
  assert decoded.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_allclose(decoded[:2], fx["dec"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(decoded[2:], _decode(model, codes[2:]), rtol=0, atol=1e-5)
  with raises_naming(ValueError, "batch size", 3, 4, "'fsdp'"):
    vq.make_encode_fn(model, mesh)(images[:3])
