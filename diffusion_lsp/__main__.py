"""`python -m diffusion_lsp ARGS` runs the `diffusion-lsp` command."""

import sys

from diffusion_lsp.cli import main

sys.exit(main())
