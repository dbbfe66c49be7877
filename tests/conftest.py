"""Shared pytest fixtures and markers."""

import pytest

_PARITY_KEY = pytest.StashKey[dict]()


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes several seconds on a CPU (still run by default)")
  config.stash[_PARITY_KEY] = {}


@pytest.fixture
def record_parity(request, record_property):
  """Records a measured difference to torchvision, shown in the summary.

  ``record_parity(name, difference, scale)`` keeps the worst relative value
  ``difference / max(1, scale)`` per name; ``pytest -rA`` or the terminal
  summary at the end lists them.
  """
  worst = request.config.stash[_PARITY_KEY]

  def record(name: str, difference: float, scale: float = 1.0) -> None:
    difference, scale = float(difference), float(scale)
    record_property(name, difference)
    if name not in worst or difference > worst[name][0]:
      worst[name] = (difference, scale)

  return record


def pytest_terminal_summary(terminalreporter, config):
  worst = config.stash.get(_PARITY_KEY, {})
  if worst:
    terminalreporter.section("worst differences to torchvision")
    for name, (difference, scale) in sorted(worst.items()):
      terminalreporter.write_line(
          f"{name}: max |diff| = {difference:.3g} (max |reference| = "
          f"{scale:.3g}, relative {difference / max(1.0, scale):.3g})")


@pytest.fixture
def random_torchvision_resnet():
  """Factory: a torchvision ResNet with random weights and BN statistics.

  Fresh torchvision models have running_mean 0, running_var 1 and BN
  scale 1, bias 0, which would hide a mix-up of those tensors; here all four
  are random. ``random_torchvision_resnet(arch, num_classes=1000, seed=0)``
  returns the model in eval mode.
  """
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")

  def make(arch: str, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
      for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
          module.weight.uniform_(0.5, 1.5)
          module.bias.normal_(0.0, 0.2)
          module.running_mean.normal_(0.0, 0.2)
          module.running_var.uniform_(0.5, 2.0)
    return model.eval()

  return make
