"""The ``fogmig`` command line: thin modules that parse arguments and print. Nothing imports them
but :mod:`fogmig.platform.cli.main`.
"""
