"""RxT for Hugging Face, installed as one namespace.

The checkout's top-level folders are installed as sub-packages of ``rxt_hf`` (see ``setup.py``):
``rxt_hf.modeling_rxt`` (also the remote-code folder saved beside every model), ``rxt_hf.trainers``,
``rxt_hf.recipes`` (with the ``rxt`` command), ``rxt_hf.serving``, ``rxt_hf.benchmarks`` and
``rxt_hf.model_cards``.
"""

__version__ = "0.1.0"
