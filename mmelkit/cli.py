"""The ``mmelkit`` command line.

Each command is a function that adds its subparser (``_add_<command>``) and a handler that
takes the parsed arguments and returns an exit code; :data:`COMMANDS` lists the former in the
order ``mmelkit --help`` shows them. A new command (``train``, ``bench``...) is one more
``_add_...`` function and one more entry there.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmelkit._checks import did_you_mean
from mmelkit._io import CorruptFileError
from mmelkit.course import DEFAULT_CELL_TIMEOUT, CourseConfigError, CourseError

EXIT_OK = 0
EXIT_FAILED = 1  # something ran and failed (a notebook, ...)
EXIT_USAGE = 2  # bad arguments or configuration; nothing ran (argparse uses 2 as well)

Subparsers = Any  # argparse's _SubParsersAction, which has no public name


# -- mmelkit models ------------------------------------------------------------------------------
def _add_models(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "models",
        help="list the model zoo: short names load_model() and load_vlm() resolve without a download",
        description="List the short model names mmelkit.load_model() (CLIP-style models) and "
        "mmelkit.load_vlm() (generative VLMs) understand without any download.",
    )
    parser.set_defaults(handler=_models)


def _models(args: argparse.Namespace) -> int:
    from mmelkit.models import list_zoo
    from mmelkit.models.vlm.loading import VLM_ZOO, list_vlm_zoo

    zoo = {**list_zoo(), **list_vlm_zoo()}
    width = max(map(len, zoo), default=0)
    for name, description in zoo.items():
        kind = "vlm " if name in VLM_ZOO else "clip"
        print(f"{name:<{width}}  {kind}  {description}")
    return EXIT_OK


# -- mmelkit course ------------------------------------------------------------------------------
def _add_course(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "course",
        help="run the course notebooks or list them with their parameters",
        description="The course: the notebooks in notebooks/ named NN_*.ipynb, run in order with "
        "parameters from a profile in notebooks/profiles.yaml.",
    )
    parser.set_defaults(handler=_usage(parser))
    actions = parser.add_subparsers(title="actions", metavar="ACTION")

    run = actions.add_parser(
        "run",
        help="execute the notebooks with papermill, writing executed copies and HTML",
        description="Execute the course notebooks under a parameter profile. Executed notebooks go to "
        "OUT/notebooks/, HTML to OUT/html/. Stops at the first notebook that fails.",
    )
    run.add_argument(
        "--profile",
        default="auto",
        metavar="NAME",
        help="parameter profile from profiles.yaml: cpu, gpu, ... or auto (gpu when CUDA is available, "
        "else cpu; default)",
    )
    run.add_argument("--out", default="build", metavar="DIR", help="output folder (default: build)")
    run.add_argument(
        "--only",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="run only these notebooks (file stems like 00_tour, or file names)",
    )
    run.add_argument("--no-html", dest="html", action="store_false", help="skip the HTML export")
    run.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_CELL_TIMEOUT,
        metavar="SECONDS",
        help="seconds one cell may run before the run fails; 0 means no limit (default: %(default)g)",
    )
    run.add_argument("--kernel", metavar="NAME", help="Jupyter kernel to use (default: this Python)")
    run.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    _add_notebooks_option(run)
    run.set_defaults(handler=_course_run)

    listing = actions.add_parser(
        "list",
        help="show the notebooks, their parameters and what each profile sets",
        description="List the course notebooks with their documented parameters and the values each "
        "profile in profiles.yaml gives them.",
    )
    _add_notebooks_option(listing)
    listing.set_defaults(handler=_course_list)

    build = actions.add_parser(
        "build",
        help="write the student and instructor versions of the notebooks",
        description="Build the course from its source notebooks: the student version (solutions "
        "replaced by NotImplementedError stubs, hints kept) and the instructor version (solutions in, "
        "under a collapsed 'Solution' heading), into OUT/student/ and OUT/instructor/. Without "
        "--student or --instructor, both.",
    )
    build.add_argument("--student", action="store_true", help="build the student version")
    build.add_argument("--instructor", action="store_true", help="build the instructor version")
    build.add_argument("--out", default="build/course", metavar="DIR", help="output folder (default: build/course)")
    _add_notebooks_option(build)
    build.set_defaults(handler=_course_build)

    site = actions.add_parser(
        "site",
        help="write the static course site (the course map and the executed chapters' pages)",
        description="Write an offline HTML site: OUT/index.html is the course map (notebooks/README.md), "
        "linking the chapters' pages copied from HTML (written by `mmelkit course run`).",
    )
    site.add_argument("--html", default="build/html", metavar="DIR", help="chapter pages (default: build/html)")
    site.add_argument("--out", default="build/site", metavar="DIR", help="output folder (default: build/site)")
    _add_notebooks_option(site)
    site.set_defaults(handler=_course_site)


def _add_notebooks_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--notebooks",
        metavar="DIR",
        default=None,
        help="another notebooks folder (default: the course's own)",
    )


def _timeout(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the timeout must not be negative")
    return value or None


def _course_run(args: argparse.Namespace) -> int:
    from mmelkit.course import run_course

    results = run_course(
        profile=args.profile,
        out_dir=args.out,
        notebooks=args.only,
        html=args.html,
        kernel_name=args.kernel,
        progress=not args.quiet,
        timeout=args.timeout,
        notebooks_path=args.notebooks,
    )
    total = sum(r.seconds for r in results)
    print(f"{len(results)} notebook(s) ran under profile {results[0].profile!r} in {total:.1f} s:")
    for result in results:
        print(f"  {result.name:<30} {result.seconds:6.1f} s  {result.path}")
        if result.html is not None:
            print(f"  {'':<30} {'':>8}  {result.html}")
    return EXIT_OK


def _course_build(args: argparse.Namespace) -> int:
    from mmelkit.course import course_notebooks
    from mmelkit.course_build import VERSIONS, CourseBuildError, build_course, find_exercises

    versions = [v for v in VERSIONS if getattr(args, v)] or list(VERSIONS)
    try:
        written = build_course(versions, out_dir=args.out, notebooks_path=args.notebooks)
    except CourseBuildError as error:
        print(f"mmelkit course build: {error}", file=sys.stderr)
        return EXIT_USAGE
    for path in course_notebooks(args.notebooks):
        print(f"  {path.name:<30} {len(find_exercises(path))} exercise(s)")
    for version, paths in written.items():
        print(f"{version}: {len(paths)} notebook(s) in {Path(args.out) / version}")
    return EXIT_OK


def _course_site(args: argparse.Namespace) -> int:
    from mmelkit.course_site import build_site

    try:
        pages = build_site(args.html, args.out, args.notebooks)
    except FileNotFoundError as error:
        print(f"mmelkit course site: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"course site: {pages[0]} and {len(pages) - 1} chapter page(s) in {Path(args.out)}")
    return EXIT_OK


def _course_list(args: argparse.Namespace) -> int:
    from mmelkit.course import course_notebooks, describe_parameters, load_profiles, resolve_profile

    notebooks = course_notebooks(args.notebooks)
    profiles = load_profiles(args.notebooks)
    auto = resolve_profile("auto")
    names = ", ".join(profiles) or "none"
    print(f"profiles: {names} ('auto' means {auto} on this machine)")
    if not notebooks:
        print("no course notebooks (NN_*.ipynb)")
        return EXIT_OK
    for path in notebooks:
        title = _title(path)
        print()
        print(f"{path.name}" + (f": {title}" if title else ""))
        parameters = describe_parameters(path)
        if not parameters:
            print("    (no parameters)")
            continue
        rows = [["parameter", "default", *profiles, "description"]]
        for p in parameters:
            settings = [profiles[name].get(path.stem, {}) for name in profiles]
            values = [repr(s[p.name]) if p.name in s else "" for s in settings]
            rows.append([p.name, repr(p.default) if p.literal else p.source, *values, p.help])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("    " + "  ".join([*cells, row[-1]]).rstrip())
    return EXIT_OK


def _title(path: Path) -> str:
    """The first markdown heading of a notebook, without the #s."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


# -- mmelkit train clip / mmelkit eval clip --------------------------------------------------------
def _add_train(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "train",
        help="train models: the embedded scene-world CLIP, explanation-guided classifiers (MEGL)",
        description="Training commands. `train clip` trains (or resumes) the embedded scene-world CLIP; "
        "`train megl` trains and compares explanation-guided configurations on the shortcut task.",
    )
    parser.set_defaults(handler=_usage(parser))
    what = parser.add_subparsers(title="what", metavar="WHAT")
    clip = what.add_parser(
        "clip",
        help="contrastive training of the scene-world CLIP (resumable)",
        description="Train the embedded CLIP on the scene world. Checkpoints go to OUT/last.pt every "
        "--checkpoint-every steps, and Ctrl-C stops after the current step with a checkpoint of it; running "
        "again with the same OUT resumes. --export writes the "
        "result, its measured quality and a model card to data/models/ (what load_model('scene-clip') reads).",
    )
    from mmelkit.training.clip_trainer import ClipTrainConfig

    defaults = ClipTrainConfig()
    clip.add_argument("--out", default="build/train/scene-clip", metavar="DIR", help="run folder (default: %(default)s)")
    clip.add_argument("--steps", type=int, default=defaults.steps, help="total optimiser steps (default: %(default)s)")
    clip.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    clip.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: %(default)s)")
    clip.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="(default: %(default)s)")
    clip.add_argument("--seed", type=int, default=defaults.init_seed, help="initialisation seed (default: %(default)s)")
    clip.add_argument("--data-seed", type=int, default=defaults.data_seed, help="scene stream seed (default: %(default)s)")
    clip.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="(default: %(default)s)")
    clip.add_argument("--workers", type=int, default=defaults.workers, help="data loader processes (default: %(default)s)")
    clip.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    clip.add_argument("--init-from", default=None, metavar="WEIGHTS",
                      help="start from these weights (.safetensors or last.pt) instead of a random init")
    clip.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    clip.add_argument("--export", action="store_true", help="evaluate and export to data/models/ when done")
    clip.add_argument("--quiet", action="store_true", help="no progress bar")
    clip.set_defaults(handler=_train_clip)
    _add_train_megl(what)
    _add_train_vlm(what)


def _train_clip(args: argparse.Namespace) -> int:
    from mmelkit.training.clip_trainer import ClipTrainConfig, train_clip

    try:
        config = ClipTrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            init_seed=args.seed,
            data_seed=args.data_seed,
            checkpoint_every=args.checkpoint_every,
            workers=args.workers,
            init_from=args.init_from,
        )
        _check_device(args.device)  # before any run folder or data exists
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"mmelkit train clip: {error}", file=sys.stderr)
        return EXIT_USAGE
    max_seconds = args.max_minutes * 60 if args.max_minutes is not None else None
    checkpoint = train_clip(config, args.out, device=args.device, progress=not args.quiet, max_seconds=max_seconds)
    print(f"checkpoint: {checkpoint}")
    if args.export:
        return _export_clip(checkpoint, args.device)
    return EXIT_OK


def _export_clip(checkpoint: Path, device: str) -> int:
    import mmelkit
    from mmelkit.training.clip_eval import evaluate_scene_clip
    from mmelkit.training.export import MODELS_DIR, export_clip

    # Weights first, so that the evaluation measures exactly what ships (fp16) through the zoo.
    export_clip(checkpoint, out_dir=MODELS_DIR)
    quality = evaluate_scene_clip(mmelkit.load_model("scene-clip", device=device))
    path = export_clip(checkpoint, out_dir=MODELS_DIR, quality=quality.as_dict())
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)\n{quality}")
    return EXIT_OK


def _add_train_megl(what: Subparsers) -> None:
    from mmelkit.training.megl.trainer import PRESET_NOTES, PROFILES

    megl = what.add_parser(
        "megl",
        help="explanation-guided training (plain, RRR, GRADIA, HAICS, MEGL, ablations) and its results table",
        description="Train each configuration for each seed on the scene world's shortcut task (resumable: "
        "runs go to OUT/<config>/seed-<s>/, finished runs are loaded, Ctrl-C checkpoints the current step), "
        "then evaluate them and print biased "
        "and de-biased accuracy, explanation IoU / pointing game against the masks and rationale quality "
        "(BLEU-4, ROUGE-L, CLIPScore), mean ± std over seeds. Also written to OUT/table.md, runs.csv, summary.json.",
        epilog="configurations:\n" + "\n".join(f"  {name:<15} {note}" for name, note in PRESET_NOTES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    megl.add_argument("--configs", nargs="+", default=["plain", "megl"], metavar="NAME",
                      help="configurations to train (default: plain megl; 'all' for every one)")
    megl.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S", help="(default: 0 1 2)")
    megl.add_argument("--profile", choices=sorted(PROFILES), default="cpu",
                      help="sizes: cpu (32 px, 1000 steps; default) or gpu (64 px, 3000 steps)")
    megl.add_argument("--out", default="build/train/megl", metavar="DIR", help="run folder (default: %(default)s)")
    megl.add_argument("--eval-size", type=int, default=500, help="images per test split (default: %(default)s)")
    megl.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    megl.add_argument("--quiet", action="store_true", help="no progress bars")
    overrides = megl.add_argument_group("overrides (applied to every configuration)")
    for flag, kind, text in (
        ("--steps", int, "optimiser steps"), ("--image-size", int, "image side in pixels"),
        ("--train-size", int, "training images"), ("--width", int, "classifier width"),
        ("--batch-size", int, "batch size"), ("--lr", float, "learning rate"),
        ("--arch", str, "classifier: cnn or vit"), ("--cue", str, "shortcut: patch or tint"),
        ("--spurious", float, "share of training images whose cue agrees with the label"),
        ("--mask-fraction", float, "share of training images that keep their mask"),
        ("--visual-weight", float, "l_v on L_att"), ("--text-weight", float, "l_t on L_txt"),
        ("--tsv-weight", float, "l_s on L_tsv"), ("--dc-weight", float, "l_d on L_dc"),
    ):
        overrides.add_argument(flag, type=kind, default=None, help=text)
    megl.set_defaults(handler=_train_megl)


def _train_megl(args: argparse.Namespace) -> int:
    from mmelkit.training.megl import PRESETS, megl_study, preset
    from mmelkit.training.megl.trainer import PROFILES

    names = list(PRESETS) if args.configs == ["all"] else args.configs
    fields = ("steps", "image_size", "train_size", "width", "batch_size", "lr", "arch", "cue", "spurious",
              "mask_fraction", "visual_weight", "text_weight", "tsv_weight", "dc_weight")
    overrides = {**PROFILES[args.profile], **{f: getattr(args, f) for f in fields if getattr(args, f) is not None}}
    try:
        configs = [preset(name, **overrides) for name in names]
        if len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"seeds repeat: {args.seeds}")
        if args.eval_size < 1:
            raise ValueError(f"--eval-size must be at least 1; got {args.eval_size}")
        _check_device(args.device)  # before any run folder or data exists
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"mmelkit train megl: {error}", file=sys.stderr)
        return EXIT_USAGE
    result = megl_study(configs, args.seeds, out_dir=args.out, eval_size=args.eval_size, device=args.device,
                        progress=not args.quiet)
    print(result.table())
    print(f"\nwritten to {args.out}/ (table.md, runs.csv, summary.json)")
    return EXIT_OK


# -- mmelkit train vlm / mmelkit eval vlm --------------------------------------------------------
def _add_train_vlm(what: Subparsers) -> None:
    from mmelkit.training.vlm_trainer import PRESETS, VlmTrainConfig

    defaults = VlmTrainConfig()
    vlm = what.add_parser(
        "vlm",
        help="train the embedded generative VLM scene-llava on scene-world questions (resumable)",
        description="Train (or resume) a scene-llava model: a Hugging Face LLaVA (CLIP vision tower from "
        "scene-clip, projector, small Llama decoder) taught scene-world questions and answers. A checkpoint "
        "goes to OUT/last.pt after every epoch and when Ctrl-C stops the run (after the current step); running "
        "again with the same OUT resumes (a larger --steps "
        "extends a finished run). --export evaluates the result on held-out scenes and writes the model "
        "folder data/models/<preset>/ that load_vlm('<preset>') opens.",
        epilog="presets: " + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items())
                                       for name, cfg in PRESETS.items()),
    )
    vlm.add_argument("--preset", choices=sorted(PRESETS), default="scene-llava", help="(default: %(default)s)")
    vlm.add_argument("--out", default=None, metavar="DIR", help="run folder (default: build/train/<preset>)")
    vlm.add_argument("--steps", type=int, help="total optimiser steps (default: the preset's)")
    vlm.add_argument("--batch-size", type=int, help=f"(default: {defaults.batch_size})")
    vlm.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    vlm.add_argument("--warmup-steps", type=int, help=f"(default: {defaults.warmup_steps})")
    vlm.add_argument("--co-occurrence", type=float,
                     help="probability that an object brings its partner along (default: the preset's)")
    vlm.add_argument("--init-from", metavar="WEIGHTS",
                     help="start from an exported model folder or a last.pt (default: the preset's)")
    vlm.add_argument("--whole-couples", action="store_const", const=True, default=None,
                     help="co-occurring scenes are made of whole couples only (default: the preset's)")
    vlm.add_argument("--implied-partner", type=float,
                     help="probability that an existence question asks about the absent partner of an object "
                     "that is there, answered 'yes' (default: the preset's)")
    vlm.add_argument("--turns", type=int,
                     help="questions per image, asked as one conversation (default: the preset's, else 1)")
    vlm.add_argument("--kind-weights", metavar="KIND=W,...",
                     help="relative frequency of question kinds, e.g. existence=1,attribute=2,count=2,"
                     "relation=2,caption=1 (default: the preset's)")
    vlm.add_argument("--attribute-styles", metavar="STYLE=W,...",
                     help="relative frequency of attribute questions by style: colour (of a shape), shape (of a "
                     "colour), size, e.g. colour=0.7,shape=0.15,size=0.15 (default: equal)")
    vlm.add_argument("--vision-lr-scale", type=float,
                     help=f"vision tower learning rate relative to --lr (default: {defaults.vision_lr_scale})")
    vlm.add_argument("--seed", type=int, help=f"initialisation seed (default: {defaults.init_seed})")
    vlm.add_argument("--data-seed", type=int, help=f"question seed (default: {defaults.data_seed})")
    vlm.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (default: auto)")
    vlm.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    vlm.add_argument("--export", action="store_true", help="evaluate and export to data/models/<preset>/ when done")
    vlm.add_argument("--force", action="store_true", help="let --export replace an existing model folder")
    vlm.add_argument("--quiet", action="store_true", help="no progress bar")
    vlm.set_defaults(handler=_train_vlm)


def _named_weights(text: str, flag: str = "--kind-weights") -> dict[str, float]:
    """``existence=1,relation=2`` -> {"existence": 1.0, "relation": 2.0}."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        try:
            weights[kind.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{flag} expects NAME=WEIGHT pairs separated by commas; got {part!r}")
    return weights


def _train_vlm(args: argparse.Namespace) -> int:
    from mmelkit.training.vlm_export import MODELS_DIR
    from mmelkit.training.vlm_trainer import PRESETS, VlmTrainConfig, train_vlm

    settings = dict(PRESETS[args.preset])
    given = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
             "co_occurrence": args.co_occurrence, "whole_couples": args.whole_couples,
             "implied_partner": args.implied_partner, "turns": args.turns, "vision_lr_scale": args.vision_lr_scale,
             "init_from": args.init_from, "init_seed": args.seed, "data_seed": args.data_seed}
    settings.update({key: value for key, value in given.items() if value is not None})
    try:
        if args.kind_weights is not None:
            settings["kind_weights"] = _named_weights(args.kind_weights)
        if args.attribute_styles is not None:
            settings["attribute_styles"] = _named_weights(args.attribute_styles, "--attribute-styles")
        config = VlmTrainConfig(**settings)
        if args.max_minutes is not None and args.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive; got {args.max_minutes}")
        _check_device(args.device)  # before any run folder or data exists
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"mmelkit train vlm: {error}", file=sys.stderr)
        return EXIT_USAGE
    target = MODELS_DIR / args.preset
    if args.export and target.exists() and not args.force:
        print(f"mmelkit train vlm: {target} exists; add --force to replace it (nothing was trained)", file=sys.stderr)
        return EXIT_USAGE
    out = args.out or f"build/train/{args.preset}"
    try:
        checkpoint = train_vlm(config, out, device=args.device, progress=not args.quiet,
                               max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    except CorruptFileError:  # a damaged checkpoint is a failure (exit 1), as in the other trainers
        raise
    except (ValueError, FileNotFoundError) as error:  # a checkpoint of another config in OUT, no init weights
        print(f"mmelkit train vlm: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"checkpoint: {checkpoint}")
    if args.export:
        return _export_vlm(checkpoint, args.preset, args.device, args.quiet)
    return EXIT_OK


def _export_vlm(checkpoint: Path, name: str, device: str, quiet: bool) -> int:
    import mmelkit
    from mmelkit.training.vlm_eval import evaluate_vlm
    from mmelkit.training.vlm_export import MODELS_DIR, export_vlm, write_quality

    # Weights first, so that the evaluation measures exactly what ships, loaded through the zoo.
    folder = export_vlm(checkpoint, name=name, out_dir=MODELS_DIR, overwrite=True)
    quality = evaluate_vlm(mmelkit.load_vlm(name, device=device), progress=not quiet)
    write_quality(folder, quality.as_dict())
    print(f"exported {folder}\n{quality.table()}")
    return EXIT_OK


def _add_eval(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "eval",
        help="measure a model: the scene-world CLIP's or VLM's quality on held-out scenes",
        description="Evaluation commands. `eval clip` reports zero-shot naming, retrieval Recall@1 and "
        "relation-vs-swapped accuracy on held-out scenes (the figures of the model card); `eval vlm` "
        "asks a generative VLM held-out questions and reports accuracy per kind, POPE and CHAIR.",
    )
    parser.set_defaults(handler=_usage(parser))
    what = parser.add_subparsers(title="what", metavar="WHAT")
    clip = what.add_parser("clip", help="quality of a CLIP on held-out scene-world scenes")
    clip.add_argument("--model", default="scene-clip", help="any load_model spec (default: %(default)s)")
    clip.add_argument("--device", default="auto")
    clip.add_argument("--json", action="store_true", help="print the figures as JSON")
    clip.set_defaults(handler=_eval_clip)
    pointing = what.add_parser(
        "pointing",
        help="pointing game of explanation methods on scene-world scenes with exact masks",
        description="Explain one object caption per scene and count how often each method's maximum "
        "lies on the named object's mask (with the usual 15 px at 224 px tolerance, scaled).",
    )
    pointing.add_argument("--model", default="scene-clip", help="any load_model spec (default: %(default)s)")
    pointing.add_argument("--methods", default="grad_eclip,mmel",
                          help="comma-separated method names, or 'all' image-side methods (default: %(default)s)")
    pointing.add_argument("--scenes", type=int, default=200, help="number of scenes (default: %(default)s)")
    pointing.add_argument("--objects", default="1-4", help="objects per scene, MIN-MAX (default: %(default)s)")
    pointing.add_argument("--seed", type=int, default=None, help="scene seed (default: a reserved evaluation seed)")
    pointing.add_argument("--batch-size", type=int, default=32)
    pointing.add_argument("--device", default="auto")
    pointing.add_argument("--csv", metavar="FILE", help="also write the per-scene hits to this CSV file")
    pointing.add_argument("--quiet", action="store_true", help="no progress bar")
    pointing.set_defaults(handler=_eval_pointing)
    vlm = what.add_parser(
        "vlm",
        help="quality of a generative VLM on held-out scene-world questions, POPE and CHAIR",
        description="Ask a VLM held-out scene-world questions and print accuracy per question kind "
        "(existence, attribute, count, relation, caption), POPE accuracy / precision / recall / F1 / "
        "yes-ratio per split (random, popular, adversarial) and CHAIR_i / CHAIR_s on captions, as tables "
        "(or JSON), with the targets each figure is held to.",
    )
    vlm.add_argument("--model", default="scene-llava", help="any load_vlm spec (default: %(default)s)")
    vlm.add_argument("--per-kind", type=int, default=200, help="questions per kind (default: %(default)s)")
    vlm.add_argument("--pope-images", type=int, default=100, help="images POPE probes (default: %(default)s)")
    vlm.add_argument("--caption-images", type=int, default=200, help="images captioned for CHAIR (default: %(default)s)")
    vlm.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    vlm.add_argument("--device", default="auto")
    vlm.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-' prints JSON instead of tables)")
    vlm.add_argument("--quiet", action="store_true", help="no progress bar")
    vlm.set_defaults(handler=_eval_vlm)


def _eval_clip(args: argparse.Namespace) -> int:
    import json

    from mmelkit.training.clip_eval import evaluate_scene_clip

    model = _load_clip(args.model, args.device, "eval clip")
    if model is None:
        return EXIT_USAGE
    quality = evaluate_scene_clip(model)
    print(json.dumps(quality.as_dict(), indent=2) if args.json else quality)
    return EXIT_OK


def _eval_vlm(args: argparse.Namespace) -> int:
    import mmelkit
    from mmelkit.training.vlm_eval import evaluate_vlm

    for flag, value in (("--per-kind", args.per_kind), ("--pope-images", args.pope_images),
                        ("--caption-images", args.caption_images), ("--batch-size", args.batch_size)):
        if value < 1:
            print(f"mmelkit eval vlm: {flag} must be at least 1; got {value}", file=sys.stderr)
            return EXIT_USAGE
    try:
        vlm = mmelkit.load_vlm(args.model, device=args.device)
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # a bad spec, folder or device
        print(f"mmelkit eval vlm: {error}", file=sys.stderr)
        return EXIT_USAGE
    quality = evaluate_vlm(vlm, per_kind=args.per_kind, pope_images=args.pope_images,
                           caption_images=args.caption_images, batch_size=args.batch_size,
                           progress=not args.quiet)
    if args.json == "-":
        print(quality.to_json())
        return EXIT_OK
    print(quality.table())
    print("\ntargets: " + ", ".join(f"{name} {'met' if t['met'] else 'MISSED'} ({t['measured']:.3f} vs {t['target']})"
                                    for name, t in quality.targets().items()))
    if args.json:
        Path(args.json).write_text(quality.to_json() + "\n")
        print(f"written to {args.json}")
    return EXIT_OK


def _eval_pointing(args: argparse.Namespace) -> int:
    from mmelkit.methods.base import REGISTRY, image_methods
    from mmelkit.metrics.scene_pointing import POINTING_SEED, scene_pointing_game

    if args.methods == "all":
        methods = image_methods("clip")
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in REGISTRY]
        if unknown:
            hints = "".join(did_you_mean(m, REGISTRY) for m in unknown)
            print(f"unknown method(s) {unknown};{hints} known: {', '.join(sorted(REGISTRY))}", file=sys.stderr)
            return EXIT_USAGE
    try:
        low, high = (int(x) for x in args.objects.split("-"))
    except ValueError:
        print(f"--objects must look like 1-4; got {args.objects!r}", file=sys.stderr)
        return EXIT_USAGE
    model = _load_clip(args.model, args.device, "eval pointing")
    if model is None:
        return EXIT_USAGE
    try:
        study = scene_pointing_game(
            model, methods, num_scenes=args.scenes, objects=(low, high),
            seed=POINTING_SEED if args.seed is None else args.seed, batch_size=args.batch_size,
            progress=not args.quiet,
        )
    except ValueError as error:  # bad counts; a method that fails is a row of the study, not an error
        print(f"mmelkit eval pointing: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(study)
    if args.csv:
        study.samples.to_csv(args.csv, index=False)
    return EXIT_OK


# -- mmelkit bench -------------------------------------------------------------------------------
def _add_bench(commands: Subparsers) -> None:
    parser = commands.add_parser(
        "bench",
        help="score explanation methods: methods x datasets x metrics -> tables and plots",
        description="Explain samples of each dataset with each method and score the maps (deletion / "
        "insertion AUC, confidence drop / increase, the retrieval protocol, pointing game, energy pointing "
        "game, IoU, AUROC, the randomisation check). Writes results.csv (tidy), samples.csv, table.md, "
        "curves.json and figures.html to --out; finished cells are cached there and skipped on a rerun, so "
        "an interrupted run (Ctrl-C, a killed worker) resumes where it stopped. "
        "Under torchrun each process takes a shard of the samples.",
    )
    parser.add_argument("--preset", choices=["mmel-paper", "localisation", "clutter"],
                        help="start from a preset (the options below override it)")
    parser.add_argument("--model", default="scene-clip", help="any load_model spec (default: %(default)s)")
    parser.add_argument("--vlm", metavar="SPEC", help="score a generative VLM's answer maps instead (any load_vlm "
                        "spec, e.g. scene-llava): pointing game, IoU, deletion AUC and the randomisation check on "
                        "held-out questions about one object; --methods, --samples, --batch-size, --steps, --seed apply")
    parser.add_argument("--methods", help="comma-separated method names, or 'all' image-side methods")
    parser.add_argument("--datasets", help="comma-separated: scenes, scenes:MIN-MAX, photos, coco:ROOT, "
                        "coco-captions:ROOT (default: scenes)")
    parser.add_argument("--metrics", help="comma-separated metric names or groups: faithfulness, retrieval, "
                        "localisation, sanity, all (default: all but sanity)")
    parser.add_argument("--samples", type=int, help="samples per dataset (default: 64, presets their own)")
    parser.add_argument("--batch-size", type=int, help="pairs explained per batch (default: 16)")
    parser.add_argument("--perturbation-batch", type=int, help="perturbed images per forward pass (default: 256)")
    parser.add_argument("--steps", type=int, help="deletion / insertion steps (default: 100)")
    parser.add_argument("--score", choices=["cosine", "softmax", "recall"], help="deletion / insertion score")
    parser.add_argument("--seed", type=int, help="sample and metric seed (default: 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="build/bench", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="recompute cached cells")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from mmelkit.bench import BenchConfig, preset_config, run_bench
    from mmelkit.bench.distributed import init_from_environment, world
    from mmelkit.bench.presets import clutter_table, paper_table, relative_to_grad_eclip
    from mmelkit.methods.base import image_methods

    def listed(text: str | None) -> list[str] | None:
        return None if text is None else [t.strip() for t in text.split(",") if t.strip()]

    methods = listed(args.methods)
    if args.vlm is not None:
        return _bench_vlm(args, methods)
    if methods == ["all"]:
        methods = image_methods("clip")
    overrides = {"methods": methods, "datasets": listed(args.datasets), "metrics": listed(args.metrics),
                 "samples": args.samples, "batch_size": args.batch_size,
                 "perturbation_batch": args.perturbation_batch, "steps": args.steps, "score": args.score,
                 "seed": args.seed}
    try:
        if args.preset:
            config = preset_config(args.preset, **overrides)
        else:
            if methods is None:
                print("mmelkit bench: give --methods (or a --preset)", file=sys.stderr)
                return EXIT_USAGE
            config = BenchConfig(**{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, TypeError) as error:
        print(f"mmelkit bench: {error}", file=sys.stderr)
        return EXIT_USAGE
    started, device = init_from_environment(args.device)
    try:
        model = _load_clip(args.model, device, "bench")
        if model is None:
            return EXIT_USAGE
        try:
            result = run_bench(model, config, out=args.out, progress=not args.quiet, use_cache=args.cache)
        except KeyboardInterrupt:
            if world()[0] == 0:
                print(f"mmelkit bench: interrupted; the finished cells are kept in {Path(args.out) / 'cells'} and "
                      "running the same command again computes only the others", file=sys.stderr)
            raise
        if world()[0] == 0:
            print(result.to_markdown())
            if args.preset == "mmel-paper":
                print("\nIn the MMEL paper's layout (the paper's rows: real CLIP on MSCOCO, for reference):")
                print(paper_table(result).to_string(float_format=lambda v: f"{v:.4g}"))
                relative = relative_to_grad_eclip(result)
                if not relative.empty:
                    print("\nMMEL against Grad-ECLIP (relative change of the AUC):")
                    percent = {c: (lambda v: f"{v:+.1%}") for c in ("measured change", "paper's claim")}
                    print(relative.to_string(formatters=percent, float_format=lambda v: f"{v:.4f}"))
            if args.preset == "clutter":
                for metric in config.metrics:
                    print(f"\n{metric} by objects per scene:")
                    print(clutter_table(result, metric).to_string(float_format=lambda v: f"{v:.3f}"))
            print(f"\nwritten to {args.out}/ (results.csv, samples.csv, table.md, curves.json, figures.html)")
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return EXIT_OK


def _bench_vlm(args: argparse.Namespace, methods: list[str] | None) -> int:
    import mmelkit
    from mmelkit._io import atomic_write_text
    from mmelkit.bench.vlm import VlmBenchConfig, run_vlm_bench
    from mmelkit.methods.base import image_methods

    given = {"methods": image_methods("vlm") if methods in (None, ["all"]) else methods, "samples": args.samples,
             "batch_size": args.batch_size, "deletion_steps": args.steps, "seed": args.seed}
    if args.preset or args.datasets or args.metrics:
        print("mmelkit bench: --preset, --datasets and --metrics apply to CLIP models, not to --vlm", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = VlmBenchConfig(**{k: v for k, v in given.items() if v is not None})
        vlm = mmelkit.load_vlm(args.vlm, device=args.device)
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # a bad spec, folder or device
        print(f"mmelkit bench: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    try:
        result = run_vlm_bench(vlm, config, progress=not args.quiet, out=out, use_cache=args.cache)
    except KeyboardInterrupt:
        print(f"mmelkit bench: interrupted; the finished methods are kept in {out / 'vlm_cells'} and running the "
              "same command again computes only the others", file=sys.stderr)
        raise
    atomic_write_text(out / "vlm_table.md", result.to_markdown() + "\n")
    atomic_write_text(out / "vlm_items.csv", result.per_item.to_csv(index=False))
    print(result.to_markdown())
    print(f"\nwritten to {out}/ (vlm_table.md, vlm_items.csv)")
    return EXIT_OK


# -- plumbing ------------------------------------------------------------------------------------
def _check_device(device: str) -> Any:
    """``--device`` checked (unknown names, CUDA asked for where there is none) before a command
    creates anything."""
    from mmelkit.models.loading import resolve_device as resolve

    return resolve(device)


def _load_clip(spec: str, device: Any, command: str) -> Any:
    """``load_model(spec)``, or None after printing why a bad ``--model`` / ``--device`` cannot load
    (a usage error: exit 2, not a traceback). A damaged checkpoint goes on to :func:`main`."""
    import mmelkit

    try:
        return mmelkit.load_model(spec, device=device)
    except CorruptFileError:
        raise
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"mmelkit {command}: {error}", file=sys.stderr)
        return None


COMMANDS: list[Callable[[Subparsers], None]] = [_add_course, _add_models, _add_train, _add_eval, _add_bench]


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return show


def build_parser() -> argparse.ArgumentParser:
    from mmelkit import __version__

    parser = argparse.ArgumentParser(
        prog="mmelkit",
        description="mmelkit: a workbench for explainable multimodal (CLIP-style) models.",
    )
    parser.add_argument("--version", action="version", version=f"mmelkit {__version__}")
    parser.set_defaults(handler=_usage(parser))
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mmelkit`` command line; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CourseError as error:
        print(f"mmelkit: {error}", file=sys.stderr)
        return EXIT_FAILED
    except CourseConfigError as error:
        print(f"mmelkit: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptFileError as error:  # a damaged checkpoint: the message says how to recover
        print(f"mmelkit: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as error:
        # a trainer that stopped on a signal says where its checkpoint is, and which signal it was
        print(f"mmelkit: {error}" if str(error) else "mmelkit: interrupted", file=sys.stderr)
        return 128 + getattr(error, "signum", 2)  # 130 for Ctrl-C (SIGINT), 143 for SIGTERM
