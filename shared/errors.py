"""The one exception type for bad input: its message is shown to the user as a single line.

Every message names the cause and the fix ("X is wrong: do Y"). The CLIs catch it, print
`error: <message>` on stderr and exit with status 2; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input or an incompatible artefact; the message is one line naming cause and fix."""
