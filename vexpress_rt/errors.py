"""User-facing errors: the CLI prints their message and exits with code 2, without a traceback."""


class VExpressError(Exception):
    """Base of every error caused by the user's input or files rather than by a bug."""


class InputError(VExpressError):
    """A bad image, audio or key-point input; no face found; audio too short."""


class WeightsError(VExpressError):
    """A missing, unreadable or mismatched model file or folder."""
