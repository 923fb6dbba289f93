"""The diffusion model: families < tokenizer < loader < sampler < engine, tiny test
checkpoints, training."""
