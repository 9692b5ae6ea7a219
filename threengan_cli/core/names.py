"""The methods' names, in registration order: the one list that needs no torch.

Settings validate ``method`` against it and ``--help`` lists the built-in ones without
importing torch (which the methods themselves need). :func:`threengan_cli.model.methods.register`
adds the name of every method it registers, so a method registered by a plugin is known to
the settings as well; a test checks that the built-in names are the registry's.
"""

BUILT_IN = ("vanilla", "sgan", "3ngan", "ecgan")
METHOD_NAMES: list[str] = list(BUILT_IN)


def add(name: str) -> None:
    """Know ``name`` as a method (its step is registered in model/methods.py)."""
    if name not in METHOD_NAMES:
        METHOD_NAMES.append(name)
