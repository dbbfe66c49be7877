"""``dtnh-train --projection NAME`` for the never-hurt candidates of ``dtnh_jax.corrections``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dtnh_jax import cli, corrections, names
from dtnh_jax.train import ConfigError, TrainConfig, presets
from dtnh_jax.train import step as step_lib
from helpers import TINY_FLAGS, run_main

# the tiny offline problem from random weights (as tests/test_cli.py's): no source to pre-train, on the ResNet-10 of
# presets.tiny (the ResNet-18's layers, one block per stage): each candidate's train step compiles in a third less
RESNET10 = ["--arch", "resnet10"]

# each candidate with the options given to it, and the factory that must come out with them
CANDIDATES = {
    "share-bound": ({"share_bound_kappa": 0.5, "share_bound_projection": "none"},
                    lambda reg_weight: corrections.share_bound(reg_weight, kappa=0.5, projection="none")),
    "ema": ({"ema_decay": 0.5, "ema_guard_current": True},
            lambda reg_weight: corrections.ema_projection(reg_weight, decay=0.5, guard_current=True)),
    "subspace": ({"subspace_memory": 2}, lambda reg_weight: corrections.subspace_projection(reg_weight, memory=2)),
}


def _tiny(**changes) -> TrainConfig:
  return TrainConfig.create(**{**presets.tiny(), "method": "dtnh-l2-sp", **changes})


def test_every_candidate_is_a_projection_choice():
  assert set(names.CORRECTIONS) == set(CANDIDATES)
  for name in names.CORRECTIONS:
    assert _tiny(projection=name).dtnh.projection == name


#: A candidate's further settings, each with the factory that must come out (named by its --projection first).
SETTINGS = {**CANDIDATES,
            "share-bound/average": ({"share_bound_kappa": 0.5, "share_bound_reference": "average", "ema_decay": 0.7},
                                    lambda reg_weight: corrections.share_bound(reg_weight, kappa=0.5,
                                                                               projection="conflict",
                                                                               reference="average", decay=0.7))}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_projection_builds_the_candidate_with_its_options(name):
  options, factory = SETTINGS[name]
  config = _tiny(projection=name.split("/")[0], **options)
  correction = step_lib.make_correction(config, steps_per_epoch=2)
  expected = factory(optax.exponential_decay(config.recipe.reg_weight, 2, config.recipe.reg_decay, staircase=True))
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "fc": {"b": jnp.array([0.3])}}
  g = {"w": jnp.array([0.2, 0.1, -0.4]), "fc": {"b": jnp.array([0.5])}}
  r = {"w": jnp.array([-0.3, 0.2, 0.1]), "fc": {"b": jnp.array([-1.0])}}
  state, expected_state = correction.init(params), expected.init(params)
  assert type(state) is type(expected_state)
  for _ in range(3):  # the stateful candidates (ema, subspace) differ from DTNH from the second step on
    got, state = correction.update((g, r), state, params)
    want, expected_state = expected.update((g, r), expected_state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.tree.map(lambda x: -0.5 * x + 0.1, g)


@pytest.mark.parametrize("projection", list(CANDIDATES))
def test_a_candidate_trains_through_the_cli_labelled_and_logging_its_removed_share(projection, tmp_path):
  label = dict(zip(names.CORRECTIONS, names.CORRECTION_LABELS))[projection]
  options = cli.settings_to_argv(CANDIDATES[projection][0])  # its options given on the command line (K 2: small)
  code, _, err = run_main(cli.train_main, ["--method", "dtnh-l2-sp", "--projection", projection, *options,
                                           "--seeds", "0", "--steps", "1", "--lr-drop-steps", "1", "--log-every",
                                           "1", "--eval-every", "1", "--checkpoint-every", "1", "--no-progress",
                                           "--workdir", str(tmp_path), *TINY_FLAGS, *RESNET10])
  assert code == 0, err
  run = tmp_path / "scratch" / "dtnh-l2-sp" / "seed0"
  results = json.load(open(run / "results.json"))
  assert results["label"] == f"{label} (L2-SP)" and results["projection"] == projection
  saved = json.load(open(run / "config.json"))
  assert all(saved[key] == value for key, value in CANDIDATES[projection][0].items())
  step = json.loads(open(run / "metrics.jsonl").readline())
  assert 0.0 <= step["removed_fraction"] <= 1.0 + 1e-6 and "angle1" in step


@pytest.mark.parametrize("changes,message", [
    ({"projection": "ema", "ema_decay": 1.0}, "--ema-decay must be in"),
    ({"projection": "share-bound", "share_bound_kappa": -1.0}, "--share-bound-kappa must be >= 0"),
    ({"projection": "subspace", "subspace_memory": 0}, "--subspace-memory must be >= 1"),
    ({"projection": "share-bound", "share_bound_projection": "sometimes"}, "--share-bound-projection must be"),
    ({"projection": "share-bound", "share_bound_reference": "mean"}, "--share-bound-reference must be"),
    ({"projection": "ema", "max_angle": 30.0}, "--max-angle is DTNH's Eq. 5"),
])
def test_bad_candidate_options_are_refused_naming_the_flag(changes, message):
  with pytest.raises(ConfigError, match=message):
    _tiny(**changes)


def test_a_bad_candidate_option_on_the_command_line_is_one_line_and_exit_2(tmp_path):
  code, out, err = run_main(cli.train_main, ["--projection", "ema", "--ema-decay", "1.5", "--workdir",
                                             str(tmp_path), *TINY_FLAGS])
  assert code == 2 and "--ema-decay must be in [0, 1)" in err and "Traceback" not in err
