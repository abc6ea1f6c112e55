"""`facerestore models`: model files, the store, `models import` and `models pull`.

Checkpoints are tiny files with the leading keys of each upstream layout. `models pull` runs in a
subprocess (huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME when imported) against a
threaded HTTP server on 127.0.0.1 that answers the hub's `/{repo}/resolve/{revision}/{file}`
requests; nothing else is contacted.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from facerestore_cli.commands.models import models
from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.model_file import ModelFile, model_file_path, resolve_model_value
from facerestore_cli.models.published import PUBLISHED, identify, not_installed_hint, published_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: resume points are multiples of it


# --- tiny checkpoints -------------------------------------------------------------------------------


def _t(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def write_sd(path: Path, n: int = 4) -> Path:
    torch.save(
        {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _t(n), "first_stage_model.encoder.conv_in.weight": _t(4, 1)}}, path
    )
    return path


def write_swinir(path: Path) -> Path:
    torch.save({"conv_first.1.weight": _t(), "patch_embed.norm.weight": _t(4, 2)}, path)
    return path


def write_controlnet(path: Path, seed: int = 3) -> Path:
    torch.save({"zero_convs.0.0.weight": _t(4, seed), "middle_block_out.0.weight": _t(4, seed + 1)}, path)
    return path


def write_osediff(path: Path) -> Path:
    torch.save({"state_dict_unet": {"conv_in.base_layer.weight": _t()}, "unet_lora_encoder_modules": ["conv_in"], "rank_unet": 4}, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FACERESTORE_HOME and the hub cache under tmp_path, so nothing real is read or written."""
    from huggingface_hub import constants

    home = tmp_path / "home"
    monkeypatch.setenv("FACERESTORE_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("COLUMNS", "200")
    return home


def invoke(*args: str) -> object:
    return CliRunner().invoke(models, list(args))


# --- model files ------------------------------------------------------------------------------------


def test_model_file_relative_paths_and_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "w").mkdir(parents=True)
    for name in ("sd.ckpt", "swinir.ckpt", "cn.pt"):
        (folder / "w" / name).write_bytes(b"x")
    path = folder / "model.toml"
    path.write_text(
        'kind = "diffbir-v1"\nsd = "w/sd.ckpt"\nswinir = "w/swinir.ckpt"\ncontrolnet = "w/cn.pt"\n\n[files.sd]\nsha256 = "'
        + "a" * 64
        + '"\nsize = 1\n\n[meta]\nnote = "mine"\n'
    )
    model = ModelFile.read(path)
    assert model.kind == "diffbir-v1" and model.controlnet == folder / "w" / "cn.pt"
    assert model.files["sd"].sha256 == "a" * 64 and model.meta == {"note": "mine"}
    assert model.missing_slots() == []
    model.write(tmp_path / "copy" / "model.toml")  # another folder: the paths are written absolute
    again = ModelFile.read(tmp_path / "copy" / "model.toml")
    assert again.slot_paths() == model.slot_paths() and again.files == model.files
    model.write(path)  # its own folder: relative again, so the folder can move
    assert 'sd = "w/sd.ckpt"' in path.read_text()


@pytest.mark.parametrize(
    "text, words",
    [
        ('kind = "diffbir-v1"\nsd = "a"\nswinir = "b"\ncontrolnet = "c"\nsteps = 3\n', ["unknown key 'steps'"]),
        ('kind = "diffbir-v1"\nsd = "a"\nswinir = "b"\n', ["no controlnet", "needs sd, swinir, controlnet"]),
        ('kind = "osediff"\nsd = "a"\nosediff = "b"\ncontrolnet = "c"\n', ["'controlnet' is no slot of a osediff model"]),
        ('kind = "sdxl"\n', ["unknown kind 'sdxl'"]),
        ('sd = "a"\n', ["no `kind`"]),
        ('kind = "frm"\nfrm = "a"\n[files.frm]\nsha256 = "nothex"\n', ["sha256 must be 64"]),
        ('kind = "frm"\nfrm = [1\n', ["not a valid TOML file"]),
    ],
)
def test_model_file_errors_are_one_line_naming_the_file(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        ModelFile.read(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_base_fills_the_slots_not_given(tmp_path: Path, store: Path) -> None:
    for name in ("sd.ckpt", "swinir.ckpt", "v1.pth", "mine.pt"):
        (tmp_path / name).write_bytes(b"x")
    ModelFile("diffbir-v1", sd=tmp_path / "sd.ckpt", swinir=tmp_path / "swinir.ckpt", controlnet=tmp_path / "v1.pth").write(
        model_file_path("diffbir-v1-face")
    )
    mine = tmp_path / "mine.toml"
    mine.write_text('kind = "diffbir-v1"\nbase = "diffbir-v1-face"\ncontrolnet = "mine.pt"\n')
    model = resolve_model_value(str(mine))
    assert isinstance(model, ModelFile)
    assert model.controlnet == tmp_path / "mine.pt" and model.sd == tmp_path / "sd.ckpt"
    mine.write_text('kind = "osediff"\nbase = "diffbir-v1-face"\nosediff = "mine.pt"\n')
    with pytest.raises(InputError, match="is a diffbir-v1 model, not osediff"):
        ModelFile.read(mine)


def test_resolve_model_value(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_value("diffusionreward") is None  # not in the store: the caller's business
    (tmp_path / "runs").mkdir()
    assert resolve_model_value("runs") is None
    with pytest.raises(MissingFileError, match="no such model file"):
        resolve_model_value("nothere.toml")
    frm = tmp_path / "frm.pth"
    frm.write_bytes(b"x")
    ModelFile("frm", frm=frm).write(model_file_path("face-reward-model"))
    found = resolve_model_value("face-reward-model")
    assert isinstance(found, ModelFile) and found.frm == frm
    frm.unlink()
    with pytest.raises(MissingFileError, match="models pull face-reward-model"):
        resolve_model_value("face-reward-model")


# --- identify / import / list -------------------------------------------------------------------------


def test_identify_each_layout(tmp_path: Path) -> None:
    assert identify(write_sd(tmp_path / "a.ckpt"))[0] == "sd"
    assert identify(write_swinir(tmp_path / "b.ckpt"))[0] == "swinir"
    assert identify(write_controlnet(tmp_path / "c.pt"))[0] == "controlnet"
    assert identify(write_osediff(tmp_path / "d.pkl"))[0] == "osediff"
    torch.save({"state_dict": {"visual.proj": _t(), "token_embedding.weight": _t()}}, tmp_path / "e.pth")
    assert identify(tmp_path / "e.pth")[0] == "frm"
    torch.save({"controlnet.zero_convs.0.0.weight": _t(), "unet.x": _t()}, tmp_path / "f.pth")  # BFR_RL's lenient form
    assert identify(tmp_path / "f.pth")[0] == "controlnet"
    torch.save({"foo": _t()}, tmp_path / "g.pth")
    assert identify(tmp_path / "g.pth") == (None, "1 entries starting foo")


def test_import_assigns_slots_records_sha256_and_installs(tmp_path: Path, store: Path) -> None:
    files = [
        write_controlnet(tmp_path / "diffbir_refl.pt"),
        write_sd(tmp_path / "v2-1_512-ema-pruned.ckpt"),
        write_swinir(tmp_path / "face_swinir_v1.ckpt"),
    ]
    result = invoke("import", "diffusionreward", *map(str, files))
    assert result.exit_code == 0, result.output
    assert "--model diffusionreward" in result.output
    written = store / "models" / "diffusionreward.toml"
    assert written.is_file()
    model = resolve_model_value("diffusionreward")
    assert isinstance(model, ModelFile) and model.kind == "diffbir-v1"
    assert model.slot_paths() == {"sd": files[1], "swinir": files[2], "controlnet": files[0]}
    assert {s: r.sha256 for s, r in model.files.items()} == {
        "sd": sha256(files[1]),
        "swinir": sha256(files[2]),
        "controlnet": sha256(files[0]),
    }
    assert model.files["sd"].size == files[1].stat().st_size
    assert model.meta["name"] == "diffusionreward"

    listing = invoke()  # no subcommand: the list
    assert listing.exit_code == 0, listing.output
    rows = {line.split("│")[1].strip(): line for line in listing.output.splitlines() if line.count("│") > 3 and line.split("│")[1].strip()}
    assert rows["diffusionreward"].split("│")[2].strip() == "yes"
    assert rows["lrpo-fidelity"].split("│")[2].strip() == "no"
    for model_ in PUBLISHED:
        assert model_.name in listing.output
    assert "Google Drive" in listing.output and "CreativeML Open" in listing.output

    # a later import of one file keeps the others from the earlier one
    (tmp_path / "other").mkdir()
    new = write_controlnet(tmp_path / "other" / "diffbir_refl.pt", seed=9)
    again = invoke("import", "diffusionreward", str(new))
    assert again.exit_code == 0, again.output
    model = resolve_model_value("diffusionreward")
    assert model.controlnet == new and model.sd == files[1] and model.files["controlnet"].sha256 == sha256(new)

    new.unlink()  # the listing notices a file that is gone
    gone = invoke("list")
    assert "files gone: controlnet" in gone.output


def test_import_refuses_a_file_of_no_slot_with_one_line(tmp_path: Path, store: Path) -> None:
    osediff = write_osediff(tmp_path / "osediff_face.pkl")
    result = invoke("import", "diffusionreward", str(osediff))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "osediff_face.pkl" in lines[0] and "an OSEDiff checkpoint" in lines[0] and "no file of diffusionreward" in lines[0]
    assert not model_file_path("diffusionreward").exists()

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    result = invoke("import", "diffusionreward", str(junk))
    assert result.exit_code == 2 and "junk.pth" in result.output and "Traceback" not in result.output

    two = invoke("import", "lrpo-fidelity", str(write_controlnet(tmp_path / "a.pth")), str(write_controlnet(tmp_path / "b.pth")))
    assert two.exit_code == 2 and "both for the controlnet slot" in two.output

    lone = invoke("import", "diffusionreward", str(write_controlnet(tmp_path / "diffbir_refl.pt")))
    assert lone.exit_code == 2 and "no sd file" in lone.output and "models pull diffusionreward" in lone.output

    unknown = invoke("import", "sdxl", str(osediff))
    assert unknown.exit_code == 2 and "no published model 'sdxl'" in unknown.output


def test_import_takes_a_diffusers_folder_for_sd(tmp_path: Path, store: Path) -> None:
    folder = tmp_path / "sd21-base"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    assert (
        not_installed_hint("osediff-face")
        == "osediff-face is a published model that is not installed; run `facerestore models pull osediff-face`"
    )
    result = invoke("import", "osediff-face", str(folder), str(write_osediff(tmp_path / "osediff_face.pkl")))
    assert result.exit_code == 0, result.output
    model = resolve_model_value("osediff-face")
    assert model.kind == "osediff" and model.sd == folder and "sd" not in model.files
    assert not_installed_hint("osediff-face") is None and not_installed_hint("runs/x") is None


# --- pull against a local stand-in for the hub ----------------------------------------------------------


class FakeHub(BaseHTTPRequestHandler):
    """Answers HEAD/GET `/{repo}/resolve/{revision}/{file}` as the hub does for a plain (non-Xet)
    file: X-Repo-Commit, ETag and Content-Length on HEAD; Range requests with 206 on GET."""

    files: dict[str, bytes] = {}
    drop_after: dict[str, int] = {}  # file -> bytes sent before the first GET is cut
    fail_after_drop: set[str] = set()  # files whose next GET (after the cut) gets a 500
    log: list[tuple[str, str, str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _lookup(self) -> tuple[str, bytes] | None:
        repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
        name = rest.partition("/")[2]
        key = f"{repo}/{name}"
        return (key, self.files[key]) if sep and key in self.files else None

    def _headers(self, status: int, body: bytes, length: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:
        self.log.append(("HEAD", self.path, None))
        found = self._lookup()
        if found is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._headers(200, found[1], len(found[1]))

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        self.log.append(("GET", self.path, rng))
        found = self._lookup()
        if found is None:
            self.send_error(404)
            return
        key, body = found
        if key in self.drop_after:
            cut = self.drop_after.pop(key)
            self._headers(200, body, len(body))
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if key in self.fail_after_drop:
            self.fail_after_drop.discard(key)
            self.send_error(500)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start:
            self._headers(206, body, len(body) - start, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        else:
            self._headers(200, body, len(body))
        self.wfile.write(body[start:])


@pytest.fixture
def hub(tmp_path: Path):
    """The local hub, its files (tiny checkpoints; the SD one past huggingface_hub's 10 MiB
    download chunk, so a cut after the first chunk can be resumed with a Range request)."""
    src = tmp_path / "upstream"
    src.mkdir()
    sd = write_sd(src / "v2-1_512-ema-pruned.ckpt", n=3_000_000)  # ~12 MB
    assert sd.stat().st_size > HUB_CHUNK + 1_000_000
    FakeHub.files = {
        "wubin1928/BFR_RL/v2-1_512-ema-pruned.ckpt": sd.read_bytes(),
        "lxq007/DiffBIR/face_swinir_v1.ckpt": write_swinir(src / "face_swinir_v1.ckpt").read_bytes(),
        "wubin1928/BFR_RL/lrpo_fidelity.pth": write_controlnet(src / "lrpo_fidelity.pth").read_bytes(),
    }
    FakeHub.drop_after, FakeHub.fail_after_drop, FakeHub.log = {}, set(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def run_cli(tmp_path: Path, endpoint: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`facerestore models ARGS` in a fresh interpreter, pointed at the local hub only."""
    clean = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"))
    }
    clean.update(
        FACERESTORE_HOME=str(tmp_path / "home"),
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
        NO_PROXY="127.0.0.1,localhost",
        COLUMNS="200",
        **env,
    )
    code = "from facerestore_cli.commands.models import models; models(prog_name='facerestore models')"
    return subprocess.run([sys.executable, "-c", code, *args], env=clean, capture_output=True, text=True, timeout=180)


def test_pull_resumes_a_dropped_download_and_installs(tmp_path: Path, hub: str) -> None:
    sd_key = "wubin1928/BFR_RL/v2-1_512-ema-pruned.ckpt"
    FakeHub.drop_after = {sd_key: HUB_CHUNK + 500_000}
    result = run_cli(tmp_path, hub, "pull", "lrpo-fidelity")
    assert result.returncode == 0, result.stderr
    sd_gets = [rng for method, path, rng in FakeHub.log if method == "GET" and path.endswith("v2-1_512-ema-pruned.ckpt")]
    assert sd_gets == [None, f"bytes={HUB_CHUNK}-"]  # cut once, then resumed where the kept chunk ends
    model = ModelFile.read(tmp_path / "home" / "models" / "lrpo-fidelity.toml")
    assert str(model.sd).startswith(str(tmp_path / "hf" / "hub"))
    assert sha256(model.sd) == hashlib.sha256(FakeHub.files[sd_key]).hexdigest() == model.files["sd"].sha256
    assert model.files["controlnet"].sha256 == hashlib.sha256(FakeHub.files["wubin1928/BFR_RL/lrpo_fidelity.pth"]).hexdigest()
    assert "--model lrpo-fidelity" in result.stderr

    # pulled again: everything is in the cache, nothing is downloaded a second time
    FakeHub.log.clear()
    again = run_cli(tmp_path, hub, "pull", "lrpo-fidelity")
    assert again.returncode == 0, again.stderr
    assert not [entry for entry in FakeHub.log if entry[0] == "GET"]


def test_pull_interrupted_then_run_again(tmp_path: Path, hub: str) -> None:
    key = "wubin1928/BFR_RL/v2-1_512-ema-pruned.ckpt"
    FakeHub.drop_after, FakeHub.fail_after_drop = {key: HUB_CHUNK + 500_000}, {key}
    first = run_cli(tmp_path, hub, "pull", "lrpo-fidelity")
    assert first.returncode == 2
    assert "Traceback" not in first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    # the hub's HTTP 500 for that file (huggingface_hub words the status its own way), and what to do
    said = r"error: lrpo-fidelity: wubin1928/BFR_RL/v2-1_512-ema-pruned\.ckpt: the hub answered .*\b500\b.*; run the same command again to retry"
    assert len(errors) == 1 and re.fullmatch(said, errors[0]), first.stderr
    assert not (tmp_path / "home" / "models" / "lrpo-fidelity.toml").exists()
    second = run_cli(tmp_path, hub, "pull", "lrpo-fidelity")
    assert second.returncode == 0, second.stderr
    model = ModelFile.read(tmp_path / "home" / "models" / "lrpo-fidelity.toml")
    assert sha256(model.sd) == hashlib.sha256(FakeHub.files[key]).hexdigest()


def test_pull_prints_the_link_and_import_command_for_drive_files(tmp_path: Path, hub: str) -> None:
    result = run_cli(tmp_path, hub, "pull", "diffusionreward")
    assert result.returncode == 0, result.stderr
    assert "https://drive.google.com/file/d/1jLZP_NGxKcfhjN8rJXcbtBGXTin4vo3x/view" in result.stderr
    assert "facerestore models import diffusionreward ~/Downloads/diffbir_refl.pt" in result.stderr
    assert not (tmp_path / "home" / "models" / "diffusionreward.toml").exists()
    # the import then takes sd and swinir from the hub cache, offline
    refl = write_controlnet(tmp_path / "diffbir_refl.pt")
    done = run_cli(tmp_path, hub, "import", "diffusionreward", str(refl), HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    model = ModelFile.read(tmp_path / "home" / "models" / "diffusionreward.toml")
    assert (
        model.controlnet == refl and sha256(model.swinir) == hashlib.sha256(FakeHub.files["lxq007/DiffBIR/face_swinir_v1.ckpt"]).hexdigest()
    )


def test_pull_offline_is_one_line(tmp_path: Path, hub: str) -> None:
    result = run_cli(tmp_path, hub, "pull", "face-reward-model", HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE is set" in errors[0] and "FaceRewardModel.pth" in errors[0]
    assert not [entry for entry in FakeHub.log]  # offline: not even a HEAD


def test_pull_a_file_the_hub_lacks_is_one_line(tmp_path: Path, hub: str) -> None:
    result = run_cli(tmp_path, hub, "pull", "face-reward-model")  # FaceRewardModel.pth is not served
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such file" in result.stderr and "wubin1928/BFR_RL/FaceRewardModel.pth" in result.stderr


def test_models_is_registered_in_the_cli(store: Path) -> None:
    from facerestore_cli.cli import main

    result = CliRunner().invoke(main, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert published_model("osediff-face").name in result.output
