"""Errors raised when a dataset cannot be read yet.

Both carry a message written for the person at the keyboard: what to
download, from where, into which folder, and the command that prepares it.
The command-line tools turn them into exit status 2 without a traceback.
"""

from __future__ import annotations

__all__ = ["DatasetNotPreparedError", "ManualDownloadRequiredError"]


class DatasetNotPreparedError(RuntimeError):
  """The dataset is not prepared (as array_record) in the data directory."""


class ManualDownloadRequiredError(DatasetNotPreparedError):
  """Preparing the dataset needs files the user must download by hand."""
