"""An offline source is a function of its own pre-training recipe and the model: nothing of the fine-tuning run
that uses it (its batch size, seed, λ, validation carve) changes which cached source it reads."""

import numpy as np

from dtnh_jax import models
from dtnh_jax.train import TrainConfig, presets
from dtnh_jax.train import sources


def _config(**changes) -> TrainConfig:
  return TrainConfig.create(**{**presets.tiny(), "source": "unrelated", **changes})


def test_the_fine_tuning_batch_size_does_not_change_the_cached_source():
  assert (sources.offline_source_path("unrelated", _config(batch_size=16))
          == sources.offline_source_path("unrelated", _config(batch_size=48)))


def test_the_run_s_seed_lambda_and_carve_do_not_change_the_cached_source():
  base = sources.offline_source_path("unrelated", _config())
  assert sources.offline_source_path("unrelated", _config(seed=3, reg_weight=7.0, val_fraction=0.25)) == base


def test_the_pre_training_recipe_fixes_its_own_batch_size():
  assert presets.offline_pretraining(10)["batch_size"] == 48


def test_the_pre_training_length_and_the_model_do_change_it():
  base = sources.offline_source_path("unrelated", _config())
  assert sources.offline_source_path("unrelated", _config(pretrain_steps=5)) != base
  assert sources.offline_source_path("unrelated", _config(width=0.25)) != base


def test_the_pre_training_seed_gives_each_seed_a_source_of_its_own():
  base = sources.offline_source_path("unrelated", _config())
  assert sources.offline_source_path("unrelated", _config(pretrain_seed=0)) == base
  assert len({base, *(sources.offline_source_path("unrelated", _config(pretrain_seed=s)) for s in (1, 2))}) == 3


def test_seed_0_keeps_the_cache_key_of_the_sources_pre_trained_before_the_seed_existed():
  # the study's `unrelated` as cached by every session since 2026-12-05 (its log names this folder)
  path = sources.offline_source_path("unrelated", TrainConfig.create(**presets.study()))
  assert path.endswith("unrelated-e6753e5537e2")


def test_two_pre_training_seeds_train_different_sources(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.CACHE_VARIABLE, str(tmp_path))
  weights = []
  for seed in (0, 1):
    path = sources.pretrain_sources(_config(pretrain_seed=seed), ["unrelated"])["unrelated"]
    weights.append(np.asarray(models.load_variables(path)[0]["params"]["conv1"]["kernel"]))
  assert weights[0].shape == weights[1].shape and not np.array_equal(weights[0], weights[1])
