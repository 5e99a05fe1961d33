"""YAML recipes for the RxT curriculum and the ``rxt`` command line (see ``recipes.cli``)."""

__version__ = "0.1.0"
