"""Checkpoint conversion: torchvision <-> Flax, files, orbax, dtnh-convert."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from dtnh_jax import cli
from dtnh_jax.models import convert
from dtnh_jax.models import resnet
from helpers import assert_trees_equal, torchvision_resnet


def _random_variables(arch, seed=0, **model_kwargs):
  """Random float32 NumPy variables of the right shapes, without model.init."""
  model = resnet.create_model(arch, **model_kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)
  # Variances must be positive for the model to run on these variables.
  variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5,
                                          variables["batch_stats"])
  return variables


@pytest.fixture(scope="module")
def resnet18_state_dict():
  """A resnet18 state_dict of NumPy arrays (random, made without torch)."""
  return convert.to_torchvision(_random_variables("resnet18"), "resnet18")


# --- torchvision -> Flax -> torchvision ------------------------------------


@pytest.mark.parametrize(
    "arch", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_round_trip_through_flax_is_bit_exact(random_torchvision_resnet, arch):
  import torch  # pylint: disable=g-import-not-at-top
  torch_model = random_torchvision_resnet(arch)
  state_dict = torch_model.state_dict()
  back = convert.to_torchvision(convert.convert_torchvision(state_dict, arch),
                                arch)
  assert list(sorted(back)) == list(sorted(state_dict))
  for key, tensor in state_dict.items():
    converted = torch.from_numpy(back[key])
    assert converted.dtype == tensor.dtype, key
    assert torch.equal(converted, tensor), key


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet34", "resnet50"])
def test_to_torchvision_loads_strictly_into_torchvision(arch):
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  variables = _random_variables(arch, num_classes=7)
  state_dict = {k: torch.from_numpy(v)
                for k, v in convert.to_torchvision(variables, arch).items()}
  torch_model = torchvision_resnet(arch, num_classes=7)
  torch_model.load_state_dict(state_dict, strict=True)
  again = convert.convert_torchvision(torch_model.state_dict(), arch)
  assert_trees_equal(again, variables)


def test_round_trip_of_small_models_needs_no_torch():
  options = dict(num_classes=10, width=0.25, small_stem=True)
  variables = _random_variables("resnet18", **options)
  state_dict = convert.to_torchvision(variables, "resnet18", **options)
  assert state_dict["conv1.weight"].shape == (16, 3, 3, 3)
  assert state_dict["layer4.1.conv2.weight"].shape == (128, 128, 3, 3)
  assert state_dict["fc.weight"].shape == (10, 128)
  assert state_dict["bn1.num_batches_tracked"].dtype == np.int64
  assert_trees_equal(
      convert.convert_torchvision(state_dict, "resnet18", **options), variables)


def test_layouts_are_transposed(resnet18_state_dict):
  variables = convert.convert_torchvision(resnet18_state_dict, "resnet18")
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(
      params["conv1"]["kernel"],
      resnet18_state_dict["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc"]["kernel"],
                                resnet18_state_dict["fc.weight"].T)
  np.testing.assert_array_equal(
      params["layer2_0"]["downsample_1"]["scale"],
      resnet18_state_dict["layer2.0.downsample.1.weight"])
  np.testing.assert_array_equal(
      stats["layer3_1"]["bn2"]["var"],
      resnet18_state_dict["layer3.1.bn2.running_var"])


def test_num_classes_is_inferred_from_fc(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict)
  state_dict["fc.weight"] = np.zeros((5, 512), np.float32)
  state_dict["fc.bias"] = np.zeros((5,), np.float32)
  variables = convert.convert_torchvision(state_dict, "resnet18")
  assert variables["params"]["fc"]["kernel"].shape == (512, 5)


def test_num_batches_tracked_is_optional(resnet18_state_dict):
  state_dict = {k: v for k, v in resnet18_state_dict.items()
                if not k.endswith("num_batches_tracked")}
  convert.convert_torchvision(state_dict, "resnet18")


# --- strictness: errors name the offending keys ------------------------------


def test_missing_key_is_named(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict)
  del state_dict["layer3.1.conv2.weight"]
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"missing keys \(1\): layer3\.1\.conv2\.weight"):
    convert.convert_torchvision(state_dict, "resnet18")


def test_unexpected_key_is_named(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict, **{"head.extra.weight": np.zeros(3)})
  with pytest.raises(convert.CheckpointMismatchError,
                     match=r"unexpected keys \(1\): head\.extra\.weight"):
    convert.convert_torchvision(state_dict, "resnet18")


def test_shape_mismatch_is_named_with_both_shapes(resnet18_state_dict):
  state_dict = dict(resnet18_state_dict)
  state_dict["layer1.0.bn1.running_mean"] = np.zeros(32, np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_torchvision(state_dict, "resnet18")
  message = str(info.value)
  assert "shape mismatches (1)" in message
  assert "layer1.0.bn1.running_mean is (32,), expected (64,)" in message


def test_wrong_arch_suggests_the_right_one(resnet18_state_dict):
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.convert_torchvision(resnet18_state_dict, "resnet50")
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "missing keys" in message and "layer1.0.conv3.weight" in message
  assert "... and" in message  # long lists are cut, with a count
  assert "arch='resnet18'" in message


def test_unknown_arch_is_rejected(resnet18_state_dict):
  with pytest.raises(ValueError, match="resnet101"):
    convert.convert_torchvision(resnet18_state_dict, "resnet101")


def test_to_torchvision_rejects_variables_of_another_arch():
  variables = _random_variables("resnet18", num_classes=3)
  with pytest.raises(convert.CheckpointMismatchError,
                     match="missing keys .*layer1_2/bn1"):
    convert.to_torchvision(variables, "resnet34")


# --- files -------------------------------------------------------------------


def test_safetensors_file_loads_without_torch(tmp_path, resnet18_state_dict,
                                              monkeypatch):
  path = tmp_path / "resnet18.safetensors"
  safetensors.numpy.save_file(resnet18_state_dict, str(path))
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  variables = convert.load_torchvision_checkpoint(path, arch="resnet18")
  assert_trees_equal(
      variables, convert.convert_torchvision(resnet18_state_dict, "resnet18"))


def test_pth_state_dict_loads(tmp_path, random_torchvision_resnet):
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = random_torchvision_resnet("resnet18").state_dict()
  path = tmp_path / "resnet18.pth"
  torch.save(state_dict, path)
  variables = convert.load_torchvision_checkpoint(path, arch="resnet18")
  assert_trees_equal(variables,
                      convert.convert_torchvision(state_dict, "resnet18"))


def test_places365_checkpoint_loads(tmp_path, random_torchvision_resnet):
  """CSAILVision/places365: {"state_dict": {"module." + key: ...}}, 365-way."""
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = random_torchvision_resnet(
      "resnet18", num_classes=365).state_dict()
  path = tmp_path / "resnet18_places365.pth.tar"
  torch.save({"epoch": 90, "arch": "resnet18", "best_prec1": 54.7,
              "state_dict": {"module." + k: v for k, v in state_dict.items()}},
             path)
  variables = convert.load_torchvision_checkpoint(path, arch="resnet18")
  assert variables["params"]["fc"]["kernel"].shape == (512, 365)
  assert_trees_equal(variables,
                      convert.convert_torchvision(state_dict, "resnet18"))


class _NotATensor:
  """Pickled into a checkpoint to check that it is not unpickled."""


def test_pickled_objects_are_refused(tmp_path, resnet18_state_dict):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v)
                             for k, v in resnet18_state_dict.items()},
              "payload": _NotATensor()}, path)
  with pytest.raises(ValueError, match="evil.pth"):
    convert.load_torchvision_checkpoint(path, arch="resnet18")


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors"])
def test_unreadable_file_error_names_the_path(tmp_path, name):
  if name.endswith(".pth"):
    pytest.importorskip("torch")
  path = tmp_path / name
  path.write_bytes(b"this is not a checkpoint")
  with pytest.raises(ValueError, match=name):
    convert.load_torchvision_checkpoint(path, arch="resnet18")


def test_missing_file_error_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.pth"):
    convert.load_torchvision_checkpoint(tmp_path / "nothing.pth")


def test_unknown_suffix_is_rejected(tmp_path):
  path = tmp_path / "weights.npz"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="safetensors"):
    convert.load_torchvision_checkpoint(path)


def test_torch_file_without_torch_says_what_to_install(tmp_path, monkeypatch):
  path = tmp_path / "resnet18.pth"
  path.write_bytes(pickle.dumps({}))
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  with pytest.raises(ImportError, match=r'pip install "dtnh-jax\[torch\]"'):
    convert.load_torchvision_checkpoint(path)


# --- orbax -------------------------------------------------------------------


def test_orbax_checkpoint_rebuilds_the_model(tmp_path):
  options = dict(num_classes=10, width=0.25, small_stem=True)
  model = resnet.resnet18(**options)
  images = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  variables = _random_variables("resnet18", **options)
  path = tmp_path / "ckpt"
  convert.save_variables(path, variables,
                         {"arch": "resnet18", "small_stem": True,
                          "width": 0.25, "source": "test"})

  restored, metadata = convert.load_variables(path)
  assert metadata == {"arch": "resnet18", "num_classes": 10, "width": 0.25,
                      "small_stem": True, "source": "test"}
  assert_trees_equal(jax.tree.map(np.asarray, restored),
                      jax.tree.map(np.asarray, variables))
  rebuilt = convert.model_from_metadata(metadata)
  np.testing.assert_array_equal(rebuilt.apply(restored, images),
                                model.apply(variables, images))


def test_save_variables_refuses_to_overwrite(tmp_path):
  variables = _random_variables("resnet18", num_classes=2, width=0.125)
  path = tmp_path / "ckpt"
  convert.save_variables(path, variables, {"arch": "resnet18", "width": 0.125})
  with pytest.raises(convert.UnsafeTargetError, match="pass --force"):
    convert.save_variables(path, variables, {"arch": "resnet18"})
  convert.save_variables(path, variables, {"arch": "resnet18", "width": 0.125},
                         force=True)


def test_save_variables_needs_an_arch(tmp_path):
  with pytest.raises(ValueError, match="arch"):
    convert.save_variables(tmp_path / "ckpt",
                           _random_variables("resnet18", width=0.125), {})


# --- dtnh-convert ------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_safetensors(tmp_path_factory, resnet18_state_dict):
  path = tmp_path_factory.mktemp("src") / "resnet18.safetensors"
  safetensors.numpy.save_file(resnet18_state_dict, str(path))
  return path


def test_convert_cli_writes_an_orbax_checkpoint(tmp_path, capsys,
                                                resnet18_safetensors,
                                                resnet18_state_dict):
  dst = tmp_path / "out"
  assert cli.convert_main([str(resnet18_safetensors), str(dst),
                           "--arch", "resnet18"]) == 0
  summary = capsys.readouterr().out
  assert "resnet18" in summary and "1000 classes" in summary
  assert "11,689,512 parameters" in summary

  variables, metadata = convert.load_variables(dst)
  assert metadata["arch"] == "resnet18" and metadata["num_classes"] == 1000
  assert_trees_equal(
      jax.tree.map(np.asarray, variables),
      convert.convert_torchvision(resnet18_state_dict, "resnet18"))


@pytest.mark.parametrize("case", ["missing_source", "wrong_arch",
                                  "unknown_arch", "destination_exists"])
def test_convert_cli_bad_input_exits_2(tmp_path, capsys, resnet18_safetensors,
                                       case):
  src, dst = str(resnet18_safetensors), str(tmp_path / "out")
  argv, expected = {
      "missing_source": ([str(tmp_path / "nope.pth"), dst], "nope.pth"),
      "wrong_arch": ([src, dst, "--arch", "resnet34"], "arch='resnet18'"),
      "unknown_arch": ([src, dst, "--arch", "vgg16"], "vgg16"),
      "destination_exists": ([src, str(tmp_path / "ckpt")], "--force"),
  }[case]
  if case == "destination_exists":  # a checkpoint dtnh_jax wrote: replaced only with --force
    convert.save_variables(tmp_path / "ckpt",
                           _random_variables("resnet18", width=0.125),
                           {"arch": "resnet18", "width": 0.125})
  with pytest.raises(SystemExit) as info:
    cli.convert_main(argv)
  assert info.value.code == 2
  stderr = capsys.readouterr().err
  assert expected in stderr
  assert "Traceback" not in stderr
  if case != "destination_exists":
    assert not os.path.exists(dst)
