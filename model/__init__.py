"""The diffusion model (knows tensors, no LSP), by concern: catalog/ (which models, where,
this machine) < network/ (families, tokenizers, the loader, quantized weights) < decoding/
(the sampler and its pieces, the CUDA fast step) < engine.py (one worker serving many
holes); train/ (the bundled model's training)."""

import logging

# torchao (which transformers imports too, wherever it is installed) warns at import about its
# libraries for other hardware (CUDA-only kernels on a CPU, no Triton), and torch about pytree
# registrations it makes: nothing a user can act on, so kept out of every command's output
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
