"""Quality measurements of a model: HumanEval-infilling (`diffusion-lsp eval`).

`context` cuts what the model sees, `execute` runs model-written programs in a sandboxed
subprocess, `humaneval` puts the two together and reports pass@1 and exact match.
"""
