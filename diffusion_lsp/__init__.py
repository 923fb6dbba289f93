"""The `diffusion-lsp` command: one parser (`cli`) and the plain-script commands (`commands`)."""
