"""Errors that name the problem; every stage raises one of these on bad input."""


class PipelineError(Exception):
    """Base class: a message a user can act on."""


class CheckpointError(PipelineError):
    """The checkpoint is missing, corrupt or unsupported."""


class CalibrationError(PipelineError):
    """The calibration data is empty, too short or out of the vocabulary."""


class ArtifactError(PipelineError):
    """An artifact is missing, incomplete or fails its manifest."""


class QuantizationError(PipelineError):
    """The quantization settings do not fit the model."""
