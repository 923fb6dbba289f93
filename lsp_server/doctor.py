"""`diffusion-lsp doctor`: what this machine has, which models are on disk, whether the remote
answers, whether an editor finds the server, and which model to run here.

One report, two forms: `diagnose` (a JSON-able dict, also the `diffusion/doctor` request's
answer that the editors' status commands show) and `describe` (plain lines for people).
Nothing here downloads anything; the remote probe is one GET with a short timeout, on a thread
that is abandoned rather than waited for past it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from lsp_server.settings import RemoteSettings

SERVER_COMMAND = "diffusion-lsp"
PROBE_TIMEOUT_S = 2.0  # the remote's answer, connection included
MERCURY_KEY_ENV = "INCEPTION_API_KEY"
NOT_READY_STATES = ("partial", "incomplete")


def check_remote(remote: RemoteSettings, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Is the configured remote reachable, and is its key set? The key itself never appears.
    Waits `timeout_s` (plus a second for DNS) at most, whatever the network does."""
    from lsp_server.backends.base import BackendError
    from lsp_server.backends.remote import Endpoints, api_key

    key_present = bool(api_key(remote))
    answer: dict[str, Any] = {"url": remote.url, "api_key_env": remote.api_key_env,
                              "key_present": key_present, "reachable": None, "detail": ""}
    try:
        endpoints = Endpoints.parse(remote.url)
    except BackendError as error:
        answer["detail"] = str(error)
        return answer
    path = "/v1/models" if endpoints.mercury else "/health"
    outcome: dict[str, Any] = {}

    def probe() -> None:
        import httpx

        # the key only where it cannot be read on the way (as the backend warns otherwise)
        send_key = key_present and (endpoints.secure or endpoints.loopback)
        headers = {"Authorization": f"Bearer {api_key(remote)}"} if send_key else {}
        try:
            response = httpx.get(endpoints.url(path), headers=headers, timeout=timeout_s,
                                 trust_env=not endpoints.loopback)
        except httpx.TimeoutException:
            outcome["detail"] = f"no answer within {timeout_s * 1e3:.0f} ms"
        except httpx.HTTPError as error:
            outcome["detail"] = (str(error) or type(error).__name__)[:200]
        else:
            outcome["status"] = response.status_code
            outcome["detail"] = f"HTTP {response.status_code} from {path}"

    # a thread, so that a resolver that ignores httpx's timeout cannot hold the caller
    thread = threading.Thread(target=probe, name="doctor-remote-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    answer["reachable"] = "status" in outcome
    answer["detail"] = outcome.get("detail", f"no answer within {timeout_s * 1e3:.0f} ms")
    if outcome.get("status") in (401, 403):
        answer["detail"] += " (the key was refused)" if key_present else " (a key is needed)"
    return answer


def check_path(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Where an editor started with this PATH finds `diffusion-lsp`, and this installation's."""
    env = os.environ if environ is None else environ
    found = shutil.which(SERVER_COMMAND, path=env.get("PATH", ""))
    here = Path(sys.executable).parent / SERVER_COMMAND
    this = str(here) if here.exists() else None
    same = found is not None and this is not None and Path(found).resolve() == here.resolve()
    return {"on_path": found, "this_install": this, "same": same}


def check_models() -> tuple[list[dict[str, Any]], str]:
    """Every model on disk (the bundled one, then the Hugging Face cache `pull` writes to),
    with its state; and the cache's path. No network."""
    from model.catalog import hub
    from model.catalog.paths import BUNDLED_DIR, bundled_model_path, hf_hub_dir

    bundled = bundled_model_path()
    models = [{"name": "bundled", "where": "bundled", "state": "ready" if bundled else "absent",
               "path": str(bundled or BUNDLED_DIR), "family": "default"}]
    for row in hub.model_rows():
        if row.local.state == "absent":
            continue
        models.append({"name": row.name, "where": "cache", "state": row.local.state,
                       "path": str(row.local.snapshot) if row.local.snapshot else None,
                       "family": row.family})
    return models, str(hf_hub_dir())


def unconfigured_remote() -> dict[str, Any]:
    """The remote's entry when none is configured: nothing probed, nothing to warn about."""
    default = RemoteSettings()
    return {"url": None, "api_key_env": default.api_key_env, "key_present": False,
            "reachable": None, "configured": False,
            "detail": "none configured (the local model serves completions)"}


SEVEN_B = "DiffuCoder-7B-cpGRPO"  # the 7B model whose quantized fit `doctor` shows


def quantization_choices(machine: Any, names: list[str],
                         choice: str = "auto") -> list[dict[str, Any]]:
    """What `--quantization choice` loads for each model of `names` on this machine's device
    (model.network.quantize.choose_auto for `auto`), with its weights' size; a model that cannot fit
    says why."""
    import torch

    from model.catalog.registry import find_supported
    from model.network import quantize

    device = torch.device("cuda" if machine.gpus else "cpu")
    free = int(machine.gpu_memory_gib * 2**30) if machine.gpus else None
    rows = []
    for name in names:
        known = find_supported(name)
        if known is None:
            continue
        parameters = int(known.size_gb * 1e9 / 2)
        try:
            if choice == quantize.AUTO:
                scheme = quantize.choose_auto(device, parameters,
                                              int(parameters * known.linear_share), free).scheme
            else:
                scheme = quantize.nearest_working(choice, device).scheme
        except quantize.QuantizationError as error:
            rows.append({"model": name, "quantization": None, "why": str(error)})
            continue
        rows.append({"model": name, "quantization": scheme,
                     "size_gb": round(loaded_size_gb(known, scheme, device, parameters), 1)})
    return rows


def loaded_size_gb(known: Any, scheme: str, device: Any, parameters: int) -> float:
    """What `known` (a SupportedModel) occupies loaded in `scheme` on `device`: the rest of
    the network in its kernel's dtype (float32 around CPU int8) or, unquantized, the dtype
    `auto` loads; the head in int8 where the kernel quantizes it."""
    import torch

    from model.catalog.cpu import auto_cpu_dtype
    from model.network import quantize

    kernel = quantize.kernel_for(scheme, device)
    rest = (kernel.dtype if kernel else torch.bfloat16 if device.type == "cuda"
            else auto_cpu_dtype(parameters))
    return known.size_gb_in(scheme, rest.itemsize, bool(kernel and kernel.head))


def diagnose(remote: RemoteSettings | None = None,
             quantization: str = "auto") -> dict[str, Any]:
    """The whole report, as plain data (`describe` words it). `remote`: the remote in use,
    probed; None when there is none (it is then reported as not configured). `quantization`:
    the --quantization asked for, shown per recommended model."""
    from model.catalog.machine import inspect_machine, recommend

    machine = inspect_machine()
    advice = recommend(machine)
    models, cache = check_models()
    return {
        "python": machine.python,
        "system": machine.system,
        "torch": {"version": machine.torch, "build": machine.torch_build},
        "device": {"auto": machine.device, "cuda_available": machine.cuda_available,
                   "gpus": [dataclasses.asdict(gpu) for gpu in machine.gpus],
                   "cpu_cores": machine.cpu_cores, "memory_gib": machine.memory_gib,
                   "cpu_native_bf16": machine.cpu_native_bf16,
                   "cpu_bf16_flags": list(machine.cpu_flags_bf16)},
        "models": models,
        "model_cache": cache,
        "remote": ({**check_remote(remote), "configured": True} if remote is not None
                   else unconfigured_remote()),
        "mercury_key_present": bool(os.environ.get(MERCURY_KEY_ENV)),
        "path": check_path(),
        "quantization": {"asked": quantization, "models": quantization_choices(
            machine, list(dict.fromkeys([advice.model, *([SEVEN_B] if machine.gpus else [])])),
            quantization)},
        "recommendation": {
            "model": advice.model, "why": advice.why, "expect": advice.expect,
            "command": advice.command,
            "measured": dataclasses.asdict(advice.measured) if advice.measured else None},
    }


def describe(report: dict[str, Any]) -> str:
    """Plain lines for people, from `diagnose`'s report."""
    device = report["device"]
    ram = f", {device['memory_gib']:.1f} GiB RAM" if device["memory_gib"] else ""
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']:.1f} GiB)" for g in device["gpus"])
    if not gpus:
        gpus = ("none: CUDA is not available" if report["torch"]["build"] != "cpu"
                else "none used: this torch is a CPU build")
    bf16 = (f"native ({', '.join(device['cpu_bf16_flags'])}): 0.5B+ models run in bf16"
            if device["cpu_native_bf16"] else "not native: models run in fp32 on this CPU")
    lines = [
        f"python      {report['python']}",
        f"system      {report['system']}, {device['cpu_cores']} cores{ram}",
        f"torch       {report['torch']['version']} ({report['torch']['build']} build); "
        f"--device auto = {device['auto']}",
        f"GPU         {gpus}",
        f"bf16 (CPU)  {bf16}",
    ]
    for index, model in enumerate(report["models"]):
        state = model["state"] + ("; run `diffusion-lsp pull` again" if model["state"] in
                                  NOT_READY_STATES else "")
        lines.append(f"{'models' if index == 0 else '':<11} {model['name']}: {state}"
                     + (f" ({model['path']})" if model["path"] else ""))
    lines.append(f"{'':<11} cache: {report['model_cache']} (`diffusion-lsp pull NAME` "
                 "downloads there)")
    remote = report["remote"]
    if remote.get("configured", True):
        reach = ("reachable" if remote["reachable"] else "not reachable"
                 ) + (f" ({remote['detail']})" if remote["detail"] else "")
        lines.append(f"remote      {remote['url']}: {reach}; key {remote['api_key_env']}: "
                     f"{'set' if remote['key_present'] else 'not set'}")
    else:
        lines.append(f"remote      {remote['detail']}; `--remote-url URL` checks one")
    lines.append(f"Mercury     key {MERCURY_KEY_ENV}: "
                 f"{'set' if report['mercury_key_present'] else 'not set'}")
    path = report["path"]
    if path["on_path"]:
        where = f"{path['on_path']}" + ("" if path["same"] or not path["this_install"] else
                                       f" (not this installation: {path['this_install']})")
        lines.append(f"on PATH     {where}")
    else:
        lines.append(f"on PATH     no: point the editor at {path['this_install'] or 'it'} "
                     "(VS Code: diffusionLsp.serverPath; Neovim: cmd)")
    where = gpus if device["gpus"] else "this CPU"
    quantized = report.get("quantization", {"asked": "auto", "models": []})
    for index, row in enumerate(quantized["models"]):
        head = f"quantization {quantized['asked']}" if index == 0 else ""
        choice = (f"{row['quantization']}, weights about {row['size_gb']:.1f} GB"
                  if row["quantization"] else row["why"])
        lines.append(f"{head:<11} {where}: {row['model']} {choice}")
    advice = report["recommendation"]
    lines += ["", f"recommended: {advice['model']}: {advice['why']}",
              f"  expect    {advice['expect']}"]
    if advice["measured"]:
        measured = advice["measured"]
        lines.append(f"  measured  on {measured['machine']}; rerun: {measured['command']}")
    lines.append(f"  run       {advice['command']}")
    return "\n".join(lines)
