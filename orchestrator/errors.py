"""Errors Keel shows to people.

`BadInput` is anything the user can fix by editing a spec, a command line or a
dataset: the CLI prints its one-line message and exits 2, before any Ray
cluster is started or any run directory is written. `RunFailed` is a run that
started and did not finish well (diverged, a worker crashed past the failure
budget): exit 1.
"""


class BadInput(Exception):
    """One line naming the field or file and what was expected (exit code 2)."""


class RunFailed(Exception):
    """A run that started and failed or diverged (exit code 1)."""
