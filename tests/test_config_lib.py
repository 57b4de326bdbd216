"""Tests for npp_jax.config_lib's resume policy that need no training run."""
import json


def test_keys_added_to_npp_jax_since_a_run_started_are_not_changes():
  """A workdir saved before a config key existed resumes: the key's default keeps the earlier
  behaviour (e.g. optim.schedule, tpu_compiler_options)."""
  from configs import smoke
  from npp_jax import config_lib
  cfg = smoke.get_config()
  saved = json.loads(cfg.to_json_best_effort())
  del saved["optim"]["schedule"]
  del saved["model"]["kernels"]
  saved["optim"]["a_removed_key"] = 1
  assert config_lib.resume_changes(saved, cfg) == []
  saved["optim"]["lr"] = 0.5
  assert [k for k, _, _ in config_lib.resume_changes(saved, cfg)] == ["optim.lr"]
