"""The methods' names, in registration order: the one list that needs no torch.

Settings validate ``method`` against it and ``--help`` lists it without importing torch (which
the methods themselves need); :mod:`threengan_cli.model.methods` registers a step under each
name and refuses a class whose name is not here, and a test checks that both lists agree.
"""

METHOD_NAMES = ("vanilla", "sgan", "3ngan", "ecgan")
