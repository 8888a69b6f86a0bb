"""A wrapper that turns any timm model into a multi-scale feature extractor.

Heads never import timm: they receive ``channels`` and ``strides`` from :class:`TimmBackbone` and a list of
NCHW feature maps from its ``forward``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from zoo.backbones.pyramid import SimpleFeaturePyramid

log = logging.getLogger(__name__)

__all__ = ["TimmBackbone", "check_pretrained_available", "read_state_dict", "MIN_MATCH_FRACTION"]

#: Least fraction of a backbone's tensors a weights file must provide (by name and shape).
MIN_MATCH_FRACTION = 0.5
#: Key prefixes of the backbone inside a zoo bundle (``backbone.``) and a zoo task checkpoint.
ZOO_BACKBONE_PREFIXES = ("backbone.", "model.backbone.", "ema.module.backbone.")
#: Seconds the reachability check of ``pretrained=True`` waits for the hub (``$ZOO_HUB_TIMEOUT``).
HUB_TIMEOUT_S = 3.0


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a torch file read with ``weights_only=True`` (a dict holding a
    ``state_dict`` / ``model`` / ``state_dict_ema`` entry is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    from zoo.hub.bundle import read_lightning_checkpoint

    obj = read_lightning_checkpoint(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _map_timm_keys(sd: dict[str, torch.Tensor], body: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full timm model's tensors renamed to its ``features_only`` body's keys (timm joins the top-level module
    path with ``_``, e.g. ``stages.0`` -> ``stages_0``; ViT feature getters nest the model under ``model.``);
    only names found with the same shape are kept."""
    def norm(k: str) -> str:
        return k.removeprefix("module.").replace("_", ".")

    alias: dict[str, str | None] = {}
    for k in body:
        for a in {norm(k), norm(k.removeprefix("model."))}:
            alias[a] = None if a in alias and alias[a] != k else k  # an ambiguous alias maps nowhere
    out = {}
    for k, v in sd.items():
        target = alias.get(norm(k))
        if target is not None and tuple(body[target].shape) == tuple(v.shape):
            out[target] = v
    return out


def _cached_pretrained(name: str) -> Path | None:
    """The local copy of timm's pretrained weights of ``name`` (a file named by its pretrained cfg, the Hugging
    Face cache, or torch.hub's checkpoint folder), or ``None``."""
    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown pretrained tag: timm raises its own error later
        return None
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            pass
        else:
            repo, _, rev = str(cfg.hf_hub_id).partition("@")
            names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else ["model.safetensors",
                                                                                       "pytorch_model.bin"]
            for fn in names:
                hit = try_to_load_from_cache(repo, fn, revision=rev or None)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
    if cfg.url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(cfg.url).split("?")[0])
        if p.is_file():
            return p
    return None


def _hub_reachable(name: str, timeout: float) -> tuple[bool, str]:
    """Whether the host timm downloads ``name``'s weights from accepts a TCP connection within ``timeout`` s."""
    import socket
    import urllib.parse

    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001
        cfg = None
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if cfg is not None and not cfg.hf_hub_id and cfg.url:
        url = str(cfg.url)
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "huggingface.co", parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, host
    except OSError:
        return False, host


def check_pretrained_available(name: str) -> Path | None:
    """Before ``pretrained=True`` downloads: ``None`` when timm may go to its hub, the cached file when the
    machine is offline but the weights are cached; otherwise an :class:`~zoo.hub.download.OfflineError` that says
    how to give local weights, at once instead of after the hub client's retries (about a minute).

    Offline means ``ZOO_OFFLINE`` / ``HF_HUB_OFFLINE`` set, or the hub's host not answering within
    ``$ZOO_HUB_TIMEOUT`` seconds (default :data:`HUB_TIMEOUT_S`).
    """
    from zoo.hub.download import OfflineError, offline

    cached = _cached_pretrained(name)
    if offline():
        why = "ZOO_OFFLINE / HF_HUB_OFFLINE is set"
    else:
        timeout = float(os.environ.get("ZOO_HUB_TIMEOUT") or HUB_TIMEOUT_S)
        ok, host = _hub_reachable(name, timeout)
        if ok:
            return None
        why = f"{host} did not answer within {timeout:g} s"
    if cached is not None:
        log.info("backbone %s: offline (%s); using the cached pretrained weights %s", name, why, cached)
        return cached
    raise OfflineError(
        f"backbone.pretrained=true needs timm's pretrained weights of {name!r}, which are not cached, and the machine "
        f"is offline ({why}). Give local weights instead: backbone.weights=<file> (a state dict of "
        f"timm.create_model({name!r}), or a zoo bundle's model.safetensors) or init_from=<bundle folder|.ckpt|"
        "registered name> (a trained zoo model); or train from scratch with backbone.pretrained=false.")


class TimmBackbone(nn.Module):
    """Any timm model name as a feature extractor returning a list of NCHW maps.

    Args:
        name: a timm model name (``timm.list_models()``), e.g. ``"resnet18"``, ``"convnext_tiny"``, ``"vit_small_patch16_224"``.
        pretrained: load the timm hub weights (network access needed on first use; offline, or when the hub
            cannot be reached within a few seconds, a cached copy is used or an error says how to give local
            weights, see :func:`check_pretrained_available`).
        weights: path to a local weights file (``.pth``/``.bin``/``.safetensors``/``.ckpt``): a state dict of the
            *full* timm model, or a zoo bundle's ``model.safetensors`` / a zoo Lightning checkpoint (its
            ``backbone.`` weights are taken); takes precedence over ``pretrained``. Fewer than
            :data:`MIN_MATCH_FRACTION` of the backbone's tensors found in the file is an error (never a silent
            random initialisation). ``None`` and ``pretrained=False`` give random initialisation.
        out_indices: which feature levels to return (timm level numbering); ``None`` returns all.
        freeze: ``0`` trains everything, ``"all"`` (or ``-1``) freezes the whole backbone, ``N > 0`` freezes the
            stem and every parameter up to and including feature level ``N - 1``. Frozen batch-norm layers stay in
            eval mode so their running statistics do not drift.
        grad_checkpointing: trade compute for memory in the backbone's blocks (where timm supports it).
        pyramid: for plain (single-stride) backbones such as ViTs, build a simple feature pyramid with these
            strides from the last level; ``None`` chooses ``(4, 8, 16, 32)`` for plain backbones and nothing otherwise.
        pyramid_channels: output channels of the simple pyramid (default: the ViT's width).
        img_size: input size for models that need one fixed at construction (ViTs also get ``dynamic_img_size``).
        drop_path_rate: stochastic depth rate passed to timm where supported.

    Attributes:
        channels: channels of each returned level.
        strides: stride (reduction w.r.t. the input) of each returned level.
    """

    def __init__(
        self,
        name: str,
        *,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        out_indices: Sequence[int] | None = None,
        freeze: int | str = 0,
        grad_checkpointing: bool = False,
        pyramid: Sequence[int] | None = None,
        pyramid_channels: int | None = None,
        img_size: int | Sequence[int] | None = None,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
            raise ValueError(
                f"backbone.name={name!r} is not a timm model. Close names: {close}. "
                "List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`."
            )
        kwargs: dict = {"features_only": True}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(int(i) for i in out_indices)
        if drop_path_rate:
            kwargs["drop_path_rate"] = float(drop_path_rate)
        if img_size is not None:
            kwargs["img_size"] = img_size if isinstance(img_size, int) else tuple(img_size)
        load_pretrained = bool(pretrained)
        weights_file: Path | None = None
        if weights is not None:
            weights_file = Path(weights).expanduser()
            if not weights_file.is_file():
                raise FileNotFoundError(
                    f"backbone.weights={str(weights)!r} does not exist. Give the path of a weights file saved from "
                    f"timm.create_model({name!r}) (state_dict as .pth/.bin/.safetensors), a zoo bundle's "
                    "model.safetensors, or set backbone.weights=null."
                )
            load_pretrained = False
        elif load_pretrained:
            cached = check_pretrained_available(name)
            if cached is not None:  # offline with a cached copy: read it, never wait for the hub
                weights_file, load_pretrained = cached, False
        self.body = self._create(name, load_pretrained, kwargs)
        info = self.body.feature_info
        self._fmt = str(getattr(self.body, "output_fmt", "NCHW"))
        self._fmt = "NHWC" if "NHWC" in self._fmt else "NCHW"
        body_channels = list(info.channels())
        body_strides = list(info.reduction())
        self.pretrained_cfg = dict(getattr(self.body, "pretrained_cfg", {}) or {})

        plain = len(set(body_strides)) == 1 and len(body_strides) >= 1
        if pyramid is None and plain:
            pyramid = (4, 8, 16, 32)
        self.pyramid: SimpleFeaturePyramid | None = None
        if pyramid:
            self.pyramid = SimpleFeaturePyramid(
                body_channels[-1], body_strides[-1], strides=tuple(pyramid), out_channels=pyramid_channels
            )
            self.channels = list(self.pyramid.channels)
            self.strides = list(self.pyramid.strides)
        else:
            self.channels = body_channels
            self.strides = body_strides

        if weights_file is not None:
            self.load_weights_file(weights_file, what=f"backbone.weights={str(weights)!r}" if weights is not None
                                   else f"cached timm weights of {name}")
        if grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._frozen_norms: list[nn.Module] = []
        self.freeze(freeze)

    def load_weights_file(self, path: str | os.PathLike, *, what: str | None = None,
                          min_fraction: float | None = None) -> dict[str, int]:
        """Load a weights file into this backbone; returns ``{"loaded", "total", "layout"}``.

        The file is a zoo bundle's ``model.safetensors`` or a zoo ``.ckpt`` (keys ``backbone.*``,
        ``model.backbone.*`` or ``ema.module.backbone.*``: the prefix is stripped) or the state dict of the full timm
        model (keys mapped onto the ``features_only`` body, whose top-level module names timm joins with ``_``).
        Tensors are matched by name and shape; fewer than ``min_fraction`` (default :data:`MIN_MATCH_FRACTION`) of
        the backbone's tensors matched raises ``ValueError`` naming the counts, so a wrong file never leaves a
        randomly initialised backbone behind silently.
        """
        path = Path(path).expanduser()
        what = what or str(path)
        need = MIN_MATCH_FRACTION if min_fraction is None else float(min_fraction)
        sd = read_state_dict(path)
        best: tuple[int, int, str, dict[str, torch.Tensor], nn.Module] | None = None
        own = self.state_dict()
        for prefix in ZOO_BACKBONE_PREFIXES:
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if part:
                got = {k: v for k, v in part.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
                if best is None or len(got) / len(own) > best[0] / best[1]:
                    best = (len(got), len(own), f"zoo ({prefix}*)", got, self)
        body_own = self.body.state_dict()
        mapped = _map_timm_keys(sd, body_own)
        if best is None or len(mapped) / len(body_own) > best[0] / best[1]:
            best = (len(mapped), len(body_own), "timm", mapped, self.body)
        n, total, layout, got, target = best
        if total == 0 or n / total < need:
            sample = ", ".join(list(sd)[:4])
            raise ValueError(
                f"{what}: only {n} of the {total} tensors of backbone {self.name!r} were found in {path} (name and "
                f"shape; {need:.0%} needed), so it does not hold this backbone's weights (its keys: {sample}, ...). "
                "Give a state dict of the full timm model "
                f"(timm.create_model({self.name!r}).state_dict()), a zoo bundle's model.safetensors trained with "
                f"backbone.name={self.name}, or use init_from=<bundle|ckpt|name> to start from a trained zoo model.")
        target.load_state_dict(got, strict=False)
        missing = [k for k in target.state_dict() if k not in got]
        log.info("%s: loaded %d of %d backbone tensors from %s (%s layout)%s", what, n, total, path, layout,
                 f"; {len(missing)} left at their initialisation (e.g. {missing[:3]})" if missing else "")
        return {"loaded": n, "total": total, "layout": layout}

    @staticmethod
    def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError:
            # Most non-ViT models do not take dynamic_img_size.
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    # ------------------------------------------------------------------ freezing / checkpointing
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable gradient checkpointing in the timm body where the architecture supports it."""
        target = getattr(self.body, "model", self.body)
        fn = getattr(self.body, "set_grad_checkpointing", None) or getattr(target, "set_grad_checkpointing", None)
        if fn is None:
            log.warning("backbone %s does not support gradient checkpointing; ignoring the switch", self.name)
            return
        try:
            fn(enable)
        except (AssertionError, NotImplementedError) as err:
            log.warning("backbone %s: gradient checkpointing unavailable (%s)", self.name, err)

    def _level_param_prefixes(self, level: int) -> list[str]:
        mod = self.body.feature_info.module_name()[level]
        return [mod + ".", mod.replace(".", "_") + ".", "model." + mod + "."]

    def freeze(self, spec: int | str) -> None:
        """Freeze all (``"all"``/``-1``) or the first ``N`` feature levels of the body (see class docs)."""
        if spec in (None, 0, "0", False, "none"):
            return
        names = [n for n, _ in self.body.named_parameters()]
        if spec in ("all", -1, "-1", True):
            cut = len(names)
        else:
            try:
                n_levels = int(spec)
            except (TypeError, ValueError):
                raise ValueError(f"backbone.freeze must be 0, 'all' or a number of stages, got {spec!r}") from None
            n_info = len(self.body.feature_info.module_name())
            if not 0 < n_levels <= n_info:
                raise ValueError(f"backbone.freeze={n_levels} but {self.name} has {n_info} feature levels (use 1..{n_info} or 'all')")
            prefixes = tuple(self._level_param_prefixes(n_levels - 1))
            matches = [i for i, n in enumerate(names) if n.startswith(prefixes)]
            cut = (max(matches) + 1) if matches else 0
        frozen = set(names[:cut])
        for n, p in self.body.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        for mod_name, m in self.body.named_modules():
            params = list(m.parameters(recurse=False))
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and params and all(not p.requires_grad for p in params):
                self._frozen_norms.append(m)
        if spec in ("all", -1, "-1", True) and self.pyramid is not None:
            # "all" means the body; the simple pyramid stays trainable: it is new, not pretrained.
            pass
        self.train(self.training)

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Args:
            x: images ``(B, 3, H, W)``.
        Returns:
            list of feature maps ``(B, C_i, H / s_i, W / s_i)`` with ``C_i = channels[i]``, ``s_i = strides[i]``.
        """
        feats = self.body(x)
        if isinstance(feats, torch.Tensor):
            feats = [feats]
        if self._fmt == "NHWC":
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        feats = list(feats)
        if self.pyramid is not None:
            feats = self.pyramid(feats[-1])
        return feats
