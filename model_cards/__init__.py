"""Model card templates (``*.md``) filled in when an RxT model is saved; shipped as package data."""
