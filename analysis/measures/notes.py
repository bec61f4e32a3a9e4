"""Notes a measurement writes as warnings, and the command line shows as one line each."""


class OptionNote(UserWarning):
    """How an option was read where it could be read more than one way (the CLI shows it as one line)."""


class ResumeNote(OptionNote):
    """What --resume read back from its file and what it computed anew: the table looks the same either way."""
