"""The two kinds of failure llmq reports to a user.

`BadInputError` means the user asked for something that cannot work (a wrong recipe key, a model that does not
exist, an output folder that is already there): the CLI prints its one-line message and exits 2.
`LlmqError` is anything else that stopped a run (a corrupt checkpoint, a failed save): exit 1.
`gate.GateFailed` (an LlmqError) means a recipe's regression thresholds were missed: exit 3.
Both carry a message meant to be read by a person, so the CLI never needs to show a traceback for them.
"""


class LlmqError(Exception):
    """A failure llmq understood and can explain in one line (CLI exit code 1)."""

    exit_code = 1


class BadInputError(LlmqError):
    """The user's input (recipe, model spec, data spec, paths) cannot be used as given (CLI exit code 2)."""

    exit_code = 2
