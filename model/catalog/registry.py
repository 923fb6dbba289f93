"""The published diffusion code models the project supports: short names, repo ids, family,
download size and the hardware each needs. `diffusion-lsp pull` / `models` and `--model` read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SupportedModel:
    """One published checkpoint the project knows: where it lives and what it takes to run."""

    name: str  # short name accepted by `pull` and `--model`
    repo_id: str
    family: str
    size_gb: float  # download size of the weights (safetensors), GB as the hub shows them
    hardware: str
    notes: str = ""
    # the completion confidence floor calibrated for it (docs/benchmarks.md); None: not
    # calibrated yet (no floor)
    min_confidence: float | None = None
    # of the weights, the share in the decoder layers' linear projections (what int8 / int4
    # shrink; model.network.quantize): Qwen2.5-7B 6.53B of 7.62B, LLaDA-8B 6.98B of 8.0B
    linear_share: float = 0.86
    # the LM head's share (Qwen2.5-7B 545M of 7.62B), and whether it is the embedding's tensor
    head_share: float = 0.072
    tied: bool = False

    def size_gb_in(self, scheme: str, rest_bytes: float = 2.0, head_int8: bool = False) -> float:
        """Its weights' size (GB, as size_gb) with the linear projections in `scheme`
        (none | int8 | int4), the rest in `rest_bytes` a value (bf16 by default; a kernel's
        dtype), the head in int8 too where `head_int8` (`weights_bytes`)."""
        parameters = self.size_gb / 2  # billions: size_gb is bf16
        return weights_bytes(parameters, parameters * self.linear_share, scheme, rest_bytes,
                             parameters * self.head_share, head_int8, self.tied)


def weights_bytes(parameters: float, linear_parameters: float, scheme: str,
                  rest_bytes: float = 2.0, head_parameters: float = 0.0,
                  head_int8: bool = False, tied: bool = False) -> float:
    """Bytes the weights of a network take with its decoder layers' linear projections in
    `scheme` (BYTES_PER_WEIGHT: scales included; `none`: `rest_bytes`), everything else in
    `rest_bytes` a value; where `head_int8` (a kernel that quantizes the LM head: CPU int8) the
    head in int8 too, a copy of its own where it is `tied` (the embedding keeps its values)."""
    from diffusion_contract.options import BYTES_PER_WEIGHT

    if scheme not in BYTES_PER_WEIGHT:
        raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(BYTES_PER_WEIGHT)}")
    per = rest_bytes if scheme == "none" else BYTES_PER_WEIGHT[scheme]
    size = (parameters - linear_parameters) * rest_bytes + linear_parameters * per
    if head_int8 and scheme != "none":
        int8 = BYTES_PER_WEIGHT["int8"]
        size += head_parameters * (int8 if tied else int8 - rest_bytes)
    return size


# 7-8B weights in bf16 take 15-16 GB; Dream's README asks for "a GPU with at least 20GB memory".
GPU_24GB = "GPU with >= 24 GB (bf16)"
SUPPORTED_MODELS: tuple[SupportedModel, ...] = (
    # Sizes: the sum of the safetensors shards in each repo's hub listing where marked "hub";
    # "same shape" rows are the Qwen2.5-7B / 0.5B shape in bf16, not read from the hub.
    # pull prints the exact size from the hub's metadata before downloading.
    SupportedModel("Dream-Coder-v0-Instruct-7B", "Dream-org/Dream-Coder-v0-Instruct-7B", "dream",
                   15.2, GPU_24GB, "hub: 4 shards"),
    SupportedModel("Dream-Coder-v0-Base-7B", "Dream-org/Dream-Coder-v0-Base-7B", "dream",
                   15.2, GPU_24GB, "same shape as Instruct"),
    SupportedModel("DiffuCoder-7B-Base", "apple/DiffuCoder-7B-Base", "diffucoder",
                   15.2, GPU_24GB, "hub: 4 shards"),
    SupportedModel("DiffuCoder-7B-Instruct", "apple/DiffuCoder-7B-Instruct", "diffucoder",
                   15.2, GPU_24GB, "hub: 4 shards"),
    SupportedModel("DiffuCoder-7B-cpGRPO", "apple/DiffuCoder-7B-cpGRPO", "diffucoder",
                   15.2, GPU_24GB, "hub: 4 shards"),
    SupportedModel("DreamOn-v0-7B", "Dream-org/DreamOn-v0-7B", "dreamon",
                   15.2, GPU_24GB, "same shape as Dream-Coder"),
    SupportedModel("Open-dCoder-0.5B", "fredzzp/open-dcoder-0.5B", "open-dcoder",
                   1.0, "CPU (slow) or any GPU with >= 4 GB", "Qwen2.5-0.5B shape in bf16",
                   linear_share=0.72, head_share=0.275, tied=True),
    # 358M and 136M of 494M (the embedding is tied to the head)
    SupportedModel("LLaDA-8B-Base", "GSAI-ML/LLaDA-8B-Base", "llada",
                   16.0, GPU_24GB, "hub: 6 shards"),
    SupportedModel("LLaDA-8B-Instruct", "GSAI-ML/LLaDA-8B-Instruct", "llada",
                   16.0, GPU_24GB, "hub: 6 shards"),
    # Seed-Coder-8B's shape (8.25B parameters: 32 layers, hidden 4096, 155136 rows) in bf16
    SupportedModel("Stable-DiffCoder-8B-Base", "ByteDance-Seed/Stable-DiffCoder-8B-Base",
                   "stable-diffcoder", 16.5, GPU_24GB,
                   "Seed-Coder-8B shape in bf16; block diffusion, exact cache"),
    SupportedModel("Stable-DiffCoder-8B-Instruct", "ByteDance-Seed/Stable-DiffCoder-8B-Instruct",
                   "stable-diffcoder", 16.5, GPU_24GB,
                   "Seed-Coder-8B shape in bf16; block diffusion, exact cache"),
    # Qwen2.5-7B-Instruct / -1.5B-Instruct's shapes in bf16 (7.62B / 1.54B parameters, the
    # 1.5B's embedding tied to its head), not read from the hub
    SupportedModel("Fast_dLLM_v2_7B", "Efficient-Large-Model/Fast_dLLM_v2_7B", "fast-dllm-v2",
                   15.2, GPU_24GB,
                   "Qwen2.5-7B shape in bf16; block diffusion, exact cache, no FIM (prefix only)"),
    SupportedModel("Fast_dLLM_v2_1.5B", "Efficient-Large-Model/Fast_dLLM_v2_1.5B",
                   "fast-dllm-v2", 3.1, "CPU (slow) or any GPU with >= 6 GB",
                   "Qwen2.5-1.5B shape in bf16; block diffusion, exact cache, no FIM (prefix only)",
                   linear_share=0.85, head_share=0.151, tied=True),
    # 1.31B and 233M of 1.54B (the embedding is tied to the head)
)


def find_supported(name: str) -> SupportedModel | None:
    """The table row for a short name or repo id (case-insensitive), if any."""
    wanted = name.strip().lower()
    for model in SUPPORTED_MODELS:
        if wanted in (model.name.lower(), model.repo_id.lower()):
            return model
    return None


@dataclass(frozen=True)
class Measured:
    """One latency this project measured, as `diffusion-lsp doctor` quotes it."""

    model: str  # a short name above, or "bundled"
    hardware: str  # "cpu" (fp32), "cpu-bf16" (a CPU with native bf16), "gpu"
    figure: str
    machine: str  # where it was measured
    command: str  # how to measure it again (docs/benchmarks.md has the full runs)


# The figures docs/benchmarks.md reports, one per model and kind of hardware; `doctor` says
# "not measured yet" where no row fits.
MEASURED: tuple[Measured, ...] = (
    Measured("DiffuCoder-7B-cpGRPO", "gpu",
             "p50 113 ms while typing over LSP (16-token holes, 8 tokens a step); a 64-token "
             "hole in 77 ms (833 tokens/s) at 8 tokens a step with the file's context cached",
             "one NVIDIA H200 (141 GB), torch 2.11 with CUDA 13.0, bf16, random weights of "
             "Qwen2.5-7B's shape (DiffuCoder-7B's and Dream-Coder-7B's)",
             "OUT=results scripts/gpu-check.sh (benchmarks/gpu_check.py)"),
    Measured("bundled", "cpu",
             "p50 39 ms for a single-line completion over LSP (its completions are not useful "
             "yet)",
             "a 2-core Intel Xeon VM, torch 2.13 CPU, fp32",
             "diffusion-lsp bench lsp --limit 50"),
    Measured("Open-dCoder-0.5B", "cpu",
             "about 0.62 s for the request after a typed character in int8 (what `auto` "
             "loads on such a CPU; 2.3 s in float32), 1.3 s for the first request on a file "
             "(16-token holes, 4 tokens a step)",
             "a 2-core AMD EPYC VM, AVX2 only (no native bf16), near idle, torch 2.13 CPU, "
             "random weights of the model's shape",
             "diffusion-lsp bench quantization --part speed --limit 4"),
    Measured("Open-dCoder-0.5B", "cpu-bf16",
             "p50 177 ms while typing and 540 ms for the first request on a file, over LSP "
             "(16-token holes, 2 steps each)",
             "a 2-core AMD EPYC VM with avx512_bf16, idle, torch 2.13 CPU, bf16, random "
             "weights of the model's shape",
             "diffusion-lsp bench typing --shape qwen2.5-0.5b --limit 40 --max-tokens 16 "
             "--tokens-per-step 8"),
)
