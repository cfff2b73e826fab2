"""Adapters that expose third-party KFAC libraries through the public contract.

One module per library. Each declares ``LIBRARY`` (its distribution, import name and
kfac-oracle extra) and ``ADAPTERS = {built-in name: class}``, and is registered under
the entry-point group ``kfac_oracle.adapters`` in ``pyproject.toml``
(:mod:`kfac_oracle.implementations` reads the registry). Importing a module never
imports its library; that happens in ``compute``. Shared pieces are in
:mod:`kfac_oracle.adapters._common`.
"""
