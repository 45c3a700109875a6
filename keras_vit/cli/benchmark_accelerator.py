"""`keras-vit benchmark-accelerator`: ViT training throughput and MFU on the device the Keras
backend uses (keras_vit.benchmarks.accelerator); needs no TensorFlow."""

from keras_vit.cli._common import error


def add_arguments(parser):
    parser.add_argument("--variant", default="B/16", help="ViT variant (default B/16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the variant's)")
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="fit steps per timed call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after compiling")
    parser.add_argument("--precision", default="mixed_bfloat16",
                        choices=["mixed_bfloat16", "mixed_float16", "float32"])
    parser.add_argument("--matmul-size", type=int, default=8192,
                        help="side of the square matmuls that measure the peak")
    parser.add_argument("--peer", default="timm", choices=["timm", "none"],
                        help="also time timm's ViT of the same shape with PyTorch on the same "
                             "device, in its own process (default timm; Hugging Face's ViT "
                             "stands in where timm is missing)")
    parser.add_argument("--peer-compile", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile the peer (auto: on GPUs)")


def run(args):
    from keras_vit.benchmarks.accelerator import run_accelerator_benchmark

    try:
        r = run_accelerator_benchmark(args)
    except (ValueError, ImportError, RuntimeError) as err:
        error("benchmark-accelerator", err)
        return 2
    print(f"{r['variant']} {r['image_size']}px, batch {r['batch_size']}, {r['precision']}: "
          f"{r['images_per_second']:.1f} img/s ({r['ms_per_step']:.1f} ms/step, median of "
          f"{r['repeats']} calls of {r['steps']} steps)")
    print(f"model FLOPs: {r['gflop_per_image']:.4g} GFLOP/image (3x forward), "
          f"{r['achieved_tflops']:.4g} TFLOP/s = MFU {100 * r['mfu_measured']:.1f}% of the "
          f"measured {r['matmul_dtype']} matmul peak"
          + (f", {100 * r['mfu_datasheet']:.1f}% of the datasheet {r['datasheet_tflops']:.0f} "
             "TFLOP/s" if r["datasheet_tflops"] else ""))
    peer = r["peer"]
    if peer and "skipped" in peer:
        print(f"peer: skipped ({peer['skipped']})")
    elif peer:
        print(f"peer: {peer['peer']}, PyTorch {peer['torch']} on {peer['device']}"
              f"{', torch.compile' if peer['compiled'] else ''}: "
              f"{peer['images_per_second']:.1f} img/s ({peer['ms_per_step']:.1f} ms/step, "
              f"MFU {100 * r['peer_mfu_measured']:.1f}%); keras-vit/peer: "
              f"{r['peer_ratio']:.2f}x")
    return 0
