"""A model rebuilt from its checkpoint alone: the config it was made with, the data record beside it,
the weights (one home for predict, evaluate and evaluate-recon).

    ckpt = read_checkpoint("runs/unetr/checkpoints/best.pt")
    cfg = config_of(ckpt)          # the config, with what the run read from its data
    model = model_from(ckpt, cfg)  # weights loaded strictly, eval mode
"""

from __future__ import annotations


from torch import nn

from medmim.config import Config, config_from_dict, saved_config
from medmim.errors import MedmimError
from medmim.models.transfer import Checkpoint


def with_data_record(cfg, record: dict | None):
    """``cfg`` (a Config) with what its run read from the data filled in: the config a model was in effect
    trained with. Settings the user gave are kept (labels, lateral pairs); the preprocessing the data had wins.
    A checkpoint from before records existed holds these in its config already (``record`` None)."""
    if not record:
        return cfg
    data = {}
    if cfg.data.labels is None and record.get("labels"):
        data["labels"] = {int(k): v for k, v in record["labels"].items()}
    if cfg.data.lateral_pairs is None:
        data["lateral_pairs"] = [tuple(p) for p in record.get("lateral_pairs", [])]
    data.update(record.get("preprocessing") or {})
    if not data:
        return cfg
    return cfg.model_copy(update={"data": type(cfg.data)(**{**cfg.data.model_dump(), **data})})


def config_of(ckpt: Checkpoint, need: str = "") -> Config:
    """The config a checkpoint's model was in effect trained with (its data record applied)."""
    if not ckpt.config:
        raise MedmimError(f"{ckpt.source}: carries no medmim config (not written by medmim?){'; ' + need if need else ''}")
    return with_data_record(config_from_dict(saved_config(ckpt.config), where=ckpt.source), ckpt.data)


def model_from(ckpt: Checkpoint, cfg: Config) -> nn.Module:
    """The model of ``cfg`` (UNETR for a fine-tuning config, else its pretrainer) with ``ckpt``'s weights
    loaded strictly, in eval mode."""
    from medmim.models import build_pretrainer, build_segmenter

    model = build_segmenter(cfg.model) if cfg.task == "finetune" else build_pretrainer(cfg)
    state = {k.removeprefix("module."): v for k, v in ckpt.state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        name = "UNETR" if cfg.task == "finetune" else f"{cfg.pretrain.method} model"
        raise MedmimError(f"{ckpt.source}: its weights do not match the {name} of its own config "
                          f"({str(e).splitlines()[0][:200]})")
    return model.eval()
