"""The op layer: input validation, implementation dispatch and (for the differentiable steps)
the ``autograd.Function``s. Each update rule keeps one file stem here, in ``csrc/`` and in
``fastmeta/kernels/``."""
