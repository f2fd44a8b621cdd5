"""The ``medmim`` command: a thin shell that parses, calls one function per verb, and turns errors into exit codes.

Exit status: 0 success; 2 bad input or usage (one line naming the file or setting); 1 internal error.
Set ``MEDMIM_DEBUG=1`` to see the traceback of an internal error.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import click

from medmim import __version__
from medmim.errors import MedmimError


def _echo_err(msg: str) -> None:
    click.echo(f"medmim: error: {msg}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="medmim")
def cli() -> None:
    """medmim: masked image modeling (MAE, SimMIM) pretraining of 3D medical images and UNETR fine-tuning.

    Stages: `data` (check, phantom, prepare, split, samples), `pretrain`, `finetune`, `predict`, `evaluate`, `evaluate-recon`, `export`; `demo` and `study` run the paper's experiments; `config` (list, show).
    """


# --- data ------------------------------------------------------------------------------------

@cli.group()
def data() -> None:
    """Datasets: check them, make synthetic phantoms, prepare a cache, write splits."""


@data.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="Print problems only, no summary.")
def data_check(path: Path, quiet: bool) -> None:
    """Validate a dataset before training: a Decathlon or nnU-Net folder, its dataset.json,
    a JSON datalist, a folder of BraTS case folders, or a plain folder of images.

    Reports every problem, each naming its file; exits 2 if there is any.
    """
    from medmim.data.check import check_dataset

    def progress(case_id: str, n: int, total: int) -> None:
        if not quiet and sys.stderr.isatty():
            click.echo(f"\rchecking {n + 1}/{total} {case_id[:40]:<40s}", err=True, nl=False)

    report = check_dataset(path, progress=progress)
    if not quiet and sys.stderr.isatty():
        click.echo("\r" + " " * 60 + "\r", err=True, nl=False)
    if report.problems:
        for p in report.problems:
            click.echo(f"medmim: error: {p}", err=True)
        files = len({p.path for p in report.problems})
        click.echo(f"medmim: {len(report.problems)} problem(s) in {files} file(s) of {path}", err=True)
        sys.exit(2)
    if not quiet:
        click.echo(report.summary())
    click.echo(f"ok: {path} passed all checks")


@data.command("phantom")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["abdomen", "brain"]), default="abdomen", show_default=True,
              help="abdomen: contrast CT, BTCV's 13 organs; brain: MRI (T1, T1ce, T2, FLAIR), BraTS tumour labels.")
@click.option("--labeled", type=int, default=20, show_default=True, help="Cases with organ labels (imagesTr/labelsTr).")
@click.option("--unlabeled", type=int, default=40, show_default=True, help="Image-only cases for pretraining (imagesTs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes (on one machine; see the README).")
@click.option("--shape", type=(int, int, int), default=None, help="Voxels along i j k (default: the phantom's own).")
@click.option("--spacing", type=(float, float, float), default=None, help="Voxel size in mm along i j k.")
def data_phantom(out_dir: Path, kind: str, labeled: int, unlabeled: int, seed: int, shape, spacing) -> None:
    """Write a synthetic dataset in Decathlon format to OUT_DIR: abdominal CT (BTCV's 13 organs,
    the default) or, with --kind brain, brain MRI with a glioma (BraTS labels)."""
    if kind == "brain":
        from medmim.data import phantom_brain

        write = phantom_brain.write_brain_phantom_dataset
    else:
        from medmim.data import phantom

        write = phantom.write_phantom_dataset
    kw = {}
    if shape is not None:
        kw["shape"] = tuple(shape)
    if spacing is not None:
        kw["spacing"] = tuple(spacing)
    t0 = time.perf_counter()
    write(out_dir, labeled=labeled, unlabeled=unlabeled, seed=seed, progress=True, **kw)
    dt = time.perf_counter() - t0
    n = labeled + unlabeled
    what = "brain phantom" if kind == "brain" else "phantom"
    click.echo(f"wrote {n} {what} cases ({labeled} labeled, {unlabeled} unlabeled) to {out_dir} "
               f"in {dt:.1f} s ({dt / max(n, 1):.2f} s per case)")


@data.command("prepare", context_settings={"ignore_unknown_options": True})
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Cache folder to write.")
@click.option("--config", "source", default=None, help="Preset or YAML whose data settings to use (default: the paper's CT settings).")
@click.option("--workers", type=click.IntRange(min=1), default=min(4, os.cpu_count() or 1), show_default=True,
              help="Cases prepared in parallel processes.")
@click.argument("overrides", nargs=-1)
def data_prepare(dataset: Path, out: Path, source: str | None, workers: int, overrides: tuple[str, ...]) -> None:
    """Preprocess DATASET once into a memory-mappable cache: RAS, target spacing, intensity
    normalisation, foreground crop. OVERRIDES are key=value config settings (data.spacing=[1.5,1.5,2]).

    Re-running skips cases already prepared with the same settings. Exits 2 if any case failed.
    """
    from medmim.config import load_config
    from medmim.data.prepare import PrepareSettings, prepare_dataset

    cfg = load_config(source, overrides)
    settings = PrepareSettings.from_config(cfg.data, dataset)  # data.modality=auto: the dataset's own
    click.echo(f"preparing {dataset} -> {out}: {settings.modality.upper()}, spacing {list(settings.spacing)} mm"
               + (f", HU window {list(settings.hu_window)}" if settings.modality == "ct" else ", z-score") + f", {workers} worker(s)")
    res = prepare_dataset(dataset, out, settings, workers=workers, num_folds=cfg.data.num_folds, seed=cfg.train.seed,
                          log=click.echo)
    click.echo(f"{len(res.done)} prepared, {len(res.skipped)} up to date, {len(res.failed)} failed in {res.seconds:.1f} s")
    if res.failed:
        names = ", ".join(sorted(res.failed)[:5]) + (" ..." if len(res.failed) > 5 else "")
        raise MedmimError(f"{len(res.failed)} case(s) of {dataset} failed to prepare: {names} (see the lines above)")


@data.command("samples")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where fetched packages are kept (default $MEDMIM_CACHE/samples or ~/.cache/medmim/samples).")
def data_samples(out_dir: Path, cache_dir: Path | None) -> None:
    """Build Decathlon folders of openly licensed real CT and MRI scans shipped inside packages
    (pyradiomics, nilearn, TotalSegmentator), fetched with `pip download` (nothing is installed).

    Writes OUT_DIR/ct, OUT_DIR/mri and OUT_DIR/mri-tissue, each with dataset.json and SOURCES.md.
    """
    from medmim.data.samples import write_samples

    res = write_samples(out_dir, cache_dir, log=click.echo)
    for name, d in res["datasets"].items():
        click.echo(f"{name}: {d['labeled']} labeled, {d['unlabeled']} unlabeled -> {d['path']}")


@data.command("split")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data_split(path: Path, folds: int, seed: int) -> None:
    """Write (or show, if it exists) splits_final.json beside a dataset: K folds of labeled cases."""
    from medmim.data.datasets import get_split, load_dataset, splits_path

    ds = load_dataset(path)
    train, val = get_split(ds, 0, folds, seed)
    where = "the datalist's own validation list" if ds.fixed_val is not None else str(splits_path(ds))
    click.echo(f"{len(ds.labeled)} labeled cases; fold 0: {len(train)} train, {len(val)} val ({where})")


# --- training ------------------------------------------------------------------------------

def _train(task: str, source: str, overrides: tuple[str, ...]) -> None:
    from medmim.config import load_config
    from medmim.train.engine import run_training

    cfg = load_config(source, overrides)
    if cfg.task != task:
        other = "finetune" if task == "pretrain" else "pretrain"
        raise MedmimError(f"{source} is a {cfg.task} config: run `medmim {other} {source}` or set task={task}")
    summary = run_training(cfg, log=lambda s: click.echo(s, err=True))
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"done: {summary['steps']} steps in {summary['seconds']:.1f} s "
                   f"({summary['s_per_step']:.3f} s/step); run folder {summary['run_dir']}")


@cli.command("pretrain", context_settings={"ignore_unknown_options": True})
@click.argument("source", metavar="CONFIG")
@click.argument("overrides", nargs=-1)
def pretrain(source: str, overrides: tuple[str, ...]) -> None:
    """Pretrain a ViT by MAE, SimMIM or SimCLR (pretrain.method). CONFIG is a preset (`medmim config list`)
    or a YAML file; OVERRIDES are key=value, e.g. data.path=DIR run.dir=DIR train.max_steps=100 resume=auto.

    Runs under torchrun for several GPUs or machines: torchrun --nproc_per_node=N -m medmim pretrain ...
    """
    _train("pretrain", source, overrides)


@cli.command("finetune", context_settings={"ignore_unknown_options": True})
@click.argument("source", metavar="CONFIG")
@click.argument("overrides", nargs=-1)
def finetune(source: str, overrides: tuple[str, ...]) -> None:
    """Fine-tune UNETR for segmentation, from scratch or from model.pretrained=CHECKPOINT (a medmim
    checkpoint or a MONAI state dict). OVERRIDES are key=value, as for pretrain.
    """
    _train("finetune", source, overrides)


# --- inference and evaluation -----------------------------------------------------------------

def _predict_options(f):
    opts = [
        click.option("--sw-batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per forward pass."),
        click.option("--overlap", type=click.FloatRange(0.0, 0.95), default=0.25, show_default=True,
                     help="Sliding-window overlap (0.5: smoother blend, ~1.6x the windows)."),
        click.option("--tta", is_flag=True, help="Average over mirrored copies (left-right labels swapped back)."),
        click.option("--lcc", is_flag=True, help="Keep each organ's largest connected component."),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--stitch-device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Where windows are blended (cpu saves GPU memory on large scans)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _options(sw_batch_size, overlap, tta, lcc, precision, device, stitch_device):
    from medmim.eval.inference import PredictOptions

    return PredictOptions(sw_batch_size=sw_batch_size, overlap=overlap, tta=tta, lcc=lcc, precision=precision,
                          device=device, stitch_device=stitch_device)


@cli.command("predict")
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path), help="A fine-tuned UNETR checkpoint.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder for CASE.nii.gz label maps.")
@click.option("--probabilities", is_flag=True,
              help="Also write CASE_probabilities.nii.gz: each class's (or BraTS region's) probability, 4D.")
@click.argument("inputs", nargs=-1, required=True)
@_predict_options
def predict(checkpoint: Path, out: Path, probabilities: bool, inputs: tuple[str, ...], **kw) -> None:
    """Segment INPUTS (image files, DICOM series folders, or datasets) in their original geometry.

    The preprocessing is the one the model was trained with (read from the checkpoint); each written
    label map has its scan's shape and affine (a BraTS region model writes BraTS labels 0/1/2/4). A case
    that fails is reported and the rest go on.
    """
    from medmim.eval.evaluate import cases_from_inputs, predict_cases
    from medmim.eval.inference import Predictor

    predictor = Predictor.from_checkpoint(checkpoint, _options(**kw))
    cases = cases_from_inputs(list(inputs))
    failed = predict_cases(predictor, cases, out, log=click.echo, probabilities=probabilities)
    click.echo(f"{len(cases) - len(failed)} of {len(cases)} case(s) written to {out}")
    if failed:
        raise MedmimError(f"{len(failed)} case(s) failed: {', '.join(sorted(failed)[:5])}")


@cli.command("evaluate")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None, help="A fine-tuned UNETR checkpoint.")
@click.option("--predictions", type=click.Path(path_type=Path), default=None, help="Or: a folder of CASE.nii.gz predictions.")
@click.option("--data", "-d", required=True, type=click.Path(path_type=Path), help="The labeled dataset.")
@click.option("--split", type=click.Choice(["val", "all"]), default="val", show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--vit-reliance", is_flag=True,
              help="Also predict each case with the ViT's features averaged over each window's tokens; report "
                   "the Dice drop (how much the ViT carries) in reliance.json and metrics.md.")
@click.option("--vit-features", type=click.Choice(["as-is", "mean"]), default="as-is", show_default=True,
              help="mean: replace every feature UNETR takes from its ViT by its mean over the window's tokens.")
@click.option("--regions", type=click.Choice(["brats"]), default=None,
              help="Score BraTS's tumour regions (TC, WT, ET) of 0/1/2/4 label maps (automatic for a BraTS region "
                   "checkpoint).")
@_predict_options
def evaluate_cmd(checkpoint, predictions, data, split, out, vit_reliance, vit_features, regions, **kw) -> None:
    """Dice and HD95 (mm) per case and class, in the original geometry; writes metrics.csv, metrics.md
    and overlay PNGs to OUT (with --vit-reliance also reliance.json).
    """
    from medmim.eval.evaluate import evaluate

    ev = evaluate(data, out, checkpoint=str(checkpoint) if checkpoint else None,
                  predictions=str(predictions) if predictions else None, split=split, options=_options(**kw),
                  log=click.echo, vit_features=vit_features, vit_reliance=vit_reliance, regions=regions)
    md = ev.mean_dice()
    hd = ev.mean_hd95()
    click.echo(f"mean Dice {md:.4f}" if md is not None else "mean Dice: no class scored", nl=False)
    click.echo(f", mean HD95 {hd:.2f} mm" if hd is not None else "")
    if vit_reliance:
        from medmim.fileio import read_json

        rel = read_json(out / "reliance.json")
        fmt = lambda v: "—" if v is None else f"{v:.4f}"
        click.echo(f"ViT reliance: mean Dice {fmt(rel['mean_dice'])} as-is, {fmt(rel['mean_dice_vit_averaged'])} "
                   f"with the ViT's features averaged over each window's tokens (drop {fmt(rel['drop'])})")
    wrote = [out / "metrics.csv", out / "metrics.md"] + ([out / "reliance.json"] if vit_reliance else [])
    click.echo(f"wrote {', '.join(map(str, wrote[:-1]))} and {wrote[-1]}")


@cli.command("evaluate-recon")
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="A MAE or SimMIM pretraining checkpoint: RUN/model.safetensors or RUN/checkpoints/last.pt.")
@click.option("--data", "-d", "data_paths", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A dataset or prepared cache (repeat for several); prepared with the checkpoint's settings.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder for recon.md, recon.csv, recon.png.")
@click.option("--crops-per-case", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Crops and masks (the same for every method).")
@click.option("--max-cases", type=click.IntRange(min=1), default=None, help="Score at most this many cases.")
@click.option("--split", type=click.Choice(["val", "all"]), default="val", show_default=True,
              help="val: the cases pretraining held out; all: every case (for data the model never saw).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def evaluate_recon(checkpoint: Path, data_paths: tuple[Path, ...], out: Path, crops_per_case: int, seed: int,
                   max_cases: int | None, split: str, device: str) -> None:
    """Masked-voxel reconstruction error of a pretrained MAE/SimMIM on held-out crops, against two baselines
    that learn nothing (the mean of the visible voxels; trilinear interpolation of visible patches):
    whether pretraining learned anatomy rather than averages. Writes recon.md and recon.csv to OUT.
    """
    from medmim.eval.recon import LABELS, reconstruction_report

    res = reconstruction_report(checkpoint, list(data_paths), out, crops_per_case=crops_per_case, seed=seed,
                                max_cases=max_cases, split=split, device=device, log=click.echo)
    for name, s in res["methods"].items():
        click.echo(f"{LABELS[name]:<46s} MAE {s['mae']:.4g}  MSE {s['mse']:.4g}  "
                   f"({s['mae_ratio']:.2f}x / {s['mse_ratio']:.2f}x the visible mean)")
    click.echo(res["verdict"])
    click.echo(f"wrote {out / 'recon.md'} and {out / 'recon.csv'}")


@cli.command("export")
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path), help="A medmim checkpoint (.pt or .safetensors).")
@click.option("--format", "fmt", type=click.Choice(["monai", "model_swinvit", "safetensors"]), required=True,
              help="monai: the encoder as a state dict for monai.networks.nets.ViT / UNETR.vit (a Swin: for "
                   "SwinUNETR.swinViT); model_swinvit: a Swin encoder in the layout of MONAI's self-supervised Swin "
                   "UNETR weights, for SwinUNETR.load_from; safetensors: all weights with their config.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path))
def export(checkpoint: Path, fmt: str, out: Path) -> None:
    """Write a checkpoint's weights for use elsewhere."""
    import torch

    from medmim.fileio import atomic_write
    from medmim.models.transfer import encoder_to_monai_vit, read_checkpoint, save_weights

    ckpt = read_checkpoint(checkpoint)
    if fmt == "safetensors":
        save_weights(out, ckpt.state, config=ckpt.config, data=ckpt.data)
        click.echo(f"wrote {len(ckpt.state)} tensors and the config to {out}")
        return
    m = (ckpt.config or {}).get("model")
    swin = (m or {}).get("backbone") == "swin"
    if fmt == "model_swinvit" and not swin:
        raise MedmimError(f"{checkpoint}: --format model_swinvit is for a Swin encoder; this checkpoint's is a ViT "
                          "(use --format monai)")
    if swin:
        from medmim.models.swin_transfer import swin_encoder_to_model_swinvit, swin_encoder_to_monai

        state = swin_encoder_to_monai(ckpt.state) if fmt == "monai" else swin_encoder_to_model_swinvit(ckpt.state)
    else:
        state = encoder_to_monai_vit(ckpt.state)
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    n = len(state.get("state_dict", state))
    click.echo(f"wrote the encoder ({n} tensors) to {out}")
    if swin:
        s = m.get("swin", {})
        made = (f"monai.networks.nets.SwinUNETR(in_channels={m['in_channels']}, out_channels=K, "
                f"feature_size={m['feature_size']}, patch_size={tuple(s.get('patch_size', (2,)))[0]}, "
                f"depths={tuple(s.get('depths', ()))}, num_heads={tuple(s.get('num_heads', ()))}, "
                f"window_size={tuple(s.get('window_size', ()))}, use_v2={s.get('use_v2', False)})")
        how = (".swinViT.load_state_dict(torch.load(FILE), strict=True)" if fmt == "monai"
               else ".load_from(torch.load(FILE))")
        click.echo(f"load it with: {made}{how}")
    elif m:
        click.echo(
            "load it with: monai.networks.nets.ViT(in_channels={in_channels}, img_size={img}, patch_size={patch}, "
            "hidden_size={hidden_size}, mlp_dim={mlp_dim}, num_layers={num_layers}, num_heads={num_heads}, "
            "proj_type='conv', pos_embed_type='{pe}', classification=False, qkv_bias={qkv_bias})"
            ".load_state_dict(torch.load(FILE), strict=True)".format(
                img=tuple(m["img_size"]), patch=tuple(m["patch_size"]),
                pe="sincos" if m["pos_embed"] == "sincos" else "learnable", **m))


# --- the main job and studies -----------------------------------------------------------------

@cli.command("demo")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True)
@click.option("--quick", is_flag=True, help="Tiny models and phantoms: the whole pipeline in a few minutes (a smoke test).")
def demo(out: Path, quick: bool) -> None:
    """Phantoms -> prepare -> pretrain (SimCLR, MAE, SimMIM) -> fine-tune UNETR from each and from scratch
    -> evaluate on held-out volumes -> OUT/report.md. Running it again resumes finished stages.
    """
    from medmim.demo import run_demo

    os.environ.setdefault("MEDMIM_NO_PROGRESS", "1")  # stage lines instead of many progress bars
    report = run_demo(out, quick=quick, log=click.echo)
    click.echo(f"done: {report}")


@cli.command("study", context_settings={"ignore_unknown_options": True})
@click.argument("spec")
@click.argument("overrides", nargs=-1)
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None, help="Default: studies/SPEC-NAME.")
@click.option("--dry-run", is_flag=True,
              help="List the cells, those finished already, and an estimate of the training left; run nothing.")
@click.option("--no-estimate", is_flag=True, help="With --dry-run: skip timing a step of each run.")
@click.option("--report-only", is_flag=True,
              help="Train nothing: write the tables and plot from the cells finished so far.")
def study(spec: str, overrides: tuple[str, ...], out: Path | None, dry_run: bool, no_estimate: bool,
          report_only: bool) -> None:
    """Run a grid of pretraining x fine-tuning cells from SPEC (a shipped study name or a YAML file),
    skipping finished cells, then write summary.md, cells.csv and curves.png. OVERRIDES (key=value)
    apply to every run, e.g. data.path=/data/btcv for a paper-scale spec.
    """
    from medmim.study import StudyRun, dry_run_table, load_spec

    sp = load_spec(spec)
    for o in overrides:
        if o.startswith("data.path="):
            sp.data = {"path": o.split("=", 1)[1]}
    run = StudyRun(sp, out or Path("studies") / sp.name, [o for o in overrides if not o.startswith("data.path=")],
                   log=click.echo)
    if dry_run:
        click.echo(dry_run_table(sp, run, estimate=not no_estimate))
        return
    os.environ.setdefault("MEDMIM_NO_PROGRESS", "1")
    run.run(report_only=report_only)
    click.echo((run.out / "summary.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {run.out / 'summary.md'}, {run.out / 'cells.csv'}, {run.out / 'curves.png'}")


# --- config ----------------------------------------------------------------------------------

@cli.group()
def config() -> None:
    """Configs: list the shipped presets, show a resolved config."""


@config.command("list")
def config_list() -> None:
    """List the presets shipped with medmim."""
    from medmim.config import preset_names

    for name in preset_names():
        click.echo(name)


@config.command("show", context_settings={"ignore_unknown_options": True})
@click.argument("source")
@click.argument("overrides", nargs=-1)
def config_show(source: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config of SOURCE (a preset name or a YAML file) with key=value OVERRIDES."""
    from medmim.config import load_config

    click.echo(load_config(source, overrides).to_yaml(), nl=False)


# --- entry point -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return (and exit with) 0, 1 or 2."""
    for stream in (sys.stdout, sys.stderr):
        # a terminal without UTF-8 still gets every message, with odd characters escaped
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    try:
        rv = cli.main(args=argv, prog_name="medmim", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0  # click returns --help's / --version's exit code
    except MedmimError as e:
        _echo_err(str(e))
        code = 2
    except click.exceptions.UsageError as e:
        e.show()
        code = 2
    except click.exceptions.Abort:
        click.echo("medmim: aborted", err=True)
        code = 130
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        e.show()
        code = 2
    except KeyboardInterrupt:
        click.echo("medmim: interrupted", err=True)
        code = 130
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # an internal bug: say so on one line, traceback on request
        if os.environ.get("MEDMIM_DEBUG"):
            traceback.print_exc()
        _echo_err(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                  f"(a bug in medmim; rerun with MEDMIM_DEBUG=1 for the traceback)")
        code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
