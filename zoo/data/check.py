"""Check a COCO-format dataset before training on it.

    python -m zoo.data.check <root>/annotations/instances_train2017.json <root>/train2017 [--on-bad skip] [--no-decode]

Builds a :class:`zoo.data.coco.CocoIndex` collecting every problem (not only the first), decodes every image file as
the datasets do and compares its size with the json's ``width``/``height``, and prints a report: images, annotations,
problems per reason with the first few ids / files, categories.

Exit status: 0 when the dataset trains as is under the chosen ``--on-bad`` mode, 1 when it does not, 2 when the json
or the image folder cannot be used at all. With ``--on-bad raise`` (as ``data.on_bad_annotation=raise``, the default)
every problem fails the check. With ``--on-bad skip`` the problems the index drops are only reported, and the check
fails only on those it cannot drop: files whose decoded size differs from the json, and files that pass the index's
decode check but not a full decode. (Undecodable files are dropped by a skip-mode index only when it is built with
``verify_images=True``.)
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from zoo.data.coco import BadAnnotationError, CocoIndex, load_rgb

__all__ = ["CheckReport", "check_dataset", "main"]

#: problems a skip-mode index cannot drop: training stops on them whatever data.on_bad_annotation says
UNSKIPPABLE = ("size mismatches", "undecodable images")
#: problems a skip-mode index drops only when built with ``verify_images=True``
NEED_VERIFY = ("corrupt image files",)
#: reasons counted by the index that are never errors
NOT_PROBLEMS = ("degenerate boxes",)


@dataclass
class CheckReport:
    """What :func:`check_dataset` found; ``problems`` maps a reason to its count, ``examples`` to its first messages."""

    ann_file: Path
    images_dir: Path
    on_bad: str
    images_in_json: int = 0
    images_usable: int = 0
    annotations_in_json: int = 0
    annotations_usable: int = 0
    crowd: int = 0
    categories: list[tuple[int, str, int]] = field(default_factory=list)  # (category id, name, usable annotations)
    problems: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # counted, never errors (degenerate boxes)
    decoded: bool = False
    fatal: str | None = None

    def add(self, reason: str, message: str, max_examples: int = CocoIndex.MAX_EXAMPLES) -> None:
        self.problems[reason] = self.problems.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < max_examples:
            ex.append(message)

    @property
    def failing(self) -> dict[str, int]:
        """The problems that make the check fail under ``on_bad``."""
        if self.on_bad == "raise":
            return dict(self.problems)
        return {k: n for k, n in self.problems.items() if k in UNSKIPPABLE}

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.failing

    def format(self, max_categories: int = 20) -> str:
        lines = [f"dataset check: {self.ann_file} (images in {self.images_dir}, on_bad={self.on_bad})"]
        if self.fatal is not None:
            lines += [f"  unusable: {self.fatal}", "result: FAILED (the json or the image folder cannot be used)"]
            return "\n".join(lines)
        lines.append(f"  images:      {self.images_in_json} in the json, {self.images_usable} usable"
                     + ("" if self.decoded else " (files not decoded: --no-decode)"))
        lines.append(f"  annotations: {self.annotations_in_json} in the json, {self.annotations_usable} usable "
                     f"({self.crowd} crowd)")
        if self.images_usable and not self.annotations_usable:
            lines.append("  warning:     no image has annotations (training learns no objects, evaluation scores "
                         "mAP -1)")
        cats = ", ".join(f"{cid} {name} ({n})" for cid, name, n in self.categories[:max_categories])
        more = f", ... {len(self.categories) - max_categories} more" if len(self.categories) > max_categories else ""
        lines.append(f"  categories:  {len(self.categories)}: id name (usable annotations): {cats}{more}")
        for reason, n in sorted(self.dropped.items()):
            lines.append(f"  dropped, not an error: {n} {reason}")
        if self.problems:
            lines.append("problems:")
            for reason, n in sorted(self.problems.items()):
                tag = "" if reason in self.failing else " (dropped in skip mode)"
                if tag and reason in NEED_VERIFY:
                    tag = " (dropped in skip mode by an index built with verify_images=True)"
                lines.append(f"  {n} {reason}{tag}")
                ex = self.examples.get(reason, [])
                lines += [f"      {m}" for m in ex]
                if len(ex) >= CocoIndex.MAX_EXAMPLES and n > len(ex):
                    lines.append("      ...")
        else:
            lines.append("problems: none")
        if self.ok:
            lines.append("result: OK" + (" (with the problems above dropped)" if self.problems else ""))
        else:
            n = sum(self.failing.values())
            hint = ("fix them, or train with data.on_bad_annotation=skip to drop the droppable ones (check again "
                    "with --on-bad skip)" if self.on_bad == "raise" else
                    "fix images[].width/height or the files: skip mode does not drop these")
            lines.append(f"result: FAILED, {n} problem(s): {hint}")
        return "\n".join(lines)


def check_dataset(ann_file: str | Path, images_dir: str | Path, *, on_bad: str = "raise", decode: bool = True,
                  min_box_size: float = 1.0) -> CheckReport:
    """Check a COCO dataset; never raises for bad content (see :class:`CheckReport`, ``fatal`` for unusable input).

    The index is always built in skip mode (with ``verify_images=decode``) so that every problem is collected;
    ``on_bad`` only decides which problems fail the check.
    """
    if on_bad not in ("raise", "skip"):
        raise ValueError(f"on_bad must be 'raise' or 'skip', got {on_bad!r}")
    rep = CheckReport(Path(ann_file), Path(images_dir), on_bad, decoded=decode)
    try:
        index = CocoIndex(ann_file, images_dir, on_bad="skip", min_box_size=min_box_size, verify_images=decode)
    except (BadAnnotationError, FileNotFoundError) as err:
        rep.fatal = str(err)
        return rep
    rep.images_in_json = len(index.coco.dataset.get("images") or [])
    rep.annotations_in_json = len(index.coco.dataset.get("annotations") or [])
    for reason, n in index.skipped.items():
        if reason in NOT_PROBLEMS:
            rep.dropped[reason] = n
        else:
            rep.problems[reason] = n
            rep.examples[reason] = list(index.examples.get(reason, []))
    usable = []
    for rec in index.records:
        if decode:
            try:
                img = load_rgb(rec.file)
            except (BadAnnotationError, FileNotFoundError) as err:
                rep.add("undecodable images", f"image id {rec.image_id}: {err}")
                continue
            if img.shape[:2] != (rec.height, rec.width):
                rep.add("size mismatches", f"image id {rec.image_id}: {rec.file} decodes to {img.shape[1]}x"
                        f"{img.shape[0]} but the json says {rec.width}x{rec.height} (EXIF Orientation applied)")
                continue
        usable.append(rec)
    rep.images_usable = len(usable)
    rep.annotations_usable = sum(len(r.boxes) for r in usable)
    rep.crowd = sum(int(r.iscrowd.sum()) for r in usable)
    per_label = [0] * index.num_classes
    for r in usable:
        for lab in r.labels.tolist():
            per_label[lab] += 1
    rep.categories = [(cid, name, per_label[i]) for i, (cid, name) in enumerate(zip(index.cat_ids, index.class_names))]
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zoo.data.check", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="exit status: 0 ok, 1 problems that stop training under --on-bad, "
                                        "2 unusable json or image folder")
    ap.add_argument("ann_json", type=Path, help="COCO instances json")
    ap.add_argument("images_dir", type=Path, help="folder holding images[].file_name")
    ap.add_argument("--on-bad", choices=("raise", "skip"), default="raise",
                    help="the data.on_bad_annotation mode to check for (default raise)")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                    help="decode every image file and check its size against the json (default on)")
    ap.add_argument("--min-box-size", type=float, default=1.0, help="as data.min_box_size (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("zoo.data.coco").setLevel(logging.ERROR)  # its skip-mode counts are in the report
    rep = check_dataset(args.ann_json, args.images_dir, on_bad=args.on_bad, decode=args.decode,
                        min_box_size=args.min_box_size)
    print(rep.format())
    if rep.fatal is not None:
        return 2
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
