"""A batch as a farm runs it: `--report` lines per input, Ctrl-C that stops cleanly and says how to
resume, a kill that leaves no partial output, and messages that name what they are about."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fakes import FixedFaces, NegativeModel, face_like, landmarks_at, make_face_video
from PIL import Image

from facerestore_cli.cli import main
from facerestore_cli.commands.restore import named
from facerestore_cli.io.files import temp_path_for
from facerestore_cli.io.inputs import discover_inputs
from facerestore_cli.restore.face_restorer import FaceRestorer
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import RestoreOptions
from facerestore_cli.restore.report import FileRecord, Interrupted, JsonlReport, ReportingReporter, SilentReporter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "astronaut_lq.jpg"
PNG_END = b"IEND\xaeB`\x82"
#: What every line of --report holds (README's restore section).
FIELDS = ("path", "output", "status", "faces_found", "faces_restored", "seconds", "error")


class FacesIn:
    """A detector that finds one face in images `width` pixels wide and none in others."""

    def __init__(self, width: int = 128):
        self.width = width
        self.faces = FixedFaces([landmarks_at((64, 64), 30)])

    def detect(self, images: list[np.ndarray]) -> list[list]:
        return [self.faces.detect([im])[0] if im.shape[1] == self.width else [] for im in images]

    def follow(self, image: np.ndarray, faces: list) -> list:
        return list(faces)


def fake_engine(detector=None) -> FaceRestorer:
    return FaceRestorer(NegativeModel(64), detector or FacesIn(), batch_size=1, color_fix="none")


def counting(engine: FaceRestorer, monkeypatch: pytest.MonkeyPatch, then=None) -> list[int]:
    """Count the engine's restore_frames calls; `then(n)` runs before call n (1, 2, ...) is done."""
    calls: list[int] = []
    restore_frames = engine.restore_frames

    def counted(*args, **kwargs):
        calls.append(1)
        if then is not None:
            then(len(calls))
        return restore_frames(*args, **kwargs)

    monkeypatch.setattr(engine, "restore_frames", counted)
    return calls


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[:, :, ::-1])
    return path


def assert_complete_image(path: Path, size: tuple[int, int]) -> None:
    """A whole PNG: its last chunk is there and it decodes to `size` (w, h)."""
    assert path.read_bytes().endswith(PNG_END), f"{path.name} is cut short"
    with Image.open(path) as im:
        im.load()
        assert im.size == size, f"{path.name} is {im.size}"


def hidden_temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()]


# ------------------------------------------------------------------ --report, in process


def test_report_has_a_line_per_input_written_as_it_finishes(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a_face.png", face_like(128, 0))
    write_png(src / "b_wall.png", face_like(96, 1))
    (src / "c_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_png(src / "d_done.png", face_like(128, 2))
    write_png(out / "d_done.png", face_like(128, 3))  # restored by an earlier run
    report_path = tmp_path / "logs" / "report.jsonl"
    lines_when_finished: list[int] = []

    class Watching(SilentReporter):  # the file holds every finished input's line at once
        def file_finished(self, record: FileRecord) -> None:
            lines_when_finished.append(len(report_path.read_text().splitlines()))

    with JsonlReport(report_path) as report:
        reporter = ReportingReporter(Watching(), report)
        summary = run_restore([str(src), str(tmp_path / "missing.png")], fake_engine(), RestoreOptions(out, skip_existing=True), reporter)
    rows = [json.loads(line) for line in report_path.read_text().splitlines()]
    assert lines_when_finished == [1, 2, 3, 4, 5]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"missing.png", "a_face.png", "b_wall.png", "c_broken.png", "d_done.png"}
    for row in rows:
        assert set(row) >= set(FIELDS)
        assert row["seconds"] >= 0
    assert {k: by_name["a_face.png"][k] for k in FIELDS} | {"seconds": 0} == {
        "path": str(src / "a_face.png"),
        "output": str(out / "a_face.png"),
        "status": "ok",
        "faces_found": 1,
        "faces_restored": 1,
        "seconds": 0,
        "error": None,
    }
    assert by_name["b_wall.png"]["status"] == "no_faces" and by_name["b_wall.png"]["output"] == str(out / "b_wall.png")
    assert by_name["d_done.png"]["status"] == "skipped" and by_name["d_done.png"]["faces_found"] == 0
    for name in ("c_broken.png", "missing.png"):
        assert by_name[name]["status"] == "failed" and by_name[name]["output"] is None
        assert by_name[name]["error"].startswith(str(by_name[name]["path"]))
    assert summary.files == 4 and summary.skipped == 1 and len(summary.failures) == 2
    assert summary.without_faces == [str(src / "b_wall.png")] and summary.files_without_faces == 1
    assert not summary.interrupted and summary.left == 0


def orphan_temp_for(path: Path) -> Path:
    """A temp file as a killed run leaves it: made by a process that is gone by now."""
    code = (
        "import sys; from pathlib import Path; from facerestore_cli.io.files import temp_path_for; print(temp_path_for(Path(sys.argv[1])))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


def test_temp_files_of_killed_runs_are_removed_and_live_or_foreign_ones_kept(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    write_png(src / "a.png", face_like(128, 0))
    (out / "faces").mkdir(parents=True)
    orphans = [orphan_temp_for(out / "b.png"), orphan_temp_for(out / "faces" / "clip.mp4")]
    live = temp_path_for(out / "c.png")  # this process is writing it
    host, dead_pid = orphans[0].name.split("frtmp-")[1].split("-")[:2]
    other_host = "00000000" if host != "00000000" else "11111111"  # a run on another machine sharing the folder
    foreign = [out / ".DS_Store", out / ".a.tmp.png", out / f".x.frtmp-{other_host}-{dead_pid}-ab.tmp.png"]
    for path in foreign:
        path.write_bytes(b"user's")
    assert all(p.exists() for p in orphans)

    summary = run_restore([str(src)], fake_engine(), RestoreOptions(out))

    assert summary.temps_removed == 2 and not any(p.exists() for p in orphans)
    assert live.exists() and all(p.read_bytes() == b"user's" for p in foreign)
    assert (out / "a.png").exists()


# ------------------------------------------------------------------ stopping, in process


def test_a_stop_finishes_the_photo_in_hand_and_leaves_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's first Ctrl-C: the photo being restored is written, the next is not started."""
    for i in range(4):
        write_png(tmp_path / "in" / f"p{i}.png", face_like(128, i))
    engine = fake_engine()
    calls = counting(engine, monkeypatch)
    summary = run_restore([str(tmp_path / "in")], engine, RestoreOptions(tmp_path / "out"), stop=lambda: len(calls) >= 2)
    assert len(calls) == 2 and summary.interrupted and summary.ok
    assert summary.files == summary.images == 2 and summary.left == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png"]


def test_a_stop_drops_the_video_in_hand_without_a_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_face_video(tmp_path / "clip.mp4", face_like(128, 0), frames=6)
    engine = fake_engine()
    calls = counting(engine, monkeypatch)
    out = tmp_path / "out"
    summary = run_restore([str(tmp_path / "clip.mp4")], engine, RestoreOptions(out, video_chunk=2), stop=lambda: len(calls) >= 1)
    assert len(calls) == 1, "the video stops at the next chunk"
    assert summary.interrupted and summary.ok and summary.left == 1 and summary.files == summary.videos == 0
    assert list(out.iterdir()) == [], "neither the video nor its temp files may stay"


def test_a_second_ctrl_c_drops_the_file_in_hand_and_keeps_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt mid-file (a second Ctrl-C) comes out as Interrupted with what finished;
    the video being encoded leaves nothing under its name or beside it."""
    write_png(tmp_path / "in" / "a.png", face_like(128, 0))
    make_face_video(tmp_path / "in" / "b.mp4", face_like(128, 1), frames=6)
    write_png(tmp_path / "in" / "c.png", face_like(128, 2))

    def ctrl_c_on_the_third(n: int) -> None:  # a.png, then b.mp4's first chunk, then its second
        if n == 3:
            raise KeyboardInterrupt

    engine = fake_engine()
    counting(engine, monkeypatch, then=ctrl_c_on_the_third)
    out = tmp_path / "out"
    with pytest.raises(Interrupted) as stopped:
        run_restore([str(tmp_path / "in")], engine, RestoreOptions(out, video_chunk=2))
    assert isinstance(stopped.value, KeyboardInterrupt)
    summary = stopped.value.summary
    assert summary.interrupted and summary.files == summary.images == 1 and summary.left == 2 and summary.ok
    assert [p.name for p in out.iterdir()] == ["a.png"]
    assert_complete_image(out / "a.png", (128, 128))


# ------------------------------------------------------------------ messages, through the CLI


def test_named_lists_the_first_few() -> None:
    assert named(0, []) == "0"
    assert named(2, ["a.jpg", "b.png"]) == "2 (a.jpg, b.png)"
    assert named(8, [f"{i}.png" for i in range(8)], first=3) == "8 (0.png, 1.png, 2.png and 5 more)"


def test_cli_names_files_without_faces_and_refuses_the_input_folder_as_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facerestore_cli.restore import face_restorer as face_restorer_module

    monkeypatch.setattr(face_restorer_module, "build_face_restorer", lambda *a, **k: fake_engine(FixedFaces([])))
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        write_png(Path("in") / name, face_like(96, 0))
    make_face_video(Path("in") / "c.mp4", face_like(96, 1), frames=2)
    result = CliRunner().invoke(main, ["restore", "in", "-o", "out"])
    assert result.exit_code == 0, result.output
    assert "3 (in/a.png, in/b.png, in/c.mp4)" in result.output

    into_itself = CliRunner().invoke(main, ["restore", "in", "-o", "in"])
    assert into_itself.exit_code == 1
    assert "error: in: the output folder is this input folder" in into_itself.output
    assert "no images" not in into_itself.output
    inside = CliRunner().invoke(main, ["restore", "in", "-o", "."])
    assert inside.exit_code == 1 and "error: in: this input folder is inside the output folder" in inside.output
    glob = CliRunner().invoke(main, ["restore", "in/*.png", "-o", "in"])
    assert glob.exit_code == 1 and "pattern matches only files in the output folder" in glob.output
    assert sorted(p.name for p in Path("in").iterdir()) == ["a.png", "b.png", "c.mp4"], "originals untouched"


# ------------------------------------------------------------------ the real CLI, killed and interrupted


def batch(folder: Path, n: int) -> list[Path]:
    """n copies of the example photo at 256 px: one face each, restored in about a second at --face-size 64."""
    rgb = cv2.resize(cv2.imread(str(EXAMPLE))[:, :, ::-1], (256, 256), interpolation=cv2.INTER_AREA)
    return [write_png(folder / f"p{i}.png", rgb) for i in range(n)]


def start_restore(src: Path, out: Path, *extra: str) -> tuple[list[str], subprocess.Popen[str]]:
    """`facerestore restore` with the bundled model on the CPU, one photo at a time, as its own process."""
    cmd = [sys.executable, "-m", "facerestore_cli.cli", "restore", str(src), "-o", str(out), "--device", "cpu"]
    cmd += ["--face-size", "64", "--batch-size", "1", *extra]
    env = {**os.environ, "COLUMNS": "250"}
    return cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_output(proc: subprocess.Popen[str], out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not any(p.name.startswith("p") for p in out.glob("*.png")):
        if proc.poll() is not None:
            pytest.fail(f"restore ended before its first output:\n{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no output within the timeout")
        time.sleep(0.01)


def test_a_kill_leaves_no_partial_output_and_skip_existing_completes(tmp_path: Path) -> None:
    inputs = batch(tmp_path / "in", 5)
    out = tmp_path / "out"
    _, proc = start_restore(tmp_path / "in", out)
    wait_for_output(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    finals = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert 1 <= len(finals) < len(inputs), "the kill must come mid-batch"
    for path in finals:
        assert_complete_image(path, (256, 256))
    for temp in hidden_temps(out):  # a temp file left by the kill: hidden, never a final name
        assert temp.name.startswith(".") and ".tmp" in temp.name
    assert sorted(i.path for i in discover_inputs([str(out)])[0]) == finals, "temp files are never taken for inputs"

    report = tmp_path / "report.jsonl"
    killed_temps = hidden_temps(out)
    cmd, proc = start_restore(tmp_path / "in", out, "--skip-existing", "--report", str(report))
    out_text, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    for path in inputs:
        assert_complete_image(out / path.name, (256, 256))
    assert hidden_temps(out) == [], "the rerun removes what the kill left"
    assert bool(killed_temps) == ("temp files of killed runs removed" in out_text)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == [p.name for p in inputs]
    statuses = {Path(r["path"]).name: r["status"] for r in rows}
    assert sorted(n for n, s in statuses.items() if s == "skipped") == [p.name for p in finals]
    assert all(s == "ok" for n, s in statuses.items() if n not in {p.name for p in finals})


def test_ctrl_c_finishes_the_file_in_hand_prints_the_summary_and_how_to_resume(tmp_path: Path) -> None:
    inputs = batch(tmp_path / "in", 5)
    out, report = tmp_path / "out", tmp_path / "report.jsonl"
    _, proc = start_restore(tmp_path / "in", out, "--report", str(report))
    wait_for_output(proc, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-4000:]
    assert "Aborted" not in err and "Traceback" not in err
    assert "facerestore summary" in err and "left (interrupted)" in err
    resume = next(line for line in err.splitlines() if "to resume:" in line).split("to resume:", 1)[1].strip()
    words = shlex.split(resume)
    assert words[:4] == ["python", "-m", "facerestore_cli.cli", "restore"] and words[-1] == "--skip-existing"
    assert str(tmp_path / "in") in words and words[words.index("--output") + 1] == str(out)
    assert words[words.index("--report") + 1] == str(report) and words[words.index("--face-size") + 1] == "64"
    finals = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    assert 1 <= len(finals) < len(inputs) and hidden_temps(out) == []
    for path in finals:
        assert_complete_image(path, (256, 256))
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(r["output"] for r in rows) == [str(p) for p in finals] and {r["status"] for r in rows} == {"ok"}

    # The printed command resumes the run and keeps its report: the interrupted run's lines, then the rest.
    done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    first, resumed = rows[: len(finals)], rows[len(finals) :]
    assert [r["status"] for r in first] == ["ok"] * len(finals), "the interrupted run's lines are kept"
    status = {Path(r["path"]).name: r["status"] for r in resumed}
    assert status == {p.name: ("skipped" if out / p.name in finals else "ok") for p in inputs}
