"""TFDS builders for the paper's datasets that TFDS lacks.

Importing this package registers ``caltech256`` (configs ``30``, ``60``,
``30_no_clutter``, ``60_no_clutter``) and ``mit_indoor67`` with TFDS, so that
``tfds.builder("caltech256/30")`` and ``tfds.data_source(...)`` find them.
Both read a manual download; see each module for what to download.
"""

from dtnh_jax.data.builders.caltech256 import Caltech256
from dtnh_jax.data.builders.caltech256 import Caltech256Config
from dtnh_jax.data.builders.mit_indoor67 import MitIndoor67
from dtnh_jax.data.builders.mit_indoor67 import MitIndoor67Config

__all__ = ["Caltech256", "Caltech256Config", "MitIndoor67", "MitIndoor67Config"]
