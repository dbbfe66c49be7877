"""Data for DTNH: the paper's datasets, the input pipeline, offline arrays.

* :mod:`~dtnh_jax.data.datasets`: the registry of the paper's datasets
  (``DATASETS``), :class:`DatasetInfo`, :class:`ArraySource`, and
  :func:`prepare` (TFDS, ``array_record`` format).
* :mod:`~dtnh_jax.data.builders`: TFDS builders for Caltech-256 and
  MIT Indoor-67 (manual download).
* :mod:`~dtnh_jax.data.pipeline`: :func:`make_train_loader` (endless,
  shuffled, augmented, resumable, sharded) and :func:`make_eval_batches`
  (one masked pass), on grain; the paper's resize / crop / mirror /
  normalization.
* :mod:`~dtnh_jax.data.offline`: a small transfer problem that needs no
  download (scikit-learn's digits as target, a related and an unrelated
  source).
* :mod:`~dtnh_jax.data.folder`: your own dataset, a folder of images with
  one subfolder per class (:func:`folder_splits`, :class:`FolderSource`);
  missing validation and test splits are carved per class.

Example::

  from dtnh_jax import data

  loader = data.make_train_loader("cifar10", batch_size=48, seed=0)
  batch = next(loader)            # {"image": (48, 224, 224, 3) f32, "label"}
  state = loader.get_state()      # JSON-serializable; loader.set_state(state)
  for batch in data.make_eval_batches("cifar10", batch_size=100):
    ...                           # batch["mask"] marks the real examples

  train, test = data.offline.target(seed=0)
  loader = data.make_train_loader(train, batch_size=32, seed=0,
                                  resize=36, crop=32)

  splits = data.folder_splits("my_images", image_size=256)  # my_images/train/CLASS/*.jpg
  loader = data.make_train_loader(splits["train"], batch_size=48, seed=0)
"""

import typing

from dtnh_jax import _lazy

#: Each public name, and the module of this package that defines it, imported when the name is first used (PEP
#: 562, as in ``dtnh_jax``): ``import dtnh_jax.data.datasets`` and the configs' check of a dataset's splits load
#: neither grain nor jax, which the input pipeline needs.
_EXPORTS = {
    "ArraySource": "datasets",
    "DATASETS": "datasets",
    "DatasetInfo": "datasets",
    "DatasetSpec": "datasets",
    "data_source": "datasets",
    "dataset_info": "datasets",
    "prepare": "datasets",
    "DatasetNotPreparedError": "errors",
    "ManualDownloadRequiredError": "errors",
    "FolderLayoutError": "folder",
    "FolderSource": "folder",
    "UnreadableImageError": "folder",
    "folder_source": "folder",
    "folder_splits": "folder",
    "EvalBatches": "pipeline",
    "IMAGENET_MEAN": "pipeline",
    "IMAGENET_STD": "pipeline",
    "TrainLoader": "pipeline",
    "make_eval_batches": "pipeline",
    "make_train_loader": "pipeline",
}

#: The submodules, reachable as attributes (``dtnh_jax.data.offline``) once the package is imported.
_SUBMODULES = ("builders", "datasets", "errors", "folder", "offline", "pipeline", "splits")

__all__ = [
    "ArraySource",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "DatasetSpec",
    "EvalBatches",
    "FolderLayoutError",
    "FolderSource",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ManualDownloadRequiredError",
    "TrainLoader",
    "UnreadableImageError",
    "data_source",
    "dataset_info",
    "folder",
    "folder_source",
    "folder_splits",
    "make_eval_batches",
    "make_train_loader",
    "offline",
    "prepare",
]

if typing.TYPE_CHECKING:  # what type checkers and IDEs read; at run time, __getattr__ below
  # pylint: disable=g-bad-import-order,unused-import
  from dtnh_jax.data import folder
  from dtnh_jax.data import offline
  from dtnh_jax.data.datasets import ArraySource
  from dtnh_jax.data.datasets import data_source
  from dtnh_jax.data.datasets import DATASETS
  from dtnh_jax.data.datasets import dataset_info
  from dtnh_jax.data.datasets import DatasetInfo
  from dtnh_jax.data.datasets import DatasetSpec
  from dtnh_jax.data.datasets import prepare
  from dtnh_jax.data.errors import DatasetNotPreparedError
  from dtnh_jax.data.errors import ManualDownloadRequiredError
  from dtnh_jax.data.folder import folder_source
  from dtnh_jax.data.folder import folder_splits
  from dtnh_jax.data.folder import FolderLayoutError
  from dtnh_jax.data.folder import FolderSource
  from dtnh_jax.data.folder import UnreadableImageError
  from dtnh_jax.data.pipeline import EvalBatches
  from dtnh_jax.data.pipeline import IMAGENET_MEAN
  from dtnh_jax.data.pipeline import IMAGENET_STD
  from dtnh_jax.data.pipeline import make_eval_batches
  from dtnh_jax.data.pipeline import make_train_loader
  from dtnh_jax.data.pipeline import TrainLoader


__getattr__, __dir__ = _lazy.attach(__name__, globals(), _EXPORTS, _SUBMODULES)
