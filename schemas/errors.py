"""The contract's one exception type: an artefact or input that breaks it, in one line.

It lives here, on the lowest floor, so that schemas/ imports nothing else of the project;
shared.errors re-exports it with the helpers every command uses to print it. Every message
names the cause and the fix ("X is wrong: do Y").
"""


class UserError(Exception):
    """Bad input or an incompatible artefact; the message is one line naming cause and fix."""
