"""Loading a model for prediction from a store checkpoint or a self-contained exported file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermcam.store.checkpoint import Checkpoint
from dermcam.store.ensembles import Ensemble
from dermcam.store.references import find_checkpoint

if TYPE_CHECKING:
    import torch


def model_from_checkpoint(ckpt: Checkpoint, verify: bool = True) -> torch.nn.Module:
    """Build the sidecar's backbone and load the checkpoint's weights (strict: shapes must match); with
    a ``metadata`` block, the metadata fusion model it describes."""
    from dermcam.models.backbones import build_with_weights

    return build_with_weights(ckpt.sidecar["backbone"], len(ckpt.sidecar["classes"]), ckpt.load_weights(verify=verify),
                              f"checkpoint {ckpt.id}", ckpt.sidecar.get("metadata"))


def load_for_inference(ref: str | Path | None = None, root: Path | None = None, *, calibrated: bool = True,
                       notes: list[str] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, sidecar) for a store checkpoint, an ensemble or a self-contained exported file.

    torch and timm are imported first, through :func:`dermcam.models.timm_import.import_timm`: this is
    where evaluate and explain first need them, and that import is most of their start-up.
    For an ensemble the sidecar is :func:`dermcam.store.ensembles.scoring_document` and ``calibrated``
    says whether its members apply their calibrations (``--no-calibration``: the mean of raw softmaxes).
    ``notes`` gets one line per damaged checkpoint that ``best``/``latest``/a run id passed over
    (:class:`dermcam.store.references.Resolution`), for the command to show: a damaged candidate is
    never skipped in silence.
    """
    from dermcam.models.timm_import import import_timm
    from dermcam.store.ensembles import ensemble_name, read_ensemble

    import_timm()
    name = ensemble_name(ref, root)
    if name is not None:
        return load_ensemble(read_ensemble(name, root), root, calibrated=calibrated)
    if ref is not None and Path(str(ref)).is_file() and not Path(str(ref)).with_suffix(".json").is_file():
        from dermcam.store.exported import load_exported

        return load_exported(Path(str(ref)), calibrated=calibrated)
    found = find_checkpoint(ref, root)
    if notes is not None:
        notes.extend(found.warnings)
    return model_from_checkpoint(found.checkpoint), found.checkpoint.sidecar


def load_ensemble(ensemble: Ensemble, root: Path | None = None, *,
                  calibrated: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """An :class:`~dermcam.models.ensemble.EnsembleModel` of the manifest's members, each checked
    against the manifest (present, same sha256, weights intact) before anything is scored."""
    from dermcam.models.ensemble import EnsembleModel, MemberSpec
    from dermcam.store.ensembles import member_checkpoints, scoring_document

    ckpts = member_checkpoints(ensemble, root)
    models = [model_from_checkpoint(c) for c in ckpts]
    specs = [MemberSpec(m["preprocessing"], m.get("calibration"), m["weight"]) for m in ensemble.manifest["members"]]
    document = scoring_document(ensemble)
    for member, ckpt in zip(document["members"], ckpts):  # each member reads its own metadata encoding
        if ckpt.sidecar.get("metadata") is not None:
            member["metadata"] = ckpt.sidecar["metadata"]
    return EnsembleModel(models, specs, calibrated=calibrated).eval(), document
