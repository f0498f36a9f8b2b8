"""The errors of the data side, in one place so that every module can raise them without importing another."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message names file and keys."""


class DatasetError(ValueError):
    """The data exists but is not what it should be: bad checksum, corrupt archive, malformed file."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """The data is not on disk and could not (or may not) be downloaded; the message says where to put it."""
