"""An offline source is a function of its own pre-training recipe and the model: nothing of the fine-tuning run
that uses it (its batch size, seed, λ, validation carve) changes which cached source it reads."""

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
