"""medmim's text never depends on the process locale.

A process can run with an ASCII locale for many reasons: a ``C`` locale on a cluster node, or a library
that calls ``setlocale`` (SimpleITK's DICOM writer does). Each test here switches the C locale to ``C``
on purpose, checks that Python then really would decode as ASCII, and runs a path a user meets.
"""

from __future__ import annotations

import csv
import json
import locale
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from medmim.cli import main
from medmim.data import samples
from medmim.data.io import read_image, write_nifti
from medmim.errors import MedmimError

from tests.conftest import write_msd

# German organ names: non-ASCII on purpose
LABELS_DE = {"0": "Hintergrund", "1": "Milz", "2": "rechte Niere", "3": "Bauchspeicheldrüse"}


@pytest.fixture
def ascii_locale():
    saved = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_ALL, "C")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EncodingWarning)  # the question asked is the one subprocess asks
            enc = locale.getpreferredencoding(False)
        if sys.flags.utf8_mode or "ascii" not in enc.lower().replace("_", "") and "646" not in enc \
                and enc.upper() != "ANSI_X3.4-1968":
            pytest.skip(f"the C locale does not make Python decode as ASCII here ({enc})")
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


FAKE_PIP = r'''
import shutil, sys
args = sys.argv[1:]
# what pip prints: progress bars, quotes and ellipses in UTF-8, whatever the reader's locale
sys.stdout.buffer.write("Collecting pyradiomics==3.0.1\n  Downloading pyradiomics-3.0.1.tar.gz \u2501\u2501\u2501 34.5 MB\n"
                        "Saved \u2018pyradiomics-3.0.1.tar.gz\u2019 \u2026 fertig, gr\u00fc\u00dfe\n".encode("utf-8"))
sys.stdout.buffer.write(b"invalid UTF-8 too: \xff\xfe\n")
if "--fail" in open(sys.argv[0] + ".mode").read():
    sys.stderr.buffer.write("ERROR: Verbindung fehlgeschlagen \u2014 keine Distribution gefunden\n".encode("utf-8"))
    sys.exit(1)
dest = args[args.index("--dest") + 1]
shutil.copy(open(sys.argv[0] + ".src").read().strip(), dest)
'''


def _fake_pip(tmp_path: Path, monkeypatch, fail: bool) -> None:
    """``pip_command`` now runs a real subprocess that prints non-ASCII UTF-8 as pip does."""
    root = tmp_path / "pyradiomics-3.0.1"
    (root / "data").mkdir(parents=True)
    (root / "data" / "README.md").write_text("x\n", encoding="utf-8")
    archive = tmp_path / "pyradiomics-3.0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(root, arcname="pyradiomics-3.0.1")
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP, encoding="utf-8")
    Path(str(script) + ".src").write_text(str(archive), encoding="utf-8")
    Path(str(script) + ".mode").write_text("--fail" if fail else "", encoding="utf-8")
    monkeypatch.setattr(samples, "pip_command",
                        lambda pkg, dest: [sys.executable, str(script), "download", "--dest", str(dest), pkg.requirement])


def test_fetching_an_archive_reads_pip_output_as_utf8(ascii_locale, tmp_path: Path, monkeypatch) -> None:
    _fake_pip(tmp_path, monkeypatch, fail=False)
    got = samples.fetch_archive(samples.PACKAGES["pyradiomics"], tmp_path / "cache", log=lambda s: None)
    assert got == tmp_path / "cache" / "downloads" / "pyradiomics-3.0.1.tar.gz" and got.is_file()


def test_a_failed_fetch_quotes_pip_in_its_own_words(ascii_locale, tmp_path: Path, monkeypatch) -> None:
    _fake_pip(tmp_path, monkeypatch, fail=True)
    with pytest.raises(MedmimError, match="pyradiomics==3.0.1: pip download failed "
                                          r"\(ERROR: Verbindung fehlgeschlagen — keine Distribution gefunden\)"):
        samples.fetch_archive(samples.PACKAGES["pyradiomics"], tmp_path / "cache", log=lambda s: None)
    assert not any((tmp_path / "cache" / "downloads").iterdir())  # nothing half-written left behind


def test_config_show_reads_a_utf8_config(ascii_locale, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "leber.yaml"
    cfg.write_text("# Abdomen-CT, 1.5 × 1.5 × 2 mm (Leber und Milz)\nbase: mae-cpu\nrun:\n  name: leber-milz-größe\n",
                   encoding="utf-8")
    assert main(["config", "show", str(cfg)]) == 0
    assert "leber-milz-größe" in capsys.readouterr().out


def test_data_check_summarises_a_dataset_with_utf8_names(ascii_locale, tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=2, n_unlabeled=1)
    desc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    desc.update(name="Bauchraum", description="Phantome — Milz, Nieren, Bauchspeicheldrüse", labels=LABELS_DE)
    (root / "dataset.json").write_text(json.dumps(desc, ensure_ascii=False), encoding="utf-8")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "Bauchspeicheldrüse" in out and "passed all checks" in out


def test_reports_are_written_as_utf8(ascii_locale, tmp_path: Path, capsys) -> None:
    root = write_msd(tmp_path / "ds", n_labeled=1, n_unlabeled=0, shape=(16, 14, 12))
    desc = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    desc["labels"] = LABELS_DE
    (root / "dataset.json").write_text(json.dumps(desc, ensure_ascii=False), encoding="utf-8")
    gt = read_image(root / "labelsTr" / "case_000.nii.gz")
    write_nifti(tmp_path / "preds" / "case_000.nii.gz", gt.array, gt.affine)
    assert main(["evaluate", "--predictions", str(tmp_path / "preds"), "--data", str(root), "--split", "all",
                 "--out", str(tmp_path / "ev")]) == 0
    with open(tmp_path / "ev" / "metrics.csv", encoding="utf-8", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(rows["Bauchspeicheldrüse"]["dice"]) == pytest.approx(1.0)
    assert "| 3 | Bauchspeicheldrüse | 1.0000 |" in (tmp_path / "ev" / "metrics.md").read_text(encoding="utf-8")
