"""The shared completion service: the diffusion engine behind a FIM completions API on Ray Serve
(`app`), and the request/response types that are its contract with every client (`wire`)."""
