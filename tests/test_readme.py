"""The README cannot drift from the code: its flag tables are the scripts' own flags, and every command it
shows that can run without a GPU, a Docker engine or the internet is executed here as a user types it after
the set-up: in bash, from a PATH without the project's environment, after the README's own activation line
(``source .venv/bin/activate``), with ``/data``, ``/results`` moved into a temp folder. The CPU-sized Quick
start runs literally; the GPU-sized commands get tiny settings appended (1 epoch, tiny filters). The MSD
download is served from a local archive of a small Hippocampus-like task on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<tag>[\w-]+)[^>]*-->\n)?```bash\n(?P<body>.*?)```", re.S)
TINY_TRAIN = "--max_epochs 1 --min_epochs 1 --train_batches 1 --val_cases 1 --noprogress"


def bash_blocks() -> list[tuple[str | None, list[str]]]:
    """(tag, command lines) of every bash block, continuation lines joined."""
    blocks = []
    for m in BLOCK.finditer(README):
        body = m.group("body").replace("\\\n", " ")
        lines = [re.sub(r"\s+#.*$", "", ln).strip() for ln in body.splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        blocks.append((m.group("tag"), lines))
    return blocks


def test_every_bash_block_is_classified():
    """A new README command must either run in this test or say why it cannot."""
    untagged = [lines[0] for tag, lines in bash_blocks() if tag is None]
    assert not untagged, f"README bash blocks without a <!-- readme-test: ... --> marker: {untagged}"
    tags = {tag for tag, _ in bash_blocks()}
    assert {"setup", "activate", "cpu", "msd", "resume", "folds", "custom", "multigpu"} <= tags


def test_flag_tables_match_the_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    from flag_tables import render

    stale = "README flag tables are stale: run python scripts/flag_tables.py --update"
    assert render(README) == README, stale


def test_every_config_field_has_help():
    from nnunet_jax.configs.default import get_config
    from nnunet_jax.configs.help import FLAG_HELP

    assert set(get_config()) == set(FLAG_HELP)


# ------------------------------------------------------------------------------ running the commands


def _write_nifti(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def make_hippocampus_like(root: Path, n_train: int = 8, n_test: int = 2, seed: int = 0) -> Path:
    """A small single-modality MRI task in MSD layout named like Task04 (two adjacent structures)."""
    rng = np.random.default_rng(seed)
    task = root / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    training, test = [], []
    # Test images 002 and 005 as in the real Task04 (the README's Python example predicts 002).
    names = [k for k in range(1, 64) if k not in (2, 5)][:n_train] + [2, 5][:n_test]
    for i in range(n_train + n_test):
        z, y, x = (44, 60, 44) if i == 0 else tuple(int(v) for v in rng.integers([34, 48, 34], [45, 61, 45]))
        zz, yy, xx = np.meshgrid(*(np.linspace(-1, 1, s) for s in (z, y, x)), indexing="ij")
        c = rng.uniform(-0.15, 0.15, 3)
        label = np.zeros((z, y, x), np.uint8)
        blob = ((zz - c[0]) / 0.3) ** 2 + ((yy - c[1]) / 0.45) ** 2 + ((xx - c[2]) / 0.3) ** 2 < 1
        label[blob & (yy < c[1])] = 1
        label[blob & (yy >= c[1])] = 2
        image = 100 + 40 * label + rng.normal(0, 8, label.shape)
        image[(zz**2 + yy**2 + xx**2) > 2.2] = 0  # background outside a rounded box
        name = f"hippocampus_{names[i]:03d}.nii.gz"
        img_xyz = image.transpose(2, 1, 0).astype(np.float32)
        if i < n_train:
            _write_nifti(img_xyz, task / "imagesTr" / name)
            _write_nifti(label.transpose(2, 1, 0), task / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write_nifti(img_xyz, task / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    meta = {"name": "Hippocampus", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": n_train, "numTest": n_test, "training": training, "test": test,
            "tensorImageSize": "3D"}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


@pytest.fixture(scope="module")
def archive_server(tmp_path_factory):
    """A local HTTP server with Task04_Hippocampus.tar; yields its URL."""
    src = tmp_path_factory.mktemp("msd_src")
    task = make_hippocampus_like(src)
    serve = tmp_path_factory.mktemp("msd_www")
    with tarfile.open(serve / "Task04_Hippocampus.tar", "w") as tar:
        tar.add(task, arcname=task.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/Task04_Hippocampus.tar"
    server.shutdown()


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a new shell after the set-up: the project's environment is NOT on PATH (the README
    says to activate it; pytest itself may run from it), no simulated devices (conftest's 8 are for tests)."""
    venv_bins = {Path(sys.executable).parent.resolve(), (ROOT / ".venv" / "bin").resolve()}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() not in venv_bins]
    env = dict(os.environ, PATH=os.pathsep.join(path), JAX_PLATFORMS="cpu", **extra)
    for name in ("XLA_FLAGS", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    return env


class Runner:
    """Runs README command lines as a user would: bash, the README's activation line, then the command."""

    def __init__(self, tmp: Path, url: str = ""):
        self.data, self.results = tmp / "data", tmp / "results"
        self.url = url
        self.env = user_env()
        self.filters = "4,8,16,32"
        self.activate = " && ".join(block("activate"))
        assert (ROOT / ".venv" / "bin" / "activate").is_file(), "the README's set-up builds .venv first"
        python = subprocess.run(["bash", "-c", f"{self.activate} && command -v python"], cwd=ROOT,
                                env=self.env, capture_output=True, text=True, check=False).stdout.strip()
        assert python and Path(python).parent.resolve() == (ROOT / ".venv" / "bin").resolve(), (
            f"after the README's activation line, python is {python!r}, not .venv's")

    def paths(self, line: str) -> str:
        """Move /data and /results into the temp folder."""
        line = re.sub(r"(?<![\w.])/data\b", str(self.data), line)
        return re.sub(r"(?<![\w.])/results\b", str(self.results), line)

    def tiny(self, line: str) -> str:
        """Move /data and /results into the temp folder and append tiny settings to each invocation."""
        line = self.paths(line)
        extra = {
            "-m preprocess.download": f"--url {self.url}",
            "train.py": f"{TINY_TRAIN} --filters {self.filters}",
            "benchmark.py": f"--train_batches 1 --warmup 0 --filters {self.filters}",
        }

        def add(m: re.Match) -> str:
            for key, flags in extra.items():
                if key in m.group(0):
                    return f"{m.group(0)} {flags}"
            return m.group(0)

        return re.sub(r"python [^;&|#]*?(?=\s*(?:;|&&|\||#|$))", add, line)

    def run(self, line: str, extra: str = "", literal: bool = False) -> str:
        """Run one README line after the activation line (``extra`` is appended after the tiny settings, so
        it wins over them; ``literal``: no tiny settings, only the paths moved)."""
        cmd = f"{self.paths(line) if literal else self.tiny(line)} {extra}".strip()
        out = subprocess.run(["bash", "-c", f"{self.activate} && {cmd}"], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, timeout=900, check=False)
        tail = f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        assert out.returncode == 0, f"README command failed: {cmd}\n{tail}"
        return out.stdout + out.stderr


def block(tag: str) -> list[str]:
    return next(lines for t, lines in bash_blocks() if t == tag)


@pytest.mark.slow
def test_readme_msd_workflow(tmp_path, archive_server):
    """Download → preprocess → train → predict → evaluate → benchmark → pictures, then resume, five folds
    with an ensemble, a custom dataset and the simulated multi-GPU run: every command as the README has it."""
    r = Runner(tmp_path, archive_server)
    outputs = [r.run(line) for line in block("msd")]
    assert (r.data / "Task04_Hippocampus" / "dataset.json").is_file()
    assert not list(r.data.glob("*.tar*")), "the archive and its .part are removed after unpacking"
    assert json.loads((r.data / "04_3d" / "plan.json").read_text())["patch_size"] == [40, 56, 40]
    run0 = r.results / "04_3d_fold0"
    logs = [json.loads(ln) for ln in (run0 / "logs.json").read_text().splitlines()]
    assert [rec["epoch"] for rec in logs] == [1] and "mean_dice" in logs[0]
    preds = sorted((r.results / "preds_fold0").glob("*.nii.gz"))
    assert len(preds) == 2 and len(list((r.results / "preds_fold0").glob("*_overlay.png"))) == 2
    for p in preds:  # masks in the source geometry
        src = nib.load(str(r.data / "Task04_Hippocampus" / "imagesTr" / p.name))
        mask = nib.load(str(p))
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert re.search(r"mean dice \(%\): \d+\.\d+", outputs[6])
    assert "fold 0 of 5: 2 validation cases expected" in outputs[6]  # --fold 0 --data: only those scored
    assert (r.results / "preds_fold0" / "evaluation.json").is_file()
    assert len(list((r.results / "preds_test").glob("*.nii.gz"))) == 2
    assert "img/s" in outputs[8] and (ROOT / "perf.json").exists()
    (ROOT / "perf.json").unlink()
    assert (run0 / "curves.png").is_file()

    # The README's Python example, as written (paths moved like the commands').
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    snippet = r.tiny(snippet) + "\nprint('LABELS', prediction.labels.shape, prediction.labels.dtype)\n"
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, env=r.env, capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    src = nib.load(str(r.data / "Task04_Hippocampus" / "imagesTs" / "hippocampus_002.nii.gz"))
    assert f"LABELS {tuple(src.shape[::-1])} uint8" in out.stdout  # (Z, Y, X) of the (X, Y, Z) NIfTI
    saved = nib.load(str(r.results / "preds_api" / "hippocampus_002.nii.gz"))  # save_prediction's file
    assert saved.shape == src.shape and np.allclose(saved.affine, src.affine)

    r.run(block("resume")[0], extra="--max_epochs 2")
    logs = [json.loads(ln) for ln in (run0 / "logs.json").read_text().splitlines()]
    assert [rec["epoch"] for rec in logs] == [1, 2]

    for line in block("folds"):
        r.run(line)
    assert all((r.results / f"04_3d_fold{f}" / "checkpoints").is_dir() for f in range(5))
    assert len(list((r.results / "preds_ensemble").glob("*.nii.gz"))) == 2

    custom = r.data / "MyDataset"
    (r.data / "Task04_Hippocampus").rename(custom)
    meta = json.loads((custom / "dataset.json").read_text())
    (custom / "dataset.json").write_text(json.dumps(dict(meta, name="MyDataset")))
    lines = block("custom")
    r.run(lines[0])
    plan = json.loads((r.data / "MyDataset_3d" / "plan.json").read_text())
    r.filters = ",".join(str(4 * 2**i) for i in range(len(plan["topology"]["strides"])))
    r.run(lines[1])
    assert (r.results / "mydataset_fold0" / "logs.json").is_file()

    r.filters = "4,8,16,32"
    r.run(block("multigpu")[0])
    settings = json.loads((r.results / "04_3d_8dev" / "config.json").read_text())
    assert settings["devices"] == 8 and settings["global_batch"] == 8


@pytest.mark.slow
def test_readme_cpu_quick_start(tmp_path):
    """The CPU-sized Quick start exactly as written (only /data and /results moved): it finishes, on CPU, and
    leaves what the README says."""
    r = Runner(tmp_path)
    outputs = [r.run(line, literal=True) for line in block("cpu")]
    evaluation = next(out for line, out in zip(block("cpu"), outputs, strict=True) if "evaluate.py" in line)
    mean = re.search(r"mean dice \(%\): (\d+\.\d+)", evaluation)
    assert mean and float(mean.group(1)) > 50, evaluation[-2000:]  # 20 epochs learn the synthetic lesions
    assert re.search(r"mean hd95 \(mm\): \d", evaluation) and re.search(r"mean nsd \(%\): \d", evaluation)
    preds = r.results / "00_preds_fold0"
    scores = json.loads((preds / "evaluation.json").read_text())
    assert scores["n_cases"] == 4 and not scores["not_scored"] and scores["classes"] == ["oedema", "core"]
    assert len(list(preds.glob("*.nii.gz"))) == 4 and len(list(preds.glob("*_overlay.png"))) == 4
    assert len(list((r.results / "00_preds_test").glob("*.nii.gz"))) == 3
    logs = [json.loads(ln) for ln in (r.results / "00_3d_fold0" / "logs.json").read_text().splitlines()]
    assert [rec["epoch"] for rec in logs] == list(range(1, 21))
    assert (r.results / "00_3d_fold0" / "curves.png").is_file()


@pytest.mark.slow
def test_readme_demo_script(tmp_path):
    """The README's first set-up command (the main job) with a small task and one epoch."""
    setup = block("setup")
    assert setup == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    env = user_env(DATA=str(tmp_path / "data"), RESULTS=str(tmp_path / "results"), EPOCHS="1", CASES="6")
    out = subprocess.run(["bash", "-c", setup[0]], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"mean dice \(%\): \d+\.\d+", out.stdout)
    # the whole console output holds no line of absl, Orbax, JAX or XLA's logging
    library = re.compile(r"^[IWEF]\d{4} |^(INFO|WARNING|ERROR):(absl|jax|orbax)|orbax|xla_bridge|"
                         r"Unable to initialize backend|TF_CPP|absl::")
    noise = [ln for ln in (out.stdout + out.stderr).splitlines() if library.search(ln)]
    assert noise == [], noise[:10]
    run = tmp_path / "results" / "00_3d_fold0"
    assert (run / "curves.png").is_file() and list((run / "preds_val").glob("*_overlay.png"))
    assert len(list((run / "preds_test").glob("*.nii.gz"))) == 3
