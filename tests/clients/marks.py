"""What the client suites share."""


def calls(text):
    """Marks the client calls a test covers, for docs/compatibility.md (conftest.py)."""

    def mark(f):
        f.calls = text
        return f

    return mark
