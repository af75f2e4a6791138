"""trainq tooling: the local stack (``python -m trainq.stack``), demo data and the demo."""
