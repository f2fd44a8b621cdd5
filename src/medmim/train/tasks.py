"""What differs between training methods: one small class per method, the loop is the engine's.

A task builds its model, says how crops become batches (transform, labels), runs the forward pass and
loss of one batch, validates, draws previews and names its metric columns. Adding a method is adding a
class here and a line in :func:`task_for`; the engine does not change.

    task = task_for(cfg, cases, device, warn)
    model = task.build_model(log)
    loss, out = task.forward(model, batch)     # batch from task.sampler(...), or task.synthetic_batch(n)
    row = task.validate(model)                 # {"val_loss": ...} or {"val_dice": ..., "dice_1": ...}
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medmim.config import Config
from medmim.data.augment import TwoViews, finetune_transform
from medmim.data.selection import RunCases
from medmim.data.sampling import CropSampler
from medmim.errors import MedmimError
from medmim.runtime import autocast

# fixed crops and masks of held-out pretraining validation: values compare across steps and runs
VAL_SEED = 12345
VAL_CROPS = 16


# held-out volumes kept in memory between validations, at most (larger sets are read again each time)
VAL_CACHE_BYTES = 2 * 1024**3


def class_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each class 1..K-1 of a label map ``pred`` against ``label`` (same shape, integer classes);
    NaN where ``label`` has none of the class (MONAI's ``ignore_empty=True``). One pass over the voxels:
    the confusion matrix, not K one-hot volumes."""
    k = num_classes
    cm = torch.bincount((label.reshape(-1).long() * k + pred.reshape(-1).long()), minlength=k * k)
    cm = cm.reshape(k, k).float().cpu()  # [true, predicted]; float32 as MONAI's one-hot sums, so the same values
    inter, true, predicted = cm.diagonal(), cm.sum(1), cm.sum(0)
    dice = torch.where(true > 0, 2 * inter / (true + predicted), torch.full_like(inter, float("nan")))
    return dice[1:].numpy()


def region_dice(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Dice of each region channel of ``pred`` against ``target`` (``[R, ...]`` bool each); NaN where the target
    region is empty (as :func:`class_dice`: MONAI's ``ignore_empty=True``)."""
    p, t = pred.reshape(pred.shape[0], -1).float(), target.reshape(target.shape[0], -1).float()
    inter, true, predicted = (p * t).sum(1), t.sum(1), p.sum(1)
    dice = torch.where(true > 0, 2 * inter / (true + predicted), torch.full_like(inter, float("nan")))
    return dice.cpu().numpy()


def segmentation_loss(regions: str | None = None) -> nn.Module:
    """The fine-tuning loss: Dice + cross-entropy on softmax outputs against integer labels (the paper's);
    for regions, Dice + binary cross-entropy on each region's sigmoid (MIM-Med3D's and MONAI's BraTS recipe)."""
    from monai.losses import DiceCELoss

    if regions:
        return DiceCELoss(sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


class Task:
    """The per-method half of a training run (see the module docstring)."""

    use_labels = False  # crops carry their label maps

    def __init__(self, cfg: Config, cases: RunCases, device: torch.device, warn=print):
        self.cfg, self.cases, self.device, self.warn = cfg, cases, device, warn
        self._val_warned: set[str] = set()

    # -- what the run is --
    def describe(self) -> str:
        raise NotImplementedError

    def columns(self) -> list[str]:
        """Metric columns beyond the engine's own."""
        return []

    def build_model(self, log=print) -> nn.Module:
        raise NotImplementedError

    def lr_scale(self):
        """None (one learning rate), or ``name -> (lr factor, is encoder)`` for the optimizer's groups."""
        return None

    # -- data --
    def transform(self):
        return None

    def sampler(self, cases, *, start_epoch: int = 0, epochs: int | None = None, seed: int | None = None,
                rank: int = 0, world: int = 1) -> CropSampler:
        d = self.cfg.data
        return CropSampler(cases, d.roi_size, d.crops_per_volume, d.pos_fraction,
                           seed=self.cfg.train.seed if seed is None else seed, epochs=epochs, start_epoch=start_epoch,
                           rank=rank, world_size=world, transform=self.transform(), use_labels=self.use_labels,
                           verify=d.verify_checksums)

    def synthetic_batch(self, n: int, generator: torch.Generator) -> dict:
        """A batch of ``n`` random crops shaped like the real ones (for timing a step)."""
        return {"image": torch.rand(n, self.cfg.model.in_channels, *self.cfg.data.roi_size, generator=generator)}

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.device.type == "cuda")

    # -- one step --
    def forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
        """The loss of one batch, and what a preview of it needs."""
        raise NotImplementedError

    # -- validation --
    def validate(self, model: nn.Module) -> dict:
        """A metrics row on the held-out cases (the model is in eval mode, gradients off)."""
        raise NotImplementedError

    def score(self, row: dict) -> float | None:
        """The value whose best is kept as ``best.pt`` (None: no best checkpoint)."""
        return None

    def validation_message(self, step: int, row: dict, best: float) -> str:
        raise NotImplementedError

    def warn_val(self, case, why) -> None:
        """Name an unusable validation case once; it is left out of the validation metrics."""
        name = getattr(case, "case_id", case)
        if name not in self._val_warned:
            self._val_warned.add(name)
            self.warn(f"warning: validation case {name} left out: {why}")

    def _held_out_loss(self, loss_of) -> dict:
        """Mean of ``loss_of(crop)`` over the first VAL_CROPS held-out crops, the same at every validation
        (one epoch, fixed seed, all on this process)."""
        losses = []
        for item in self.sampler(self.cases.val, epochs=1, seed=VAL_SEED):
            for line in item.pop("bad_cases", "").splitlines():
                self.warn_val(Path(line.partition("\t")[0]).name, line.partition("\t")[2])
            losses.append(loss_of(item))
            if len(losses) >= VAL_CROPS:
                break
        return {"val_loss": float(np.mean(losses)) if losses else float("nan")}

    # -- previews --
    def preview(self, path: Path, out) -> None:
        raise NotImplementedError


class MaskedImageTask(Task):
    """MAE and SimMIM: masked crops in, reconstruction loss on the masked voxels out."""

    def describe(self) -> str:
        on = " on the Swin transformer" if self.cfg.model.backbone == "swin" else ""
        return f"pretrain ({self.cfg.pretrain.method}{on})"

    def build_model(self, log=print) -> nn.Module:
        from medmim.models import build_pretrainer

        return build_pretrainer(self.cfg)

    def forward(self, model, batch):
        x = self._to(batch["image"])
        out = model(x)
        return out.loss, (x, out)

    def validate(self, model) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(VAL_SEED)  # the same masks at every validation

        def loss_of(item) -> float:
            with autocast(self.cfg.train.precision, self.device):
                return float(model(item["image"][None].to(self.device), generator=gen).loss)

        return self._held_out_loss(loss_of)

    def validation_message(self, step, row, best) -> str:
        return f"step {step}: held-out masked reconstruction loss {row['val_loss']:.4f}"

    def preview(self, path, out) -> None:
        from medmim.preview import save_mim_preview

        x, o = out
        save_mim_preview(path, x[0, 0], o.mask[0, 0], o.pred[0, 0])


class ContrastiveTask(Task):
    """SimCLR: two augmented views of each crop, NT-Xent between their projections."""

    def describe(self) -> str:
        return "pretrain (simclr)"

    def build_model(self, log=print) -> nn.Module:
        from medmim.models import build_pretrainer

        return build_pretrainer(self.cfg)

    def transform(self):
        return TwoViews(self.cfg.data.roi_size)

    def synthetic_batch(self, n, generator) -> dict:
        x = super().synthetic_batch(n, generator)["image"]
        return {"view1": x, "view2": x.flip(-1)}

    def forward(self, model, batch):
        v1, v2 = self._to(batch["view1"]), self._to(batch["view2"])
        return model(v1, v2).loss, (v1, v2)

    def validate(self, model) -> dict:
        def loss_of(item) -> float:
            out = model(item["view1"][None].to(self.device), item["view2"][None].to(self.device))
            # a batch of one has no negatives: score the two views' agreement instead
            return float(1 - torch.nn.functional.cosine_similarity(out.z1, out.z2).mean())

        return self._held_out_loss(loss_of)

    def validation_message(self, step, row, best) -> str:
        return f"step {step}: held-out contrastive loss {row['val_loss']:.4f}"

    def preview(self, path, out) -> None:
        from medmim.preview import save_views_preview

        v1, v2 = out
        save_views_preview(path, v1[0, 0], v2[0, 0])


class SegmentationTask(Task):
    """UNETR fine-tuning: DiceCE on labeled crops; sliding-window Dice on whole held-out volumes.

    With ``model.regions=brats`` the outputs are BraTS's three overlapping regions (TC, WT, ET), each a
    sigmoid: the label crops (0/1/2/4) become region masks with MONAI's conversion, and validation scores
    each region (a voxel is in a region where its sigmoid exceeds 0.5)."""

    use_labels = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.regions = self.cfg.model.regions
        self.loss_fn = segmentation_loss(self.regions)
        if self.regions and self.cases.labels and sorted(c for c in self.cases.labels if c) != [1, 2, 4]:
            raise MedmimError(f"model.regions=brats needs BraTS labels (1 necrotic core, 2 oedema, 4 enhancing "
                              f"tumour); the data declares {dict(sorted(self.cases.labels.items()))}")
        self.transfer = None  # the report of loading model.pretrained, once built
        self._window_weights: torch.Tensor | None = None  # sliding-window Gaussian, computed at the first validation
        self._val_volumes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # case folder -> (image, label)
        self._val_bytes = 0

    def describe(self) -> str:
        m = self.cfg.model
        what = "UNETR" if m.head == "unetr" else (
            "linear probe on the frozen ViT" + (", tokens standardised" if m.probe_norm == "batchnorm" else ", raw tokens"))
        what = "Swin UNETR" if m.backbone == "swin" else what
        return f"finetune ({what}{', BraTS regions TC/WT/ET' if self.regions else ''})"

    def columns(self) -> list[str]:
        if self.regions:
            from medmim.data.regions import REGION_NAMES

            return ["val_dice"] + [f"dice_{c}" for c in REGION_NAMES]
        return ["val_dice"] + [f"dice_{c}" for c in sorted(self.cases.labels) if c != 0]

    def build_model(self, log=print) -> nn.Module:
        from medmim.models import build_segmenter
        from medmim.models.transfer import load_pretrained

        model = build_segmenter(self.cfg.model)
        if self.cfg.model.pretrained:
            self.transfer = load_pretrained(model, self.cfg.model.pretrained, partial=self.cfg.model.partial_load,
                                            channels=self.cases.channel_names)
            log(self.transfer.summary())
        else:
            log("encoder: trained from scratch (model.pretrained not set): nothing loaded")
        return model

    def lr_scale(self):
        """MAE's fine-tuning recipe: ``train.layer_decay`` per ViT layer (the patch embedding lowest, the last
        block next to the decoder, the decoder and head at the full rate) and the ViT's groups marked, so
        that ``train.freeze_encoder_steps`` holds them still while the decoder warms up."""
        from medmim.models.swin_unetr import swin_unetr_layer_id
        from medmim.models.unetr import unetr_layer_id

        t, m = self.cfg.train, self.cfg.model
        if t.layer_decay is None and not t.freeze_encoder_steps:
            return None
        decay = t.layer_decay or 1.0
        if m.backbone == "swin":  # over the Swin transformer's stages
            top = len(m.swin.depths) + 1
            return lambda name: (decay ** (top - swin_unetr_layer_id(name, top - 1)), name.startswith("swinViT."))
        top = m.num_layers + 1
        return lambda name: (decay ** (top - unetr_layer_id(name, top - 1)), name.startswith("vit."))

    def transform(self):
        return finetune_transform(self.cases.lateral_pairs)

    def synthetic_batch(self, n, generator) -> dict:
        batch = super().synthetic_batch(n, generator)
        shape = (n, 1, *self.cfg.data.roi_size)
        if self.regions:  # BraTS label values 0/1/2/4
            batch["label"] = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, shape, generator=generator)]
        else:
            batch["label"] = torch.randint(0, self.cfg.model.num_classes, shape, generator=generator)
        return batch

    def forward(self, model, batch):
        x, y = self._to(batch["image"]), self._to(batch["label"]).long()
        logits = model(x)
        target = y
        if self.regions:
            from medmim.data.regions import labels_to_regions

            target = labels_to_regions(y).float()
        return self.loss_fn(logits.float(), target), (x, y, logits)

    def _scores(self, logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        """Per class (or region) Dice of one volume's ``logits`` [1, K, ...] against its label map ``y`` [1, ...]."""
        if self.regions:
            from medmim.data.regions import labels_to_regions

            return region_dice(logits[0] > 0, labels_to_regions(y))  # sigmoid > 0.5 <=> logit > 0
        return class_dice(logits.argmax(1), y, self.cfg.model.num_classes)

    def label_map(self, logits: torch.Tensor) -> torch.Tensor:
        """One crop's logits [K, ...] -> its label map [...] (BraTS values for regions)."""
        if self.regions:
            from medmim.data.regions import regions_to_labels

            return torch.from_numpy(regions_to_labels(logits > 0))
        return logits.argmax(0)

    def validate(self, model) -> dict:
        """Sliding-window inference over each whole validation volume; per class Dice (background excluded),
        as MONAI's ``DiceMetric(include_background=False, ignore_empty=True)``: NaN where a class is absent
        from a case's label, then the mean over cases, then over classes.

        Nothing is redone between validations: the volumes are read and checked once and kept in memory
        (up to VAL_CACHE_BYTES), and the Gaussian window weights are computed once.
        """
        from monai.inferers import sliding_window_inference

        t = self.cfg.train
        roi = tuple(self.cfg.model.img_size)
        if self._window_weights is None:
            from monai.data.utils import compute_importance_map

            self._window_weights = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=self.device)
        per_case = []
        for case in self.cases.val:
            volume = self._val_volume(case)
            if volume is None:
                continue
            x, y = volume
            with autocast(t.precision, self.device):
                logits = sliding_window_inference(x, roi, t.sw_batch_size, model, overlap=t.sw_overlap, mode="gaussian",
                                                  roi_weight_map=self._window_weights)
            per_case.append(self._scores(logits, y))
        if not per_case:
            return {"val_dice": float("nan")}
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case stays NaN
            per_class = np.nanmean(np.stack(per_case), axis=0)
            row = {"val_dice": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else 0.0}
        for c, v in enumerate(per_class, start=1):
            row[f"dice_{c}"] = float(v)
        return row

    def _val_volume(self, case) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image [1, C, X, Y, Z] float32, label [1, X, Y, Z] uint8) on the device; None if unusable (warned)."""
        key = str(case.folder)
        if key in self._val_volumes:
            return self._val_volumes[key]
        try:
            if self.cfg.data.verify_checksums:
                case.verify()
            x = torch.from_numpy(np.asarray(case.image(), dtype=np.float32))[None].to(self.device)
            y = torch.from_numpy(np.array(case.label(), dtype=np.uint8))[None].to(self.device)  # a copy, kept
        except (MedmimError, OSError, ValueError, EOFError) as e:
            self.warn_val(case, e)
            return None
        size = x.numel() * x.element_size() + y.numel()
        if self._val_bytes + size <= VAL_CACHE_BYTES:
            self._val_volumes[key] = (x, y)
            self._val_bytes += size
        return x, y

    def score(self, row) -> float:
        return row["val_dice"]

    def validation_message(self, step, row, best) -> str:
        return f"step {step}: validation mean Dice {row['val_dice']:.4f} (best {max(best, row['val_dice']):.4f})"

    def preview(self, path, out) -> None:
        from medmim.preview import save_finetune_preview

        x, y, logits = out
        save_finetune_preview(path, x[0, 0], y[0, 0], self.label_map(logits[0].float()), self.cases.labels)


def task_for(cfg: Config, cases: RunCases, device: torch.device, warn=print) -> Task:
    """The task of ``cfg``: segmentation for fine-tuning, else the pretraining method's."""
    if cfg.task == "finetune":
        return SegmentationTask(cfg, cases, device, warn)
    if cfg.pretrain.method == "simclr":
        return ContrastiveTask(cfg, cases, device, warn)
    return MaskedImageTask(cfg, cases, device, warn)
