"""Decoding: a hole's layout and state (hole.py), step budgets (schedules.py), which positions
a step commits (scoring.py), the forward passes (passes.py, block.py, and on CUDA the fast
step, fast_step/), each document's context across completions (prompt_cache.py), the infill
loop (sampler.py), several holes at once (multi_hole.py), previews and next edits."""
