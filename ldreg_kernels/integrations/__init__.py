"""Optional integrations with other libraries; each module imports its library when imported.

- ``ldreg_kernels.integrations.torchmetrics``: :class:`LIDMetric`, a ``torchmetrics.Metric``
  for the paper's geometric-mean LID and effective rank, streamed over batches
  (``pip install 'ldreg-kernels[lightning]'`` or just ``torchmetrics``).
- ``ldreg_kernels.integrations.lightning``: :class:`LIDMonitor`, a PyTorch Lightning callback
  that logs both on the validation set every validation epoch
  (``pip install 'ldreg-kernels[lightning]'``).

Nothing here is imported by ``import ldreg_kernels``: the core package never needs them.
"""
