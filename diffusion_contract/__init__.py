"""What the language server, the service and the model agree on, in plain Python (no torch):
the sampler's options and settings (options.py), the remote completions API (wire.py),
Inception's next-edit API (edit_wire.py), and the one percentile every report uses
(percentile.py). The language server imports this package, never the tensors under model/."""
