"""The network: what differs per family (families.py), tokenizers, a checkpoint loaded into
stock transformers classes with bidirectional attention (loader.py), its weights in 8 or 4
bits (quantize.py, quantized_cache.py), the model a command runs (load.py), and tiny or
random-weight checkpoints for tests and benchmarks (tiny.py, published.py, shapes.py)."""
