"""Measuring diffusion-lsp: speed (model, LSP, service load), quality (HumanEval-infilling),
and what they share (`report`). Results land in benchmarks/results/."""
