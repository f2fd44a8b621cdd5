"""medmim study and medmim demo: grids run end to end, resume without redoing, honest numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medmim.cli import main
from medmim.config import load_config
from medmim.errors import MedmimError
from medmim.study import convergence, expand_cells, load_spec, speedup, study_names

TINY = """
name: tiny
data:
  phantom: {labeled: 5, unlabeled: 2, seed: 3, shape: [64, 56, 40], spacing: [6.0, 6.0, 6.0]}
pretrain:
  config: mae-tiny
  overrides: ["data.spacing=[6.0,6.0,6.0]", train.max_steps=2, train.val_every=2, train.preview_every=2,
              data.num_workers=0, data.prepare_workers=1]
finetune:
  config: unetr-tiny
  overrides: ["data.spacing=[6.0,6.0,6.0]", train.max_steps=3, train.val_every=1, train.preview_every=3,
              data.num_workers=0, data.prepare_workers=1]
seeds: [0]
axes:
  - name: method
    values:
      - {label: scratch, pretrain: null}
      - {label: mae, pretrain: [pretrain.method=mae]}
baseline: {method: scratch}
"""


def test_speedup_and_convergence_follow_their_definitions() -> None:
    base = [(10, 0.2), (20, 0.5), (30, 0.6), (40, 0.6)]
    fast = [(10, 0.4), (20, 0.58), (30, 0.7)]
    s = speedup(base, fast)
    assert s.level == pytest.approx(0.57) and s.baseline_step == 30 and s.step == 20
    assert s.speedup == pytest.approx(1.5)
    never = speedup(base, [(10, 0.1), (20, 0.3)])
    assert never.speedup is None and "never reached 0.570" in never.note
    assert convergence([(i, 0.1) for i in range(1, 4)]).converged is False  # too few points to tell
    flat = [(i * 10, 0.5 + 0.001 * i) for i in range(1, 13)]
    rising = [(i * 10, 0.05 * i) for i in range(1, 13)]
    assert convergence(flat).converged and not convergence(rising).converged


def test_curve_numbers_keep_the_keys_results_json_has_always_had() -> None:
    from medmim.study import mean_sd
    from medmim.study.curves import paired_difference

    base = [(10, 0.2), (20, 0.5), (30, 0.6)]
    assert list(speedup(base, [(10, 0.6)]).to_json()) == ["speedup", "level", "baseline_step", "step", "note"]
    assert list(speedup(base, [(10, 0.1)]).to_json()) == ["speedup", "level", "baseline_step", "note"]
    assert speedup([(10, 0.0)], [(10, 0.0)]).to_json() == {"speedup": None, "level": 0.0,
                                                          "note": "baseline never scored above 0"}
    assert speedup([], base).to_json() == {"speedup": None, "note": "no validation curve"}
    assert list(convergence(base).to_json()) == ["rel_change", "converged", "note"]
    assert mean_sd([None, float("nan")]) == (None, None) and mean_sd([0.5]) == (0.5, 0.0)
    m, sd = mean_sd([0.1, 0.3])
    assert m == pytest.approx(0.2) and sd == pytest.approx(0.1414, abs=1e-4)
    assert paired_difference(0.5, 0.25) == 0.25 and paired_difference(None, 0.25) is None


def test_cell_results_are_measured_against_their_same_seed_partners(tmp_path: Path) -> None:
    from medmim.study import CellRun, aggregate, score_cells

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(TINY.replace("seeds: [0]", "seeds: [0, 1]"), encoding="utf-8")
    spec = load_spec(str(spec_file))
    curve = [(i, 0.1 * i) for i in range(1, 4)]

    def run(m: str, s: int, dice: float | None, tail: float = 0.3) -> CellRun:
        return CellRun(cell=f"{m}{s}", group=f"method={m}", values={"method": m}, seed=s, pretrained=None,
                       run_dir="", wall_s=1.0, curve=curve + [(4, tail)],
                       evaluation=None if dice is None else {"mean_dice": dice})

    cells = score_cells(spec, [run("scratch", 0, 0.5), run("mae", 0, 0.6, tail=0.25), run("mae", 1, None)])
    assert "speedup_vs_baseline" not in cells[0].to_json()  # the baseline itself
    mae0, mae1 = cells[1].to_json(), cells[2].to_json()
    assert list(mae0)[-6:] == ["best_val_dice", "last_val_step", "last_val_dice", "speedup_vs_baseline",
                               "paired_delta", "paired_last_delta"]
    assert mae0["paired_delta"] == pytest.approx(0.1) and mae0["speedup_vs_baseline"]["speedup"] == 1.0
    assert (mae0["last_val_step"], mae0["last_val_dice"]) == (4, 0.25)
    assert mae0["paired_last_delta"] == pytest.approx(-0.05)  # its last validation is below scratch's
    assert "paired_delta" not in mae1 and "evaluation" not in mae1  # seed 1 has no scratch run to pair with
    assert mae1["speedup_vs_baseline"] == {"speedup": None, "note": "no partner run"}
    rows = aggregate(cells)
    assert [r.seeds for r in rows] == [1, 2] and "speedup_vs_baseline" not in rows[0].to_json()
    # seed 1's missing partner is not a run that never reached the level: a partial report says which it is
    from medmim.study.report import _speedup_cell

    g = rows[1].speedup_vs["baseline"]
    assert (g.never_reached, g.no_partner, rows[1].paired_n, rows[1].paired_last_n) == (0, 1, 1, 1)
    assert rows[1].last_val_dice == pytest.approx((0.275, 0.0354), abs=1e-4)
    assert rows[1].to_json()["no_partner_vs_baseline"] == 1 and "no_partner_vs_baseline" not in rows[0].to_json()
    assert _speedup_cell(rows[1], "baseline") == "1.00 ± 0.00 (1/2 without a partner run yet)"


def test_shipped_specs_load_and_expand() -> None:
    names = study_names()
    for required in ("demo", "demo-quick"):
        assert required in names
    for n in names:
        spec = load_spec(n)
        cells = expand_cells(spec)
        assert cells and all(c.seed in spec.seeds for c in cells)
    demo = expand_cells(load_spec("demo"))
    assert [c.values["method"] for c in demo] == ["scratch", "mae"]
    assert demo[0].pretrain is None and "pretrain.method=mae" in demo[1].pretrain


def test_summary_says_which_differences_are_inside_the_noise_and_which_runs_are_unfinished(tmp_path: Path) -> None:
    from medmim.study import CellRun, aggregate, score_cells, summary_markdown

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(TINY.replace("seeds: [0]", "seeds: [0, 1, 2]").replace(
        "      - {label: mae, pretrain: [pretrain.method=mae]}",
        "      - {label: mae, pretrain: [pretrain.method=mae]}\n      - {label: simmim, pretrain: [pretrain.method=simmim]}"),
        encoding="utf-8")
    spec = load_spec(str(spec_file))
    flat = [(i * 10, 0.5) for i in range(1, 13)]
    rising = [(i * 10, 0.04 * i) for i in range(1, 13)]
    # held-out Dice per seed: scratch 0.50/0.52/0.48 (sd 0.02); mae 0.60/0.61/0.59 (+0.10, beyond);
    # simmim 0.51/0.45/0.55 (+0.003, inside simmim's own sd 0.05); simmim seed 2 still rising
    dice = {"scratch": [0.50, 0.52, 0.48], "mae": [0.60, 0.61, 0.59], "simmim": [0.51, 0.45, 0.55]}
    runs = [CellRun(cell=f"{m}{s}", group=f"method={m}", values={"method": m}, seed=s, pretrained=None, run_dir="",
                    wall_s=None, curve=rising if (m, s) == ("simmim", 2) else flat,
                    evaluation={"mean_dice": dice[m][s], "mean_hd95": 10.0, "per_class": {}})
            for m in dice for s in range(3)]
    text = summary_markdown(spec, aggregate(score_cells(spec, runs)))
    assert "**Not converged: 1 of 9 runs** (method=simmim (1/3))" in text
    assert "| converged | speed-up vs method=scratch |\n" in text  # the spec names no contrastive run
    # best.pt's Dice beats scratch's, but at the last validation (a score no one picked) there is no difference
    assert ("- method=mae: +0.100 (beyond the spread (0.020); seed by seed: +0.100 ± 0.010 over 3; "
            "at the last validation, seed by seed: +0.000 ± 0.000 over 3)") in text
    assert ("- method=simmim: +0.003 (within the spread (0.050): not a result; seed by seed: +0.003 ± 0.070 over 3; "
            "at the last validation, seed by seed: -0.007 ± 0.012 over 3)") in text
    assert "| best val Dice | last val Dice | converged |" in text
    assert "| method=simmim | 3 | 0.503 ± 0.050 | 10.0 ± 0.0 | 0.493 ± 0.012 | 0.493 ± 0.012 | 2/3 |" in text
    assert "method=scratch: " not in text.split("minus method=scratch")[1]


def test_output_folder_named_like_the_spec_does_not_shadow_it(tmp_path: Path, monkeypatch) -> None:
    # `medmim study phantom-science --out phantom-science` run a second time from the same folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "phantom-science").mkdir()
    (tmp_path / "mae-cpu").mkdir()
    assert load_spec("phantom-science").name == "phantom-science"
    assert load_config("mae-cpu").pretrain.method == "mae"
    with pytest.raises(MedmimError, match="missing.yaml: study spec not found"):
        load_spec("missing.yaml")


def test_bad_spec_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("baseline: {method: scratch}", "baseline: {method: nope}"), encoding="utf-8")
    with pytest.raises(MedmimError, match="baseline names method=nope"):
        load_spec(str(bad))
    bad.write_text(TINY + "\nextra: 1\n", encoding="utf-8")
    with pytest.raises(MedmimError, match="unknown key 'extra'"):
        load_spec(str(bad))


@pytest.mark.parametrize("old, new, message", [
    ("seed: 3,", "seed: 3, seeds: 2,", "unknown key 'data.phantom.seeds' (known: kind, labeled, seed, "),
    ("{label: mae, pretrain:", "{label: mae, pretrian:", "unknown key 'axes[0].values[1].pretrian'"),
    ("  phantom: {", "  phantoms: {", "unknown key 'data.phantoms'"),
    ("pretrain: null}", "pretrain: false}", "'axes[0].values[0].pretrain' must be null (no pretraining)"),
    ("seeds: [0]", "seeds: [0, one]", "'seeds[1]'"),
    ("  config: unetr-tiny\n", "", "missing 'finetune.config'"),
    ("baseline:", "data: {pretrain_extra: [x]}\nbaseline:",  # a later key replaces the first
     "'data' needs 'phantom: {labeled, unlabeled, seed}' or 'path: DIR'"),
])
def test_spec_errors_name_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace(old, new), encoding="utf-8")
    with pytest.raises(MedmimError, match=re.escape(f"{bad}: {message}")):
        load_spec(str(bad))


def test_spec_reads_labels_as_text_and_revalidates_what_is_set(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(TINY.replace("label: mae,", "label: 0.75,").replace("{method: scratch}", "{method: scratch}\n"
                                                                          "evaluate: false"), encoding="utf-8")
    spec = load_spec(str(good))
    assert spec.name == "tiny" and spec.source == str(good) and not spec.evaluate
    assert [c.values["method"] for c in expand_cells(spec)] == ["scratch", "0.75"]
    spec.data = {"path": "/data/btcv"}  # what `medmim study SPEC data.path=DIR` does
    assert spec.data.path == "/data/btcv" and spec.data.phantom is None
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(TINY.replace("name: tiny\n", ""), encoding="utf-8")
    assert load_spec(str(unnamed)).name == "unnamed"


def test_study_runs_end_to_end_and_resumes_without_redoing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY, encoding="utf-8")
    out = tmp_path / "study"
    assert main(["study", str(spec), "--dry-run"]) == 0
    out_text = capsys.readouterr().out
    assert "2 fine-tuning cell(s)" in out_text and "estimated training time on this machine: ~" in out_text
    # the estimate is steps x the timed step: 2 fine-tunings of 3 steps + 1 pretraining of 2 steps at 6 s a step
    import medmim.study.estimate as estimate

    monkeypatch.setattr(estimate, "measure_step_seconds", lambda cfg, repeats=2: 6.0)
    assert main(["study", str(spec), "--dry-run"]) == 0
    assert "~0.8 min (pretraining 0.2 min, fine-tuning 0.6 min" in capsys.readouterr().out
    assert main(["study", str(spec), "--out", str(out)]) == 0
    capsys.readouterr()
    for f in ("summary.md", "cells.csv", "curves.png", "results.json"):
        assert (out / f).is_file()
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    mae = next(c for c in res["cells"] if c["values"]["method"] == "mae")
    assert mae["evaluation"]["cases"] >= 1 and len(mae["curve"]) == 3
    assert "speedup" in mae["speedup_vs_baseline"]
    # a finished study is skipped cell by cell; a removed cell alone is redone
    scratch_done = out / "cells" / "method-scratch_seed0" / "done.json"
    stamp = scratch_done.stat().st_mtime_ns
    import shutil

    assert main(["study", str(spec), "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert f"finished already in {out}: 3 run(s)" in dry and "0 run(s) still to do" in dry
    assert "nothing left to train" in dry and "estimated training time" not in dry
    shutil.rmtree(out / "cells" / "method-mae_seed0")
    # the dry run now estimates the one cell left from the finished cell of the same kind, at its measured pace
    assert main(["study", str(spec), "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    measured = json.loads(scratch_done.read_text(encoding="utf-8"))
    mae_line = next(line for line in dry.splitlines() if line.startswith("- method=mae"))
    assert "pretrain mae (2 steps x" in mae_line and ") finished (" in mae_line and mae_line.endswith("(as measured)")
    assert f"~{3 * measured['wall_s'] / measured['steps'] / 60:.1f} min (as measured)" in mae_line
    assert f"finished already in {out}: 2 run(s)" in dry and "1 run(s) still to do" in dry and "timed:" not in dry
    # --report-only: tables from the finished cells alone, nothing trained
    assert main(["study", str(spec), "--out", str(out), "--report-only"]) == 0
    log = capsys.readouterr().out
    assert "report on 1 of 2 cell(s) finished so far" in log and "steps\n" not in log
    assert "| method=scratch | 1 |" in log and "| method=mae |" not in log
    assert not (out / "cells" / "method-mae_seed0").exists()
    assert main(["study", str(spec), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[finetune] method-scratch_seed0: finished before, skipped" in log
    assert "[pretrain] mae-" in log and "finished before, skipped" in log.split("[pretrain] mae-")[1].splitlines()[0]
    assert "[finetune] method-mae_seed0: 3 steps" in log
    assert scratch_done.stat().st_mtime_ns == stamp


def test_demo_quick_writes_the_whole_report(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEDMIM_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    report = (tmp_path / "demo" / "report.md").read_text(encoding="utf-8")
    for needle in ("## Held-out segmentation", "![held-out case](heldout.png)", "| method=scratch |", "| method=mae |",
                   "| organ | scratch Dice | mae Dice | scratch HD95 (mm) | mae HD95 (mm) |", "| liver |", "mean HD95",
                   "## Convergence speed-up", "curves.png", "## Did the runs converge?", "Not converged: 2 of 2 runs",
                   "they describe this demo's runs", "**One seed.**", "phantom-science-v2",
                   "| mae (mae) | 4 |", "recon_mae.png", "## Wall time of each stage"):
        assert needle in report, needle
    for png in ("heldout.png", "curves.png", "recon_mae.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 5000
    capsys.readouterr()
    # a second run resumes: nothing is trained again
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    log = capsys.readouterr().out
    assert not re.search(r"^\[(pretrain|finetune)\] .*: \d+ steps$", log, re.M)  # no run started again
    assert "[pretext]" not in log
    assert log.count("finished before, skipped") == 3  # 1 pretraining + 2 fine-tuning runs


def test_pretraining_reads_extra_datasets_each_with_its_own_preset(tmp_path: Path, capsys, monkeypatch) -> None:
    """data.pretrain_extra (and data.samples, which adds the real scans) reach pretraining, not fine-tuning."""
    import yaml

    from medmim.data.sampling import open_cache
    from tests.conftest import write_msd

    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    mri = write_msd(tmp_path / "mri", n_labeled=2, n_unlabeled=1, shape=(24, 22, 20))
    desc = json.loads((mri / "dataset.json").read_text(encoding="utf-8"))
    desc["modality"] = {"0": "T1"}
    (mri / "dataset.json").write_text(json.dumps(desc), encoding="utf-8")
    raw = yaml.safe_load(TINY)
    raw["data"]["pretrain_extra"] = [str(mri)]
    raw["axes"][0]["values"] = raw["axes"][0]["values"][1:]  # mae only
    raw.pop("baseline")
    spec = tmp_path / "extra.yaml"
    spec.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(out)]) == 0, capsys.readouterr().err
    pre = yaml.safe_load(next((out / "pretrain").glob("*/config.yaml")).read_text(encoding="utf-8"))
    assert len(pre["data"]["path"]) == 2 and pre["data"]["path"][1] == str(mri)
    ft_run = next((out / "cells").glob("*/config.yaml")).parent
    ft = yaml.safe_load((ft_run / "config.yaml").read_text(encoding="utf-8"))
    assert len(ft["data"]["path"]) == 1  # fine-tuning reads the phantoms alone
    # the preprocessing its data had, recorded beside the config: the CT preset, as predict will apply
    assert json.loads((ft_run / "data.json").read_text(encoding="utf-8"))["preprocessing"]["modality"] == "ct"
    presets = sorted(open_cache(p).manifest["settings"]["modality"] for p in (out / "cache").iterdir()
                     if (p / "manifest.json").is_file())
    assert "mri" in presets
    bad = dict(raw, data={**raw["data"], "samples": "yes"})
    spec.write_text(yaml.safe_dump(bad), encoding="utf-8")
    assert main(["study", str(spec), "--dry-run"]) == 2


DIAGNOSED = TINY.replace("train.max_steps=2, train.val_every=2,", 'train.max_steps=2, "train.keep_checkpoints=[1]", train.val_every=2,') + """
diagnostics:
  reliance: true
  pretext: true
  probe: {encoders: [random, mae, mae@1], seeds: [0], overrides: [train.max_steps=2]}
"""


def test_study_diagnostics_say_why_and_are_not_measured_twice(tmp_path: Path, capsys, monkeypatch) -> None:
    """ViT reliance for every cell, the probe on each named encoder (a kept step included) and the pretext table
    at each kept checkpoint land in results.json and summary.md; a second run measures none of them again."""
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    spec = tmp_path / "diag.yaml"
    spec.write_text(DIAGNOSED, encoding="utf-8")
    out = tmp_path / "study"
    assert main(["study", str(spec), "--out", str(out)]) == 0
    capsys.readouterr()
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    diag = res["diagnostics"]
    assert set(diag["reliance"]) == {"method-scratch_seed0", "method-mae_seed0"}
    for cell in res["cells"]:
        rel = diag["reliance"][cell["cell"]]
        assert rel["mean_dice"] == cell["evaluation"]["mean_dice"]
        assert rel["drop"] == pytest.approx(rel["mean_dice"] - rel["mean_dice_vit_averaged"])
    probes = {p["encoder"]: p for p in diag["probe"]}
    assert set(probes) == {"random", "mae", "mae@1"} and all(p["steps"] == 2 for p in probes.values())
    assert probes["random"]["checkpoint"] is None
    assert probes["mae@1"]["checkpoint"].endswith("step_000001.pt") and probes["mae"]["checkpoint"].endswith(".safetensors")
    probe_cfg = load_config(str(out / "probe" / "mae-step1_seed0" / "config.yaml"))
    assert probe_cfg.model.head == "probe" and probe_cfg.model.pretrained.endswith("step_000001.pt")
    assert all(p["norm"] == "batchnorm" for p in probes.values())
    assert [p["step"] for p in diag["pretext"]] == [1, 2]  # the kept step, then the final weights
    assert all(p["pretraining"] == "mae (mae)" and p["model_mse"] > 0 for p in diag["pretext"])
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for title in ("### ViT reliance", "### Frozen-encoder probe", "### Pretext check"):
        assert title in summary
    assert "| mae@1 | 1 |" in summary and "| mae (mae) | 1 |" in summary
    assert "tokens standardised per channel" in summary
    assert main(["study", str(spec), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[reliance]" not in log and "[pretext]" not in log and "[probe]" not in log
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["diagnostics"] == diag


def test_reliance_notes_say_how_much_of_the_baseline_rests_on_the_vit() -> None:
    from medmim.study import CellRun
    from medmim.study.diagnostics import Diagnostics, reliance_markdown

    def run(cell: str, labels: str) -> CellRun:
        return CellRun(cell=cell, group=f"labels={labels}, method=scratch",
                       values={"labels": labels, "method": "scratch"}, seed=0, pretrained=None, run_dir="",
                       wall_s=1.0, curve=[])

    rel = {"a": {"mean_dice": 0.20, "mean_dice_vit_averaged": 0.01, "drop": 0.19},  # rests on the ViT
           "b": {"mean_dice": 0.30, "mean_dice_vit_averaged": 0.299, "drop": 0.001}}  # does not
    lines = reliance_markdown([run("a", "4"), run("b", "1")], Diagnostics(reliance=rel), {"method": "scratch"})
    text = "\n".join(lines)
    assert "- labels=4, method=scratch loses 0.190 of its 0.200 (95%) without the ViT's features: the ViT" in text
    assert "- labels=1, method=scratch loses +0.001 without the ViT's features: its segmentation does not" in text


def test_probe_encoders_must_name_a_pretraining(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(DIAGNOSED.replace("[random, mae, mae@1]", "[random, scratch]"), encoding="utf-8")
    with pytest.raises(MedmimError, match=r"diagnostics.probe.encoders\[1\] is 'scratch'"):
        load_spec(str(spec))


def test_excluded_combinations_are_not_run_and_have_no_partner(tmp_path: Path) -> None:
    from medmim.study import CellRun, score_cells

    grid = TINY.replace("seeds: [0]", "seeds: [0]\nexclude: [{labels: '1', method: mae}]").replace(
        "axes:\n", "axes:\n  - name: labels\n    values: [{label: '4'}, {label: '1'}]\n")
    spec_file = tmp_path / "g.yaml"
    spec_file.write_text(grid.replace("baseline: {method: scratch}", "baseline: {method: scratch}\ncontrastive: {method: mae}"),
                         encoding="utf-8")
    spec = load_spec(str(spec_file))
    cells = expand_cells(spec)
    assert [c.values for c in cells] == [{"labels": "4", "method": "scratch"}, {"labels": "4", "method": "mae"},
                                         {"labels": "1", "method": "scratch"}]
    runs = [CellRun(cell=c.slug, group=c.group, values=c.values, seed=0, pretrained=None, run_dir="", wall_s=1.0,
                    curve=[(1, 0.1), (2, 0.2)]) for c in cells]
    scored = score_cells(spec, runs)
    assert "contrastive" in scored[0].speedup_vs and "contrastive" not in scored[2].speedup_vs
    bad = tmp_path / "b.yaml"
    bad.write_text(grid.replace("method: mae}]", "method: nope}]"), encoding="utf-8")
    with pytest.raises(MedmimError, match=r"exclude\[0\] names method=nope"):
        load_spec(str(bad))


def _study_state_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "study_state.py"
    spec = importlib.util.spec_from_file_location("study_state", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_study_carried_without_its_checkpoints_resumes_with_nothing_trained_again(tmp_path: Path, capsys,
                                                                                      monkeypatch) -> None:
    """benchmarks/study_state.py keeps a finished study's small files and pretrained weights, not its checkpoints,
    data or cache; restored onto a machine without the study folder, the study trains and measures nothing again
    and reports the same numbers."""
    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    spec = tmp_path / "diag.yaml"
    spec.write_text(DIAGNOSED, encoding="utf-8")
    out, state = tmp_path / "study", tmp_path / "state"
    assert main(["study", str(spec), "--out", str(out)]) == 0
    before = json.loads((out / "results.json").read_text(encoding="utf-8"))
    st = _study_state_module()
    assert st.main(["save", str(out), str(state)]) == 0
    kept = sorted(p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file())
    assert "pretrain/" + next((out / "pretrain").iterdir()).name + "/model.safetensors" in kept
    assert not [k for k in kept if k.endswith(".pt") or "/checkpoints/" in k or k.startswith(("phantom", "cache"))]
    assert any(k.endswith("/reliance.json") for k in kept) and any(k.startswith("probe/") for k in kept)
    assert "data.sha256" in kept
    import shutil

    shutil.rmtree(out)
    capsys.readouterr()
    assert st.main(["restore", str(state), str(out)]) == 0
    assert st.main(["verify", str(state), str(out)]) == 2  # the data is not written yet
    assert st.main(["restore", str(state), str(out)]) == 0 and "0 file(s) copied" in capsys.readouterr().out
    assert main(["study", str(spec), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert not re.search(r"\] \S+: \d+ steps", log)  # no "[stage] run: N steps" line: nothing trained
    assert "[reliance]" not in log and "[pretext]" not in log and "[probe]" not in log
    assert st.main(["verify", str(state), str(out)]) == 0  # written again, byte for byte
    after = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert after["diagnostics"] == before["diagnostics"]
    assert [c["evaluation"] for c in after["cells"]] == [c["evaluation"] for c in before["cells"]]
    assert st.main(["save", str(tmp_path / "nope"), str(state)]) == 2


def test_study_tasks_run_a_piece_of_a_study_that_the_study_then_finds_finished(tmp_path: Path, capsys,
                                                                               monkeypatch) -> None:
    """benchmarks/study_tasks.py runs chosen runs of a study in its own folders: afterwards `medmim study` trains
    only the others; a task the study does not have is refused with exit status 2 before anything is written."""
    import runpy

    monkeypatch.setenv("MEDMIM_NO_PROGRESS", "1")
    spec = tmp_path / "diag.yaml"
    spec.write_text(DIAGNOSED, encoding="utf-8")
    out = tmp_path / "study"
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "study_tasks.py")
    tasks = runpy.run_path(script)["main"]
    with pytest.raises(MedmimError, match="cell:method-nope_seed0: not a task"):
        tasks([str(spec), str(out), "cell:method-nope_seed0"])
    assert not out.exists()
    assert tasks([str(spec), str(out), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["pretrain:mae", "cell:method-scratch_seed0", "cell:method-mae_seed0",
                                               "probe:random:0", "probe:mae:0", "probe:mae@1:0"]
    assert tasks([str(spec), str(out), "cell:method-mae_seed0", "probe:mae@1:0"]) == 0
    assert (out / "cells" / "method-mae_seed0" / "reliance.json").is_file()
    capsys.readouterr()
    assert main(["study", str(spec), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    trained = re.findall(r"\[(\w+)\] (\S+): \d+ steps", log)
    assert trained == [("finetune", "method-scratch_seed0"), ("probe", "random_seed0"), ("probe", "mae_seed0")]


def test_a_probe_run_from_before_probe_norm_is_reported_as_raw(tmp_path: Path) -> None:
    """A finished probe whose config predates model.probe_norm fed its head raw tokens, and says so."""
    from medmim.study.diagnostics import _probe_norm

    (tmp_path / "config.yaml").write_text("task: finetune\nmodel:\n  head: probe\n", encoding="utf-8")
    assert _probe_norm(tmp_path) == "none"
    (tmp_path / "config.yaml").write_text("model:\n  head: probe\n  probe_norm: batchnorm\n", encoding="utf-8")
    assert _probe_norm(tmp_path) == "batchnorm"
