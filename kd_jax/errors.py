"""The one exception type for mistakes in what the user handed us."""


class UserInputError(Exception):
  """Bad input from the user: a missing folder, a corrupt image, an unknown name.

  launch.py prints the message alone (no traceback) and exits non-zero, so the
  message must name the culprit (path, config key or value) and what to do.
  """
