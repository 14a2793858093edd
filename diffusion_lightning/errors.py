"""Errors that mean "the input is wrong": the entry points print them without a stack trace."""


class UserError(Exception):
    """Bad input (config, checkpoint, data) with a message that names the fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or from another model."""
