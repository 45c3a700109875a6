"""`keras-vit variants`: the variant table."""

from keras_vit.variants import variants


def format_table(rows):
    header = f"{'variant':<8} {'width':>5} {'depth':>5} {'heads':>5} {'mlp':>5} {'params':>13}"
    lines = [header] + [
        f"{r['name']:<8} {r['width']:>5} {r['depth']:>5} {r['heads']:>5} {r['mlp_dim']:>5} "
        + (f"{r['params']:>13,}" if r["params"] is not None else f"{'-':>13}") for r in rows]
    if any(r["params"] is None for r in rows):
        lines.append("- : the patch size does not divide the image size")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)


def run(args):
    print(format_table(variants(args.image_size, args.num_classes)))
    return 0
