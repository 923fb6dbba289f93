"""`diffusion-lsp pull` / `models` against a stand-in hub on loopback (tests/hub_standin.py).

Every test runs with a guard that refuses any connection beyond loopback, HF_ENDPOINT pointing
at the stand-in and HF_HUB_CACHE at a fresh folder.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from pathlib import Path

import pytest

from model.catalog import hub
from model.network.loader import ModelLoadError, load_model, resolve_model_path
from model.network.tiny import write_tiny_model
from tests.hub_standin import StandInHub

WEIGHTS = "model.safetensors"
SMALL_CHUNK = 4096  # bytes per network chunk in tests, so a tiny file arrives in many chunks
# files a real repository carries that the loader never reads
NOT_NEEDED = {"README.md": b"# tiny\n", "modeling_dream.py": b"# remote code\n",
              "pytorch_model.bin": b"\0" * 64}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any test that opens a connection beyond 127.0.0.1 / ::1."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if inet and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"network access beyond loopback: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def tiny_dream(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("standin") / "dream", family="dream")


@pytest.fixture
def standin(tiny_dream, tmp_path, monkeypatch):
    server = StandInHub()
    server.add_repo("org/tiny-dream", tiny_dream, extra=NOT_NEEDED)
    server.add_repo("apple/DiffuCoder-7B-cpGRPO", tiny_dream)
    server.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.stop()


def test_the_guard_refuses_hosts_beyond_loopback():
    with socket.socket() as sock, pytest.raises(AssertionError, match="beyond loopback"):
        sock.connect(("192.0.2.1", 443))


def test_the_standin_serves_huggingface_hubs_own_download(standin, tmp_path):
    from huggingface_hub import hf_hub_download

    path = hf_hub_download("org/tiny-dream", "config.json", cache_dir=tmp_path / "hf",
                           endpoint=standin.url)
    assert Path(path).read_bytes() == standin.repos["org/tiny-dream"].files["config.json"]


def test_pull_by_repo_id_fetches_only_loader_files_and_loads_from_the_cache(standin, tmp_path):
    result = hub.pull("org/tiny-dream")

    assert sorted(result.downloaded) == ["config.json", WEIGHTS, "tokenizer.json"]
    snapshot = tmp_path / "hub" / "models--org--tiny-dream" / "snapshots" / \
        standin.repos["org/tiny-dream"].commit
    assert result.snapshot == snapshot
    assert (snapshot / WEIGHTS).is_symlink()  # the standard cache layout: links into blobs/
    assert not any(name in r[1] for r in standin.requests for name in NOT_NEEDED)
    assert resolve_model_path("org/tiny-dream") == snapshot
    model = load_model("org/tiny-dream", device="cpu")
    assert model.family.name == "dream"


def test_pull_by_short_name_and_load_by_short_name(standin):
    result = hub.pull("diffucoder-7b-cpgrpo")  # the table's name, any case

    assert "apple/DiffuCoder-7B-cpGRPO" in str(standin.requests[0][1])
    assert result.snapshot.parent.parent.name == "models--apple--DiffuCoder-7B-cpGRPO"
    assert load_model("DiffuCoder-7B-cpGRPO", device="cpu").path == result.snapshot


def test_a_pulled_model_is_found_by_huggingface_hub_itself(standin, tmp_path):
    from huggingface_hub import try_to_load_from_cache

    result = hub.pull("org/tiny-dream")
    found = try_to_load_from_cache("org/tiny-dream", WEIGHTS, cache_dir=tmp_path / "hub")
    assert found is not None and str(found) == str(result.snapshot / WEIGHTS)


def test_an_interrupted_pull_resumes_where_it_stopped(standin, tmp_path):
    plan = hub.plan_pull("org/tiny-dream")
    weights = next(f for f in plan.files if f.path == WEIGHTS)

    def interrupt(path, done, total):
        if path == WEIGHTS and done >= 3 * SMALL_CHUNK:
            raise KeyboardInterrupt  # what Ctrl-C does mid-download

    with pytest.raises(KeyboardInterrupt):
        hub.run_pull(plan, progress=interrupt, chunk_bytes=SMALL_CHUNK)
    partial = plan.blob_path(weights).with_name(weights.blob_name + ".incomplete")
    kept = partial.stat().st_size
    assert 0 < kept < weights.size
    assert not (plan.folder / "refs" / "main").exists()  # unfinished: no ref written
    assert hub.local_model("org/tiny-dream").state != "ready"

    standin.requests.clear()
    result = hub.run_pull(hub.plan_pull("org/tiny-dream"), chunk_bytes=SMALL_CHUNK)

    assert result.resumed == [WEIGHTS]
    assert standin.resolve_requests(WEIGHTS) == [
        ("GET", f"/org/tiny-dream/resolve/{plan.repo.commit}/{WEIGHTS}", f"bytes={kept}-")]
    assert not partial.exists()
    assert hub.verify_file(plan.blob_path(weights), weights) is None
    load_model("org/tiny-dream", device="cpu")


def test_a_dropped_connection_is_resumed_within_the_same_pull(standin):
    standin.cut_after[WEIGHTS] = 3 * SMALL_CHUNK  # then the server drops the connection
    result = hub.run_pull(hub.plan_pull("org/tiny-dream"), chunk_bytes=SMALL_CHUNK)

    ranges = [r[2] for r in standin.resolve_requests(WEIGHTS)]
    assert ranges == [None, f"bytes={3 * SMALL_CHUNK}-"]
    assert WEIGHTS in result.downloaded
    load_model("org/tiny-dream", device="cpu")


def test_a_corrupted_download_is_detected_and_not_kept(standin):
    real = standin.repos["org/tiny-dream"].files[WEIGHTS]
    standin.corrupt[WEIGHTS] = real[:-1] + bytes([real[-1] ^ 0xFF])  # same size, one bit off

    with pytest.raises(hub.CorruptDownloadError, match="sha256"):
        hub.pull("org/tiny-dream")

    blobs = hub.repo_folder("org/tiny-dream") / "blobs"
    assert not any(p.name.endswith(".incomplete") for p in blobs.iterdir())
    assert hub.local_model("org/tiny-dream").state != "ready"
    with pytest.raises(ModelLoadError):
        load_model("org/tiny-dream", device="cpu")


def test_a_corrupted_file_in_the_cache_is_found_and_downloaded_again(standin):
    first = hub.pull("org/tiny-dream")
    blob = (first.snapshot / WEIGHTS).resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))

    checked: dict[str, int] = {}
    again = hub.pull("org/tiny-dream", progress=lambda path, done, total:
                     checked.__setitem__(path, done))

    assert checked == {f.path: f.size for f in hub.plan_pull("org/tiny-dream").files}
    assert again.repaired == [WEIGHTS]
    assert sorted(again.present) == ["config.json", "tokenizer.json"]
    load_model("org/tiny-dream", device="cpu")


def test_models_lists_supported_models_and_what_is_on_disk(standin):
    before = {row.repo_id: row for row in hub.model_rows()}
    assert before["apple/DiffuCoder-7B-cpGRPO"].local.state == "absent"
    assert all(row.size.endswith("GB") and row.hardware for row in before.values())

    hub.pull("DiffuCoder-7B-cpGRPO")
    hub.pull("org/tiny-dream")

    rows = {row.repo_id: row for row in hub.model_rows()}
    cpgrpo = rows["apple/DiffuCoder-7B-cpGRPO"]
    assert cpgrpo.local.state == "ready"
    assert cpgrpo.local.snapshot == resolve_model_path("apple/DiffuCoder-7B-cpGRPO")
    assert rows["org/tiny-dream"].local.state == "ready"  # pulled by id: listed too
    assert rows["GSAI-ML/LLaDA-8B-Instruct"].local.state == "absent"


def test_loading_never_downloads(standin):
    with pytest.raises(ModelLoadError, match="diffusion-lsp pull org/tiny-dream"):
        load_model("org/tiny-dream", device="cpu")
    with pytest.raises(ModelLoadError, match="diffusion-lsp pull LLaDA-8B-Instruct"):
        load_model("LLaDA-8B-Instruct", device="cpu")
    assert standin.requests == []


async def test_the_language_servers_backend_never_downloads_and_loads_what_was_pulled(standin):
    from lsp_server.backends.base import BackendError
    from lsp_server.backends.local import LocalBackend
    from lsp_server.settings import ModelSettings, Settings

    settings = Settings(model=ModelSettings(path="DiffuCoder-7B-cpGRPO", device="cpu"))
    with pytest.raises(BackendError, match="diffusion-lsp pull DiffuCoder-7B-cpGRPO"):
        await LocalBackend().start(settings, report=lambda message: None)
    assert standin.requests == []

    hub.pull("DiffuCoder-7B-cpGRPO")
    backend = LocalBackend()
    try:
        described = await backend.start(settings, report=lambda message: None)
    finally:
        await backend.close()
    assert "dream" in described


def test_a_repo_the_loader_cannot_read_fails_before_downloading(standin, tmp_path):
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "config.json").write_text("{}")
    standin.add_repo("org/bin-only", tmp_path / "bin-only", extra={"pytorch_model.bin": b"x"})

    with pytest.raises(hub.PullError, match=r"\*\.safetensors"):
        hub.pull("org/bin-only")
    assert standin.resolve_requests() == []


def test_a_repo_with_bpe_files_instead_of_tokenizer_json_pulls_and_loads(
        standin, tiny_dream, tmp_path):
    from tests.helpers import split_tokenizer_json

    published = tmp_path / "published"
    shutil.copytree(tiny_dream, published)
    split_tokenizer_json(published)  # as Dream-Coder / DiffuCoder / DreamOn publish theirs
    standin.add_repo("Dream-org/DreamOn-v0-7B", published, extra=NOT_NEEDED)

    result = hub.pull("DreamOn-v0-7B")

    assert sorted(result.downloaded) == ["added_tokens.json", "config.json", "merges.txt",
                                         WEIGHTS, "vocab.json"]
    assert hub.local_model("Dream-org/DreamOn-v0-7B").state == "ready"
    assert load_model("DreamOn-v0-7B", device="cpu").family.name == "dream"


def test_a_second_pull_of_the_same_model_at_once_is_refused(standin):
    from filelock import FileLock

    plan = hub.plan_pull("org/tiny-dream")
    plan.folder.mkdir(parents=True)
    with FileLock(str(plan.folder / hub.PULL_LOCK)), \
            pytest.raises(hub.PullError, match="another pull"):
        hub.run_pull(plan)
    assert standin.resolve_requests() == []
    hub.run_pull(plan)  # and once the first is done, the lock is free again
    hub.run_pull(plan)


def test_a_pull_that_cannot_fit_is_refused_before_downloading(standin):
    plan = hub.plan_pull("org/tiny-dream")
    needed = hub.missing_bytes(plan)
    assert needed == plan.total_bytes
    with pytest.raises(hub.PullError, match="not enough disk space"):
        hub.check_disk_space(needed, needed - 1, plan.folder)
    hub.check_disk_space(needed, needed, plan.folder)


def test_offline_mode_refuses_to_pull(standin, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.PullError, match="HF_HUB_OFFLINE"):
        hub.pull("org/tiny-dream")
    assert standin.requests == []


def test_a_gated_repo_says_to_accept_the_licence_and_set_a_token(standin):
    standin.gated.add("org/tiny-dream")
    with pytest.raises(hub.PullError, match="HF_TOKEN"):
        hub.pull("org/tiny-dream")


def test_unknown_names_and_repos_say_what_exists(standin):
    with pytest.raises(hub.PullError, match="Open-dCoder-0.5B"):
        hub.pull("dream-coder")
    with pytest.raises(hub.PullError, match="no model 'org/nothing'"):
        hub.pull("org/nothing")


def test_a_repo_without_tokenizer_json_brings_its_bpe_files():
    files = [hub.RemoteFile(n, 1, "0" * 40) for n in (
        "config.json", "vocab.json", "merges.txt", "added_tokens.json", "modeling_dream.py",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")]
    chosen = [f.path for f in hub.select_loader_files(files)]
    assert chosen == ["added_tokens.json", "config.json", "merges.txt",
                      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                      "vocab.json"]


def test_missing_shards_are_reported():
    names = ["config.json", "tokenizer.json", "model-00001-of-00003.safetensors",
             "model-00003-of-00003.safetensors"]
    assert hub.missing_loader_files(names) == ["model-00002-of-00003.safetensors"]


# ---------------------------------------------------------------------------------------------
# The commands


def test_cli_pull_then_models(standin, capsys):
    from diffusion_lsp.cli import main

    assert main(["pull", "DiffuCoder-7B-cpGRPO"]) == 0
    out, err = capsys.readouterr()
    snapshot = resolve_model_path("DiffuCoder-7B-cpGRPO")
    assert out.strip() == str(snapshot)  # stdout: the path, for scripts
    assert "verified" in err

    assert main(["models", "--json"]) == 0
    rows = {r["repo_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["apple/DiffuCoder-7B-cpGRPO"]["state"] == "ready"
    assert rows["apple/DiffuCoder-7B-cpGRPO"]["path"] == str(snapshot)
    assert rows["Dream-org/DreamOn-v0-7B"]["state"] == "absent"
    for name in ("Base", "Instruct"):  # the block-diffusion family, with size and hardware
        row = rows[f"ByteDance-Seed/Stable-DiffCoder-8B-{name}"]
        assert row["name"] == f"Stable-DiffCoder-8B-{name}" and row["family"] == "stable-diffcoder"
        assert row["size"] == "16.5 GB" and row["hardware"].startswith("GPU with >= 24 GB")

    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "DiffuCoder-7B-cpGRPO" in table and "ready" in table and "LLaDA-8B-Instruct" in table


def test_cli_pull_failures_exit_non_zero_with_the_reason(standin, capsys):
    from diffusion_lsp.cli import main

    assert main(["pull", "org/nothing"]) == 1
    assert "no model 'org/nothing'" in capsys.readouterr().err
