"""Training the bundled model: corpus, tokenizer, hole-shaped examples, masked-diffusion
training, export."""
