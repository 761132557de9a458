"""Training (DESIGN.md sections 5, 7, 8): the loop (``loop``), what it is built from
(``setup``, ``state``, ``steps``, ``optim``, ``losses``), what it writes
(``checkpoints``, ``metric_writers``), evaluation (``evaluation``, ``metrics``),
faults it survives (``guards``) and starting from earlier runs (``transfer``)."""
