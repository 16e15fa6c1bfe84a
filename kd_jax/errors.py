"""Errors that end a run with one line of explanation instead of a traceback."""


class KDJaxError(Exception):
  """A failure the user can act on; launch.py prints the message alone.

  The message must name the culprit (path, config key, step) and what to do.
  """

  exit_code = 1


class UserInputError(KDJaxError):
  """Bad input from the user: a missing folder, a corrupt image, an unknown name."""


class TrainingDiverged(KDJaxError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(KDJaxError):
  """SIGTERM or SIGINT arrived; a checkpoint was written so a rerun resumes."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum
