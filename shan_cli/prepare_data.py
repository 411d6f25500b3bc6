"""Make data sets in the project's format: convert SCAN precomp, extract from images,
generate, validate.

    shan data precomp SRC --out DEST [--splits train dev test] [--vocab V]
    shan data images IMAGES --captions CAPTIONS --out DEST [--extractor grid]
    shan data synthetic --out DEST [--train 4000 --dev 500 --test 1000]
    shan data validate PATH

DEST and PATH are local folders or s3:// URLs (AWS_ENDPOINT_URL and the AWS variables apply).
DEST must be new, an empty folder, or (with --overwrite) a data set: a location holding other
files is refused, and the old data set stays valid until the new one is complete.
"""

from __future__ import annotations

import argparse
import json

from shan.data.format import DTYPES
from shan.data.precomp import convert_precomp
from shan.data.synthetic import DEMO_IMAGES, generate_synthetic
from shan.data.validate import format_summary, validate
from shan.extract import ON_BAD, convert_images
from shan.features import ARCHS, EXTRACTORS
from shan_cli.argtypes import at_least, positive

OVERWRITE = "replace the data set at --out (only a data set: its card present)"
DTYPE = "region features stored as (default float16)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True, help="what to do (COMMAND --help)")
    c = subcommand(sub, "precomp", "convert a SCAN precomp folder")
    c.add_argument("src", help="folder with {split}_ims.npy and {split}_caps.txt")
    c.add_argument("--out", required=True, help="destination folder or s3:// URL")
    c.add_argument("--splits", nargs="+", help="splits to convert (default: all found)")
    c.add_argument("--vocab", help="SCAN vocab json (default: the folder's, else built)")
    c.add_argument("--name", help="data set name (default: the folder's name)")
    c.add_argument("--dtype", choices=list(DTYPES), default="float16", help=DTYPE)
    c.add_argument("--chunk-rows", type=at_least(1), default=256, help="images per chunk in memory")
    c.add_argument("--rows-per-file", type=at_least(1), default=2000, help="images per shard")
    c.add_argument("--min-count", type=at_least(1), default=4, help="word count for a built vocab")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    images_parser(sub)
    g = subcommand(sub, "synthetic", "generate a synthetic data set")
    g.add_argument("--out", required=True, help="destination folder or s3:// URL")
    for split, n in DEMO_IMAGES.items():  # the demo data set's sizes
        g.add_argument(f"--{split}", type=at_least(0), default=n, help=f"{split} images")
    g.add_argument("--regions", type=at_least(1), default=16, help="regions per image")
    g.add_argument("--feature-dim", type=at_least(1), default=64, help="region feature size")
    g.add_argument("--concepts", type=at_least(5), default=120, help="made-up nouns (5..2000)")
    g.add_argument("--captions-per-image", type=at_least(1), default=5, help="captions per image")
    g.add_argument("--seed", type=at_least(0), default=0, help="random seed")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    v = subcommand(sub, "validate", "check a data set and print a summary")
    v.add_argument("path", help="data set folder or s3:// URL")
    v.add_argument("--json", action="store_true", help="print the summary as json")
    return p


def subcommand(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with ``text`` (and which takes no abbreviations)."""
    return sub.add_parser(name, help=text, description=text, allow_abbrev=False)


IMAGES_HELP = """\
Extract region features from images (a folder or an s3:// prefix of JPEG and PNG files) on a
Ray Data pipeline: read and decode tasks feed an actor pool (one actor per GPU; on CPUs,
fractional-CPU actors) running the extractor. Writes features, boxes, each image's size and
file (so evaluation draws attention over the real image), and a card, as every writer does.

Captions (--captions): a .csv with columns image,caption[,split]; a .jsonl of objects
{"image", "caption"[, "split"]}; or a SCAN caption .txt with --image-list (one image file a
line; image i's captions on lines c*i .. c*i+c-1). Splits: a split column names each row's
split; a file without one goes whole to --split (default train). --split with a split column
is refused.

Extractors: grid (default): a ResNet's last feature map pooled to --grid x --grid cells, each
a region with its box, 2048-d (plain PyTorch; --weights a torchvision resnet50/101/152 .pth).
detector: a torchvision Faster R-CNN's top boxes after class-agnostic NMS (--regions 36, or
0 for the adaptive 10..100 above --score-threshold), RoI-pooled 2048-d; needs torchvision.
--weights random builds either without a file (trials, tests).

A bad image (fails to decode, empty, smaller than --min-side) stops the job naming it
(--on-bad-image stop), or is left out with its captions and listed in DEST/bad_images.json
(skip). A caption naming a missing image is an error naming it.
"""


def images_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser(
        "images",
        help="extract features from images and captions",
        description=IMAGES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    i.add_argument("images", help="folder or s3:// prefix holding the image files")
    i.add_argument("--captions", required=True, help="captions: .csv, .jsonl or SCAN .txt")
    i.add_argument("--image-list", help="with a SCAN .txt: one image file a line")
    i.add_argument("--split", help="split of every row, for files without a split column")
    i.add_argument("--out", required=True, help="destination folder or s3:// URL")
    i.add_argument("--extractor", choices=EXTRACTORS, default="grid",
                   help="see above (default grid)")  # fmt: skip
    i.add_argument("--weights", default="random", help="torchvision .pth state dict or random")
    i.add_argument("--arch", choices=ARCHS,
                   default="resnet152", help="grid with --weights random")  # fmt: skip
    i.add_argument("--image-size", type=at_least(32), default=None,
                   help="grid: resized to N x N (448); detector: longer side (600)")  # fmt: skip
    i.add_argument("--grid", type=at_least(1), default=7, help="grid: cells a side")
    i.add_argument("--regions", type=at_least(0), default=36,
                   help="detector: boxes kept; 0: adaptive 10..100")  # fmt: skip
    i.add_argument("--score-threshold", type=positive(float), default=0.2,
                   help="detector, adaptive: boxes above this score")  # fmt: skip
    i.add_argument("--on-bad-image", choices=ON_BAD, default="stop",
                   help="see above (default stop)")  # fmt: skip
    i.add_argument("--min-side", type=at_least(1), default=32, help="smaller images are bad")
    i.add_argument("--batch-size", type=at_least(1), default=16, help="images per batch")
    i.add_argument("--actors", type=at_least(1), help="extractor actors (default: per GPU)")
    i.add_argument("--cpus-per-actor", type=positive(float), help="CPUs an actor (default: fitted)")
    i.add_argument("--gpus-per-actor", type=at_least(0.0, float),
                   help="GPUs an actor (default: 1 with GPUs)")  # fmt: skip
    i.add_argument("--local", action="store_true", help="no Ray: decode and extract here")
    i.add_argument("--vocab", help="SCAN vocab json (default: built from the train captions)")
    i.add_argument("--min-count", type=at_least(1), default=4, help="word count for a built vocab")
    i.add_argument("--name", help="data set name (default: the images folder's name)")
    i.add_argument("--dtype", choices=list(DTYPES), default="float16", help=DTYPE)
    i.add_argument("--rows-per-file", type=at_least(1), default=2000, help="images per shard")
    i.add_argument("--overwrite", action="store_true", help=OVERWRITE)


def run_images(args: argparse.Namespace) -> None:
    from shan.features import ExtractorSpec

    default_size = 600 if args.extractor == "detector" else 448
    spec = ExtractorSpec(
        name=args.extractor,
        weights=args.weights,
        arch=args.arch,
        size=args.image_size or default_size,
        grid=args.grid,
        regions=args.regions or None,
        score_threshold=args.score_threshold,
    )
    convert_images(
        args.images,
        args.captions,
        args.out,
        spec=spec,
        image_list=args.image_list,
        split=args.split,
        vocab_path=args.vocab,
        min_count=args.min_count,
        name=args.name,
        dtype=args.dtype,
        on_bad_image=args.on_bad_image,
        min_side=args.min_side,
        batch_size=args.batch_size,
        rows_per_file=args.rows_per_file,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        local=args.local,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "precomp":
        convert_precomp(
            args.src,
            args.out,
            splits=args.splits,
            vocab_path=args.vocab,
            name=args.name,
            dtype=args.dtype,
            chunk_rows=args.chunk_rows,
            rows_per_file=args.rows_per_file,
            min_count=args.min_count,
            overwrite=args.overwrite,
        )
        print(f"wrote {args.out}")
    elif args.command == "images":
        run_images(args)
    elif args.command == "synthetic":
        sizes = {"train": args.train, "dev": args.dev, "test": args.test}
        generate_synthetic(
            args.out,
            images={k: n for k, n in sizes.items() if n > 0},
            regions=args.regions,
            feature_dim=args.feature_dim,
            concepts=args.concepts,
            captions_per_image=args.captions_per_image,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"wrote {args.out}")
    else:
        summary = validate(args.path)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        print(f"{args.path}: valid")
    return 0
