"""`keras-vit variants`: the variant table."""

from keras_vit.cli._common import positive_int


def format_table(rows):
    header = f"{'variant':<8} {'width':>5} {'depth':>5} {'heads':>5} {'mlp':>5} {'params':>13}"
    lines = [header] + [
        f"{r['name']:<8} {r['width']:>5} {r['depth']:>5} {r['heads']:>5} {r['mlp_dim']:>5} "
        + (f"{r['params']:>13,}" if r["params"] is not None else f"{'-':>13}") for r in rows]
    if any(r["params"] is None for r in rows):
        lines.append("- : the patch size does not divide the image size")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--num-classes", type=positive_int, default=1000)


def run(args):
    from keras_vit.variants import variants  # pure Python: no TensorFlow

    print(format_table(variants(args.image_size, args.num_classes)))
    return 0
