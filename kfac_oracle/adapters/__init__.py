"""Adapters that expose third-party KFAC libraries through the public contract."""
