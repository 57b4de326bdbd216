"""Tests for npp_jax.patching: patch averaging, target grouping, the patch loss, RoPE, schedule.

Every function is checked against an independent reference (explicit loops, the reference's K-fold
copy of the logits, complex rotations, the PyTorch fixture's RoPE tables, the paper's cost figures).
"""
import functools
import math
import pathlib

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from naming import raises_naming
from npp_jax import model as model_lib
from npp_jax import patching

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "llamagen_gpt_tiny.npz"
FAST = settings(max_examples=12, deadline=None)
G = 16  # token grid side used throughout
# Compile time dominates these CPU tests: skip LLVM's optimisation passes (halves it; the HLO and
# so the math are unchanged).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def rope_io():
  with np.load(FIXTURE, allow_pickle=False) as z:
    return {"p1": z["io/freqs_cis_p1"], "p2": z["io/freqs_cis_p2"]}


def _patch_index(j, k, g, p):
  """Raster token index of in-patch element k of patch j (the fixture README's formula)."""
  pr, pc = divmod(j, g // p)
  return g * (p * pr + k // p) + p * pc + k % p


# ----------------------------------------------------------------------------- averaging, grouping

def _average_patches_loops(x_BxNxD, p):
  b, n, d = x_BxNxD.shape
  g = math.isqrt(n)
  gp = g // p
  out = np.zeros((b, gp * gp, d), np.float64)
  for pr in range(gp):
    for pc in range(gp):
      block = [x_BxNxD[:, (pr * p + r) * g + pc * p + c] for r in range(p) for c in range(p)]
      out[:, pr * gp + pc] = np.mean(np.stack(block, 0), axis=0)
  return out


@FAST
@given(p=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_average_patches_matches_block_loops(p, seed):
  x = np.random.default_rng(seed).normal(size=(2, G * G, 3)).astype(np.float32)
  got = np.asarray(patching.average_patches(jnp.asarray(x), p))
  assert got.shape == (2, G * G // (p * p), 3)
  want = _average_patches_loops(x.astype(np.float64), p)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  if p == 1:
    np.testing.assert_array_equal(got, x)


def test_group_targets_and_average_on_the_4x4_example():
  codes = jnp.arange(16)[None]
  np.testing.assert_array_equal(patching.group_targets(codes, 2)[0],
                                [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
  means = patching.average_patches(codes[..., None].astype(jnp.float32), 2)
  np.testing.assert_array_equal(means[0, :, 0], [2.5, 4.5, 10.5, 12.5])
  np.testing.assert_array_equal(patching.group_targets(codes, 1)[0], np.arange(16)[:, None])
  np.testing.assert_array_equal(patching.group_targets(codes, 4)[0], np.arange(16)[None])


@_jit
def _groups_and_means_every_level(codes_BxN, table_VxD):
  """group_targets and average_patches of the embedded codes, for p = 1, 2, 4, 8 in one compile."""
  emb = table_VxD[codes_BxN]
  return [(patching.group_targets(codes_BxN, p), patching.average_patches(emb, p))
          for p in (1, 2, 4, 8)]


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_group_targets_is_a_permutation_consistent_with_average_patches(seed):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(G * G, 4)).astype(np.float32)
  codes = rng.integers(0, 50, (2, G * G)).astype(np.int32)  # row 0 repeats codes
  codes[1] = rng.permutation(G * G)  # distinct values: the grouping must be a permutation
  out = _groups_and_means_every_level(jnp.asarray(codes), jnp.asarray(table))
  for p, (groups, averaged) in zip((1, 2, 4, 8), out):
    groups, k = np.asarray(groups), p * p
    assert groups.shape == (2, G * G // k, k)
    np.testing.assert_array_equal(np.sort(groups[1].ravel()), np.arange(G * G))
    # The README's raster-within-raster order, at a random patch and in-patch position.
    j, kk = rng.integers(0, G * G // k), rng.integers(0, k)
    assert groups[0, j, kk] == codes[0, _patch_index(j, kk, G, p)]
    # The mean of each group's token embeddings is the averaged patch embedding.
    np.testing.assert_allclose(table[groups].mean(axis=2), averaged, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid, p", [(16, 3), (16, 32), (16, 0), (8, 16), (16, 2.0)])
def test_check_patch_size_rejects_bad_sizes_by_name(grid, p):
  with pytest.raises(ValueError, match="my_patch"):
    patching.check_patch_size(grid, p, name="my_patch")


def test_non_square_and_indivisible_inputs_raise():
  with raises_naming(ValueError, 250):  # 250 tokens are no square grid
    patching.average_patches(jnp.zeros((1, 250, 2)), 1)
  with pytest.raises(ValueError, match="patch_size"):
    patching.group_targets(jnp.zeros((1, 256), jnp.int32), 3)


# ----------------------------------------------------------------------------- patch loss

def _k_fold_copy_loss_and_grad(logits_BxPxV, targets_BxPxK):
  """The PyTorch reference in float64 numpy: each position's logits copied K times, CE per copy,
  mean over B*P*K; and its gradient w.r.t. the (un-copied) logits, summed over the K copies."""
  b, n, k = targets_BxPxK.shape
  copies = np.repeat(logits_BxPxV.astype(np.float64)[:, :, None, :], k, axis=2)
  shifted = copies - copies.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -np.take_along_axis(log_probs, targets_BxPxK[..., None], -1).mean()
  onehot = np.zeros_like(copies)
  np.put_along_axis(onehot, targets_BxPxK[..., None], 1.0, -1)
  grad = (np.exp(log_probs) - onehot).sum(axis=2) / (b * n * k)
  return loss, grad


@_jit
def _patch_loss_every_level(logits_by_p, targets_by_p):
  return [jax.value_and_grad(patching.patch_loss)(l, t) for l, t in zip(logits_by_p, targets_by_p)]


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_patch_loss_equals_k_fold_copy_loss(seed):
  rng = np.random.default_rng(seed)
  v, sizes = 37, (1, 2, 4, 8)
  logits = [rng.normal(scale=3.0, size=(2, G * G // (p * p), v)).astype(np.float32) for p in sizes]
  targets = [rng.integers(0, v, (2, G * G // (p * p), p * p)) for p in sizes]
  ours = _patch_loss_every_level(logits, [t.astype(np.int32) for t in targets])
  for p, (loss, grad), l, t in zip(sizes, ours, logits, targets):
    ref_loss, ref_grad = _k_fold_copy_loss_and_grad(l, t)
    # float32 log-sum-exp against float64: a few ulps of a loss near 7 (seen: 9.4e-6).
    np.testing.assert_allclose(loss, ref_loss, rtol=5e-6, atol=1e-6, err_msg=f"p={p}")
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-7, err_msg=f"p={p}")


def test_patch_loss_is_float32_for_bfloat16_logits():
  logits = jnp.zeros((1, 4, 8), jnp.bfloat16)
  loss = patching.patch_loss(logits, jnp.zeros((1, 4, 2), jnp.int32))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, np.log(8), rtol=1e-6)


# ----------------------------------------------------------------------------- RoPE

def test_rope_tables_match_the_reference_fixture(rope_io):
  for p, name in ((1, "p1"), (2, "p2")):
    table = patching.rope_table(16, G, patch_size=p)
    assert table.shape == rope_io[name].shape and table.dtype == np.float32
    np.testing.assert_allclose(table, rope_io[name], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(table[0], 0.0)


@FAST
@given(head_dim=st.sampled_from([8, 16, 64, 100, 128]), p=st.sampled_from([1, 2, 4]),
       cls=st.integers(1, 2), data=st.data())
def test_rope_layout_rows_then_columns(head_dim, p, cls, data):
  table = patching.rope_table(head_dim, G, patch_size=p, cls_token_num=cls)
  g, nf = G // p, head_dim // 4
  assert table.shape == (cls + g * g, head_dim // 2, 2)
  np.testing.assert_array_equal(table[:cls], 0.0)
  i, j = data.draw(st.integers(0, g - 1)), data.draw(st.integers(0, g - 1))
  f = 10000.0 ** (-4.0 * np.arange(nf) / head_dim)
  angles = np.concatenate([i * f, j * f])  # first head_dim/4 pairs: row; last: column
  np.testing.assert_allclose(table[cls + i * g + j, :, 0], np.cos(angles), rtol=0, atol=1e-5)
  np.testing.assert_allclose(table[cls + i * g + j, :, 1], np.sin(angles), rtol=0, atol=1e-5)


def test_rope_for_3b_head_dim_100_has_25_freqs_per_axis():
  cfg = model_lib.config_for("3B")
  assert cfg.head_dim == 100
  table = patching.rope_table(cfg.head_dim, G)
  assert table.shape == (257, 50, 2)
  # Cell (1, 0): the 25 row pairs rotate (angle f_k), the 25 column pairs do not (cos 1, sin 0).
  np.testing.assert_array_equal(table[1 + G, 25:, 0], 1.0)
  assert np.all(table[1 + G, :25, 1] > 0)


@pytest.mark.parametrize("p", [2, 4, 8])
def test_rope_centre_placement(p):
  np.testing.assert_array_equal(patching.rope_table(16, G, placement="centre"),
                                patching.rope_table(16, G, placement="coarse"))
  centre = patching.rope_table(16, G, patch_size=p, placement="centre")
  g, f = G // p, 10000.0 ** (-4.0 * np.arange(4) / 16)
  for i, j in ((0, 0), (g - 1, 0), (1, g - 1)):
    ci, cj = i * p + (p - 1) / 2, j * p + (p - 1) / 2
    angles = np.concatenate([ci * f, cj * f])
    np.testing.assert_allclose(centre[1 + i * g + j, :, 0], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(centre[1 + i * g + j, :, 1], np.sin(angles), atol=1e-5)
  with pytest.raises(ValueError, match="placement"):
    patching.rope_table(16, G, placement="middle")


@FAST
@given(seed=st.integers(0, 2**31 - 1))
def test_apply_rope_rotates_interleaved_pairs_and_zeroes_the_class_position(seed):
  rng = np.random.default_rng(seed)
  table = patching.rope_table(16, 4)  # 17 rows
  x = rng.normal(size=(2, 17, 3, 16)).astype(np.float32)
  out = np.asarray(patching.apply_rope(jnp.asarray(x), jnp.asarray(table)))
  np.testing.assert_array_equal(out[:, 0], 0.0)  # the class position's q and k are zeroed
  rotation = table[None, :, None, :, 0] + 1j * table[None, :, None, :, 1]
  z = (x[..., 0::2] + 1j * x[..., 1::2]) * rotation
  np.testing.assert_allclose(out[..., 0::2], z.real, rtol=0, atol=1e-5)
  np.testing.assert_allclose(out[..., 1::2], z.imag, rtol=0, atol=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_rope_scores_depend_only_on_the_2d_offset(seed, data):
  rng = np.random.default_rng(seed)
  g = 8
  table = jnp.asarray(patching.rope_table(16, g))
  q, k = rng.normal(size=(2, 16)).astype(np.float32)
  cell = st.tuples(st.integers(0, 3), st.integers(0, 3))
  (ai, aj), (bi, bj), (si, sj) = data.draw(cell), data.draw(cell), data.draw(cell)

  def score(qi, qj, ki, kj):
    row = lambda i, j: 1 + i * g + j
    tq = table[jnp.array([row(qi, qj)])]
    tk = table[jnp.array([row(ki, kj)])]
    rq = patching.apply_rope(jnp.asarray(q)[None, None, None], tq)
    rk = patching.apply_rope(jnp.asarray(k)[None, None, None], tk)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(ai, aj, bi, bj), score(ai + si, aj + sj, bi + si, bj + sj),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- schedule

SPE = 10  # steps per epoch


@pytest.mark.parametrize("levels, ends, sizes", [
    (1, [300], (1,)),
    (2, [150, 300], (2, 1)),
    (3, [75, 150, 300], (4, 2, 1)),
    (4, [37, 75, 150, 300], (8, 4, 2, 1)),
])
def test_schedule_boundaries_and_patch_sizes(levels, ends, sizes):
  assert patching.segment_epochs(300, levels, 0.5) == ends
  s = patching.make_schedule(total_steps=300 * SPE, steps_per_epoch=SPE, epochs=300, grid_size=G,
                             num_levels=levels, segment_factor=0.5)
  assert s.patch_sizes == sizes
  assert s.boundaries == tuple(e * SPE for e in ends[:-1])
  assert s.total_steps == 300 * SPE
  assert [seg.end for seg in s.segments] == [e * SPE for e in ends]
  for b, before, after in zip(s.boundaries, sizes, sizes[1:]):
    assert s.patch_size_at(b - 1) == before
    assert s.patch_size_at(b) == after
    assert s.patch_size_at(b + 1) == after
  assert s.patch_size_at(0) == sizes[0]
  assert s.patch_size_at(s.total_steps - 1) == 1
  assert s.patch_size_at(s.total_steps + 100) == 1  # past the end keeps the last level


def _cost(levels, factor):
  return patching.training_cost(patching.make_schedule(
      total_steps=300 * SPE, steps_per_epoch=SPE, epochs=300, grid_size=G, num_levels=levels,
      segment_factor=factor))


def test_training_cost_reproduces_the_paper():
  assert _cost(1, 0.5) == 1.0
  assert [round(_cost(levels, 0.5), 3) for levels in (2, 3, 4)] == [0.625, 0.578, 0.572]
  truncated = [math.floor(round(_cost(2, f), 9) * 100) / 100 for f in (2 / 3, 3 / 4, 4 / 5)]
  assert truncated == [0.5, 0.43, 0.4]
  assert _cost(2, 3 / 4) == pytest.approx(0.4375)
  explicit = patching.make_schedule(total_steps=1000, steps_per_epoch=SPE, epochs=100, grid_size=G,
                                    patch_sizes=(4, 1), fractions=(0.5, 0.5))
  assert explicit.patch_sizes == (4, 1) and explicit.boundaries == (500,)
  assert patching.training_cost(explicit) == pytest.approx(0.5 / 16 + 0.5)


@pytest.mark.parametrize("kwargs, key", [
    (dict(patch_sizes=(3, 1)), "patch size of level 0"),
    (dict(num_levels=6), "patch size of level 0"),  # p = 32 on a 16 x 16 grid
    (dict(num_levels=2, segment_factor=0.0), "segment_factor"),
    (dict(num_levels=2, segment_factor=1.0), "segment_factor"),
    (dict(num_levels=2, segment_factor=1.5), "segment_factor"),
    (dict(num_levels=0), "num_levels"),
    (dict(patch_sizes=(2, 1), fractions=(0.5, 0.4)), "fractions"),
    (dict(patch_sizes=(2, 1), fractions=(1.0,)), "fractions"),
    (dict(patch_sizes=(2, 1), fractions=(1.5, -0.5)), "fractions"),
    (dict(num_levels=4, epochs=3), "npp.epochs"),
    (dict(total_steps=0), "total_steps"),
])
def test_make_schedule_rejects_bad_input_by_name(kwargs, key):
  args = dict(total_steps=3000, steps_per_epoch=SPE, epochs=300, grid_size=G)
  args.update(kwargs)
  with pytest.raises(ValueError, match=key):
    patching.make_schedule(**args)
