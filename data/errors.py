class DataError(ValueError):
    """Bad input data or arguments. The message names the file, line or field at fault; the
    command line prints it without a traceback."""
