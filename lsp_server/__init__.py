"""The language server: LSP handlers, context cutting, clean-up, cache, settings;
`backends` fill the holes."""
