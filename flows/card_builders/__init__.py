"""The card builders behind :mod:`flows.cards`, one module per card family (import them from there)."""
