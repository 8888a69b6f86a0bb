"""GenEval-style evaluation of a text-to-image zoo model, graded by a zoo detector, with FID / KID.

    python -m zoo.generation.evaluate ckpt_path=<run>/checkpoints/best.ckpt grader=test_resnet.shapes_det
    python -m zoo.generation.evaluate ckpt_path=<run>/bundle untrained=true steps=25 guidance=4.0 sampler=ddim

Prints (and writes to ``out``/geneval.json) accuracy per prompt category and overall for the model, for real
images of the same prompts (the grader's ceiling) and, with ``untrained=true``, for the same architecture with
freshly initialised weights; FID / KID between the generated images and real images of the prompts in the feature
space of the grader's backbone. Options (``key=value``): ``ckpt_path`` (a checkpoint, bundle or registered name),
``grader``, ``steps``, ``guidance``, ``sampler``, ``seed``, ``n`` (images per prompt), ``per_category``,
``untrained``, ``fid``, ``out``, ``score_thresh``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["evaluate_generator", "main"]

DEFAULTS: dict[str, Any] = {"ckpt_path": None, "grader": "test_resnet.shapes_det", "steps": 25, "guidance": 4.0,
                            "sampler": "ddim", "seed": 0, "n": 1, "per_category": 12, "untrained": False,
                            "fid": True, "out": None, "score_thresh": 0.4, "grids": True}


def evaluate_generator(model: Any, grader: Any = "test_resnet.shapes_det", *, steps: int = 25, guidance: float = 4.0,
                       sampler: str = "ddim", seed: int = 0, n: int = 1, per_category: int | None = 12,
                       untrained: bool = False, fid: bool = True, score_thresh: float = 0.4,
                       out: str | Path | None = None, grids: bool = True) -> dict[str, Any]:
    """Grade ``model``'s samples of the prompt set; returns ``{"metrics": {column: {metric: value}}, "table",
    "images", "fid", "seconds"}`` (columns ``generated``, ``real`` and, with ``untrained``, ``untrained``)."""
    import zoo
    from zoo.generation.grading import Grader, format_table
    from zoo.generation.prompts import prompt_set, render_prompt
    from zoo.generation.sampler import Generator

    t0 = time.perf_counter()
    gen = Generator(model)
    names = list(gen.head.class_names or []) or None
    prompts = prompt_set(names, per_category=per_category)
    plist = [p for p in prompts for _ in range(int(n))]
    judge = Grader(grader, score_thresh=score_thresh)
    images = gen([p.text for p in prompts], steps=steps, guidance=guidance, seed=seed, sampler=sampler, n=n)
    t_gen = time.perf_counter() - t0
    S = gen.image_size
    real = [render_prompt(p, image_size=S, seed=seed + i) for i, p in enumerate(plist)]
    res = judge.evaluate(images, plist)
    columns = {"generated": res["metrics"], "real": judge.evaluate(real, plist)["metrics"]}
    if untrained:
        base = zoo.create_model(gen.model.spec, load_backbone_weights=False).eval()
        uimgs = Generator(base)([p.text for p in prompts], steps=steps, guidance=guidance, seed=seed,
                                sampler=sampler, n=n)
        columns["untrained"] = judge.evaluate(uimgs, plist)["metrics"]
    report: dict[str, Any] = {"metrics": columns, "table": format_table(columns), "images": res["images"],
                              "settings": {"steps": steps, "guidance": guidance, "sampler": sampler, "seed": seed,
                                           "n": n, "prompts": len(prompts), "image_size": S,
                                           "grader": str(grader), "score_thresh": score_thresh},
                              "sampling_seconds": t_gen}
    if fid:
        from zoo.generation.fid import fid_kid

        other = [render_prompt(p, image_size=S, seed=10_000 + seed + i) for i, p in enumerate(plist)]
        report["fid"] = {"generated_vs_real": fid_kid(images, real, judge.model),
                         "real_vs_real": fid_kid(other, real, judge.model)}
        if untrained:
            report["fid"]["untrained_vs_real"] = fid_kid(uimgs, real, judge.model)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "geneval.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        if grids:
            import numpy as np
            from PIL import Image

            for cat in dict.fromkeys(p.category for p in plist):
                idx = [i for i, p in enumerate(plist) if p.category == cat][:8]
                rows = [np.concatenate([np.pad(a[i], ((1, 1), (1, 1), (0, 0)), constant_values=255) for i in idx], 1)
                        for a in (images, real)]
                Image.fromarray(np.concatenate(rows, 0)).resize((rows[0].shape[1] * 3, rows[0].shape[0] * 6),
                                                                Image.NEAREST).save(out / f"geneval_{cat}.png")
    report["seconds"] = time.perf_counter() - t0
    return report


def _parse(argv: list[str]) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"arguments are key=value; got {a!r} (keys: {', '.join(DEFAULTS)})")
        k, v = a.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"unknown option {k!r}; options: {', '.join(DEFAULTS)}")
        d = DEFAULTS[k]
        if isinstance(d, bool):
            opts[k] = v.lower() in ("1", "true", "yes", "on")
        elif isinstance(d, int):
            opts[k] = int(v)
        elif isinstance(d, float):
            opts[k] = float(v)
        else:
            opts[k] = None if v.lower() in ("null", "none", "") else v
    if not opts["ckpt_path"]:
        raise SystemExit("ckpt_path=<run>/checkpoints/best.ckpt (or a bundle) is required")
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import zoo

    opts = _parse(list(sys.argv[1:] if argv is None else argv))
    model = zoo.load(opts.pop("ckpt_path"))
    out = opts.pop("out")
    if out is None:
        out = Path("outputs") / "geneval" / time.strftime("%Y-%m-%d_%H-%M-%S")
    rep = evaluate_generator(model, opts.pop("grader"), out=out, **opts)
    print(rep["table"])
    if "fid" in rep:
        for k, v in rep["fid"].items():
            print(f"{k}: FID {v['fid']:.3f}  KID {v['kid_mean']:.4f} +- {v['kid_std']:.4f}  "
                  f"({v['n_generated']} vs {v['n_real']} images)")
    print(f"report: {Path(out) / 'geneval.json'}  ({rep['seconds']:.0f} s)")
    return rep


if __name__ == "__main__":
    main()
