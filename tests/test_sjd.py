"""Tests for speculative Jacobi decoding (npp_jax/sjd.py) through `sample.generate`/`make_sampler`:
the KV cache after rollbacks, exactness in distribution (against the model's distribution
enumerated exactly), greedy parity, seed stability across devices, options and the CLI flags.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from npp_jax import load, sample, sample_cli, sharding, token_choice
from npp_jax import model as model_lib
from test_sample import LABELS, TINY, _randomised, _teacher_forced, cli_setup  # noqa: F401

# 2x2 tokens of a 4-token vocabulary: 256 sequences, whose probabilities are enumerable.
MICRO = model_lib.ModelConfig(dim=32, n_layer=2, n_head=2, vocab_size=4, num_classes=3,
                              grid_size=2, **sample.NO_DROPOUT)
SHAPE = (MICRO.vocab_size,) * MICRO.num_tokens  # a sequence's index in the V^N table
# Chi-square p-value threshold: a correct sampler fails with probability 1e-3 per test (the
# seeds are fixed, so the outcome is too; measured p-values 0.51-0.85 for SJD, 0.03-0.11 for AR).
FALSE_ALARM = 1e-3


@pytest.fixture(scope="module")
def tiny():
  return _randomised(TINY)


@pytest.fixture(scope="module")
def micro():
  """A MICRO model whose conditionals depend strongly on the context (seed chosen for it)."""
  return _randomised(MICRO, seed=3)


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("window", [1, 3, 7])
def test_logits_equal_the_full_forward_after_rejections(tiny, window):
  """Every token's logits (from the pass that made it final) equal a full forward's on the
  final tokens: what rejected drafts wrote into the cache never leaks."""
  opts = dict(cfg_scale=2.0, top_k=20)
  codes, logits, forwards = sample.generate(tiny, LABELS, jax.random.key(0), method="sjd",
                                            window=window, return_logits=True,
                                            return_forwards=True, **opts)
  codes, logits, forwards = map(np.asarray, (codes, logits, forwards))
  _, _, combined = _teacher_forced(tiny, codes, LABELS, 2.0)
  np.testing.assert_allclose(logits, combined, rtol=0, atol=2e-5)
  kept = np.isfinite(np.asarray(token_choice.filter_logits(jnp.asarray(logits), top_k=20)))
  assert np.take_along_axis(kept, codes[..., None], -1).all()  # never a filtered token
  n = TINY.num_tokens
  assert ((forwards >= -(-n // (window + 1))) & (forwards <= n)).all()
  assert forwards.max() < n  # some drafts were accepted


@pytest.mark.parametrize("opts", [
    dict(top_k=1), pytest.param(dict(temperature=0.0, top_p=0.5), marks=pytest.mark.slow)])
def test_greedy_sjd_returns_the_greedy_tokens(tiny, opts):
  ar, logits = sample.generate(tiny, LABELS, jax.random.key(1), cfg_scale=2.0,
                               return_logits=True, **opts)
  sjd, forwards = sample.generate(tiny, LABELS, jax.random.key(2), cfg_scale=2.0, method="sjd",
                                  window=4, return_forwards=True, **opts)
  top2 = np.sort(np.asarray(logits), -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-tie that rounding could flip
  np.testing.assert_array_equal(np.asarray(sjd), np.asarray(ar))
  assert np.asarray(forwards).min() < TINY.num_tokens


@pytest.mark.slow  # ~40 s: three SJD compiles, one sharded over 8 devices.
def test_same_seed_same_samples_on_1_or_8_devices_and_any_batch_split(tiny):
  kw = dict(cfg_scale=2.0, top_p=0.9, method="sjd", window=3)
  one = np.asarray(sample.generate(tiny, LABELS, jax.random.key(0), **kw))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sampled = sample.make_sampler(tiny, mesh, **kw)(LABELS, jax.random.key(0))
  assert sampled.sharding.spec[0] == sharding.BATCH_AXES
  np.testing.assert_array_equal(sample.to_host(sampled), one)
  halves = [sample.generate(tiny, LABELS[i:i + 4], jax.random.key(0), sample_offset=i, **kw)
            for i in (0, 4)]
  np.testing.assert_array_equal(np.concatenate(halves), one)


# ----------------------------------------------------------------------------- exactness

def _exact_distribution(model, label, opts):
  """Probability of each of the V^N sequences under token-by-token sampling with `opts`
  (the filtered, temperature-scaled, CFG-combined conditionals, multiplied out)."""
  cfg = model.cfg
  n, v = cfg.num_tokens, cfg.vocab_size
  seqs = np.stack(np.unravel_index(np.arange(v ** n), (v,) * n), -1).astype(np.int32)
  labels = np.full(len(seqs), label, np.int32)
  cond, uncond, _ = _teacher_forced(model, seqs, labels, 1.0)
  guided = uncond + (cond - uncond) * opts.cfg_scale if opts.use_cfg else cond
  t = np.arange(n)[None, :, None]
  if opts.use_cfg and opts.cfg_interval > -1:
    guided = np.where(t - 1 > opts.cfg_interval, cond, guided)
  f = token_choice.filtered_logits(jnp.asarray(guided.reshape(-1, v)), opts)
  p = np.asarray(jax.nn.softmax(f, -1), np.float64).reshape(len(seqs), n, v)
  return seqs, np.prod(np.take_along_axis(p, seqs[..., None], -1)[..., 0], axis=1)


def _chi_square_p(counts, probs, min_expected=5.0):
  """Pearson chi-square p-value; cells expected below min_expected are pooled into one."""
  expected = probs / probs.sum() * counts.sum()
  small = expected < min_expected
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  return stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.slow  # 30-60 s each: 40,000 samples per method.
@pytest.mark.parametrize("window, opts", [
    (2, dict(cfg_scale=1.0)),
    (3, dict(cfg_scale=2.0, temperature=0.8, top_k=3)),
    (1, dict(cfg_scale=1.5, cfg_interval=1, top_p=0.8)),
])
def test_sjd_samples_follow_the_exact_model_distribution(micro, window, opts):
  num, label = 40_000, 1
  options = token_choice.SamplingOptions(**opts)
  seqs, probs = _exact_distribution(micro, label, options)
  assert (probs > 1e-3).sum() >= 10  # a distribution worth testing
  labels = np.full(num, label, np.int32)
  results = {}
  for method, w in (("ar", 0), ("sjd", window)):
    codes, forwards = sample.generate(micro, labels, jax.random.key(7), method=method, window=w,
                                      return_forwards=True, **opts)
    index = np.ravel_multi_index(np.asarray(codes).T, SHAPE)
    counts = np.bincount(index, minlength=len(seqs)).astype(np.float64)
    results[method] = (counts, np.asarray(forwards))
    assert counts[probs == 0].sum() == 0  # filtered-out sequences never appear
    assert _chi_square_p(counts, probs) > FALSE_ALARM, method
  sjd_counts, forwards = results["sjd"]
  assert 0.5 * np.abs(sjd_counts / num - probs).sum() < 0.02  # total variation
  assert forwards.mean() < 4  # drafts were accepted: the test covered acceptance


@pytest.mark.slow
def test_the_exactness_test_rejects_a_slightly_different_distribution(micro):
  """The chi-square test's power: samples at temperature 1 fail against temperature 0.9."""
  labels = np.full(40_000, 1, np.int32)
  codes = sample.generate(micro, labels, jax.random.key(7), cfg_scale=1.0, method="sjd", window=2)
  counts = np.bincount(np.ravel_multi_index(np.asarray(codes).T, SHAPE), minlength=256)
  _, other = _exact_distribution(micro, 1, token_choice.SamplingOptions(temperature=0.9))
  assert _chi_square_p(counts.astype(np.float64), other) < FALSE_ALARM


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("kw, name", [
    (dict(method="beam"), "method"), (dict(method="sjd"), "window"),
    (dict(method="sjd", window=0), "window"), (dict(window=4), "window"),
    (dict(method="sjd", window=2.5), "window"),
])
def test_bad_method_or_window_is_named(kw, name):
  with pytest.raises(ValueError, match=name):
    token_choice.SamplingOptions(**kw).validate()


@pytest.mark.slow  # ~40 s: a checkpoint, a VQ-less CLI run and a second compile.
def test_cli_samples_with_sjd_and_records_the_method(cli_setup):  # noqa: F811 (fixture)
  config, ckpt, root = cli_setup
  kw = dict(num_samples=8, per_device_batch=1, seed=3, decoder="tokens")
  sample_cli.run(config, ckpt, root / "sjd", method="sjd", window=3, **kw)
  with np.load(root / "sjd" / "chunks" / "chunk_00000.npz") as z:
    codes, labels = z["codes"], z["labels"]
  model = load.load_model(ckpt, config)
  expected = sample.generate(model, labels, jax.random.fold_in(jax.random.key(3), 0),
                             cfg_scale=config.sample.cfg_scale, method="sjd", window=3)
  np.testing.assert_array_equal(codes, np.asarray(expected))
  assert '"method": "sjd"' in (root / "sjd" / "run.json").read_text()
  with pytest.raises(ValueError, match="window"):  # a resume with another window is refused
    sample_cli.run(config, ckpt, root / "sjd", method="sjd", window=2, **kw)
  with pytest.raises(ValueError, match="window"):
    sample_cli.run(config, ckpt, root / "bad", method="sjd", **kw)
