"""YAML recipes for the RxT curriculum and the ``rxt`` command line (see ``rxt_hf.recipes.cli``)."""
