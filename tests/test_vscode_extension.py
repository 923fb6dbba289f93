"""The VS Code extension: its settings are the server's settings, and it builds and packages.

`package.json`'s `diffusionLsp.*` settings must map one to one onto the server's settings tree,
with the same defaults and choices: the extension sends the whole tree on every change, so a
drifted default would silently override the server's. The build test runs the extension's own
`npm test` (unit tests of the mapping, server lookup and status bar) and `npm run package`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import typing
import zipfile
from pathlib import Path

import msgspec
import pytest

from lsp_server.settings import SECTION, Settings, describe

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "editors" / "vscode"
EXTENSION_ONLY = ("serverPath", "pythonPath", "trace.server")  # never sent to the server
# settings whose editor default deliberately differs from the server's (the editor asks for
# more than a bare LSP client gets): live previews are off in the server, on in our editors
EDITOR_DEFAULTS = {"completion.preview": True}
NETWORK_ERRORS = ("ENOTFOUND", "ETIMEDOUT", "EAI_AGAIN", "ECONNRESET", "ECONNREFUSED")


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def contributed() -> dict[str, dict]:
    manifest = json.loads((EXTENSION / "package.json").read_text())
    properties = manifest["contributes"]["configuration"]["properties"]
    return {name.removeprefix(f"{SECTION}."): spec for name, spec in properties.items()}


def server_fields() -> dict[str, typing.Any]:
    """Flat camelCase name -> the annotation of that field of the server's settings."""
    fields = {}

    def walk(struct: type, prefix: str) -> None:
        info = msgspec.structs.fields(struct)
        hints = typing.get_type_hints(struct)
        for field in info:
            name = f"{prefix}{field.encode_name}"
            hint = hints[field.name]
            if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
                walk(hint, name + ".")
            else:
                fields[name] = hint
    walk(Settings, "")
    return fields


def test_every_server_setting_is_a_vscode_setting_with_the_same_default():
    ours = {name: spec for name, spec in contributed().items() if name not in EXTENSION_ONLY}
    server = flatten(describe())
    assert sorted(ours) == sorted(server)
    for name, default in server.items():
        assert ours[name]["default"] == EDITOR_DEFAULTS.get(name, default), name


def test_vscode_choices_are_the_server_choices():
    fields = server_fields()
    for name, spec in contributed().items():
        if name in EXTENSION_ONLY or "enum" not in spec:
            continue
        choices = [arg for arg in typing.get_args(fields[name]) if arg is not type(None)]
        if typing.get_origin(fields[name]) is typing.Literal:
            assert sorted(spec["enum"]) == sorted(choices), name


def test_vscode_offers_every_family_the_loader_knows():
    from model.network.families import FAMILIES

    assert sorted(c for c in contributed()["model.family"]["enum"] if c) == sorted(FAMILIES)


def test_vscode_types_accept_the_server_defaults():
    json_types = {bool: "boolean", int: "integer", float: "number", str: "string",
                  list: "array", type(None): "null"}
    for name, default in flatten(describe()).items():
        declared = contributed()[name]["type"]
        declared = declared if isinstance(declared, list) else [declared]
        assert json_types[type(default)] in declared, name


def npm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=EXTENSION, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_statistics_and_the_doctor_are_two_commands():
    """The statistics command shows `diffusion/stats` only (it used to run the doctor first, a
    machine survey of seconds); the doctor is its own command (src/reports.ts, unit-tested by
    the extension's own tests)."""
    manifest = json.loads((EXTENSION / "package.json").read_text())
    titles = {c["command"]: c["title"] for c in manifest["contributes"]["commands"]}
    assert "doctor" not in titles["diffusionLsp.showStats"].lower()
    assert "doctor" in titles["diffusionLsp.doctor"].lower()
    source = (EXTENSION / "src" / "extension.ts").read_text()
    assert 'command("diffusionLsp.showStats", showStats);' in source
    assert 'command("diffusionLsp.doctor", showDoctor);' in source


@pytest.mark.slow
def test_extension_unit_tests_pass_and_it_packages():
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are needed to build the VS Code extension")
    if not (EXTENSION / "node_modules" / ".bin" / "vsce").exists():
        installed = npm("ci", "--no-audit", "--no-fund")
        if installed.returncode != 0:  # one retry: the registry sometimes drops a connection
            installed = npm("ci", "--no-audit", "--no-fund")
        if installed.returncode != 0 and any(e in installed.stderr for e in NETWORK_ERRORS):
            pytest.skip(f"npm registry unreachable: {installed.stderr[-500:]}")
        assert installed.returncode == 0, installed.stderr[-3000:]
    tested = npm("test")
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    assert "# fail 0" in tested.stdout
    vsix = EXTENSION / "diffusion-lsp.vsix"
    vsix.unlink(missing_ok=True)
    packaged = npm("run", "package")
    assert packaged.returncode == 0, packaged.stdout[-3000:] + packaged.stderr[-3000:]
    with zipfile.ZipFile(vsix) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("extension/package.json"))
    assert {"extension/dist/extension.js", "extension/package.json"} <= names
    assert not any(name.startswith("extension/node_modules/") for name in names)
    assert manifest["main"] == "./dist/extension.js"
