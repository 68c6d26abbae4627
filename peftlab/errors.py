"""User-facing errors.

Anything a user can fix (a bad config key, a missing file, malformed data) raises
:class:`PeftlabError`. The CLI prints its message as one paragraph and exits with
status 2, without a traceback. Bugs in peftlab itself keep their tracebacks.
"""


class PeftlabError(Exception):
    """An error caused by user input, with a message that says what to change."""


class ConfigError(PeftlabError):
    """One or more problems in a configuration; ``problems`` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = "Invalid configuration: " + self.problems[0]
        else:
            msg = "Invalid configuration ({} problems):\n".format(len(self.problems)) + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(msg)
