"""The user-error type: raised for bad input, reported by the CLI as one line without a traceback."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a dataset), not with the program.

    The message must name the file or value at fault and say what is wrong with it in one line.
    """
