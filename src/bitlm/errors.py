"""One exception type for every user-facing failure.

The CLI prints ``bitlm: error: <message>`` for a BitlmError and exits 2, so every message must stand on
its own line: name the file or field, say what is wrong and what to do.
"""


class BitlmError(Exception):
    """A user-facing error: bad input, a bad file, a missing model. Never a bug in bitlm itself."""
