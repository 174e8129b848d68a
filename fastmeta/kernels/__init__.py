"""Triton kernels and their launchers, one module per update rule. Imported lazily by
:mod:`fastmeta.backends`, so nothing here is loaded unless Triton runs."""
