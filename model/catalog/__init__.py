"""Which models there are and which this machine can run: the supported models and their
measured latency (registry.py), where a model is found (paths.py; torch-free), `pull` and
what is on disk (hub.py), this machine (machine.py) and its CPU (cpu.py)."""
