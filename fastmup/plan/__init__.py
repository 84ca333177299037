"""The plan of an optimizer step, shared by the optimizers and every backend.

* :mod:`fastmup.plan.spec` — ``AlgorithmSpec``: an algorithm's columns,
  state buffers, scalar state and inputs, declared once per algorithm;
* :mod:`fastmup.plan.batch` — ``TensorBatch``: the per-tensor table of one
  launch (tensors of one device and dtype signature, a row of
  hyperparameters per tensor, step counts, pointer tables, block maps).

Nothing here imports :mod:`fastmup.optim`: the optimizers build batches,
the backends (``fastmup.kernels``, ``fastmup.ext``) only read them.
"""
