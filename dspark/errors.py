"""One exception type for every problem a user can fix.

The CLI turns a ``DsparkError`` into a single line on stderr and a non-zero exit code, so messages must name
the problem and the fix; anything else that escapes is a bug and keeps its traceback.
"""


class DsparkError(Exception):
    """A user-facing error: bad input, an unsupported model, a bundle that does not match its manifest."""

    exit_code = 2

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        # the request field at fault, when there is one: the server answers a 400 that names it
        self.param = param
