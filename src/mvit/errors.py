"""Errors a user can fix. The CLI prints their message as one sentence and exits non-zero.

Anything that is not an `MvitError` is a bug in mvit and keeps its traceback.
"""


class MvitError(Exception):
    """A problem with the user's input: a file, a folder, a config, a plugin or a name."""


class ModelFileError(MvitError):
    """A model file that cannot be read, or that does not fit the model it describes."""


class WeightsError(MvitError):
    """A checkpoint whose tensors do not match the backbone: missing, unexpected or mis-shaped."""


class DiskFull(MvitError):
    """A write the disk has no room for (or the quota is spent): the command line's own exit status, 3."""


class ImageError(MvitError):
    """An image file that cannot be decoded."""


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit: a decompression bomb, or not a lesion photograph."""


class PluginError(MvitError):
    """A plugin that cannot be loaded, or a dataset or head name that no plugin provides."""


class DatasetError(MvitError):
    """A dataset folder that does not match its plugin's layout."""


class ConfigError(MvitError):
    """A training or evaluation config that does not validate."""


class UnknownHeadError(MvitError):
    """A head name that the model (or the installed plugins) does not have."""


class TrainingDiverged(MvitError):
    """A training run whose loss became NaN or infinite; the last good model is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where a command cleans up as on Ctrl-C (`mvit.runtime.files`). Under
    torchrun it is torchrun stopping the other processes because one failed: that one says why."""
