"""An example hub-soup plugin: the merge method ``median`` and the eval task ``image-top2``.

Each lives in its own module, named by an entry point in ``pyproject.toml``: hub-soup
lists both names from this distribution's metadata and imports a module only when a
recipe uses its name, so this package's ``__init__`` imports nothing.
"""
