"""The PyTorch peer of `keras-vit benchmark-accelerator`: training images/s of timm's
VisionTransformer (`vit_base_patch16_224` at B/16 224, with keras-vit's tanh GELU so that
both compute the same function) as timm users run it on a GPU:
`torch.compile`, bfloat16 autocast, SDPA attention (timm's fused attention), fused AdamW,
global-norm clipping, batches copied from pinned host memory each step as a loader would.
Where timm is missing, Hugging Face's ViT (SDPA attention) stands in, and says so.

It runs as its own process (`python -m keras_vit.cli.torch_peer ...`, one JSON line
out), so PyTorch and the Keras backend never share the device's memory in one process.
"""

import statistics
import time


def build_model(args):
    """(the model, a function images -> logits, its description)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        VisionTransformer = None
    if VisionTransformer is not None:
        import functools

        import timm
        import torch

        model = VisionTransformer(
            img_size=args.image_size, patch_size=args.patch_size, embed_dim=args.width,
            depth=args.depth, num_heads=args.heads, mlp_ratio=args.mlp_dim / args.width,
            num_classes=args.num_classes,
            act_layer=functools.partial(torch.nn.GELU, approximate="tanh"))
        return model, model, f"timm {timm.__version__} VisionTransformer"
    import transformers

    config = transformers.ViTConfig(
        hidden_size=args.width, num_hidden_layers=args.depth, num_attention_heads=args.heads,
        intermediate_size=args.mlp_dim, image_size=args.image_size,
        patch_size=args.patch_size, num_labels=args.num_classes, layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh", attn_implementation="sdpa")
    model = transformers.ViTForImageClassification(config)
    return model, lambda x: model(pixel_values=x).logits, (
        f"Hugging Face transformers {transformers.__version__} ViT (timm is not installed)")


def measure(args):
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model, forward, described = build_model(args)
    model.to(device).train()
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if compiled:
        forward = torch.compile(forward)
    dtype = {"mixed_bfloat16": torch.bfloat16, "mixed_float16": torch.float16}.get(
        args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=device.type == "cuda")
    pin = device.type == "cuda"
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size,
                        pin_memory=pin) * 2 - 1
    labels = torch.randint(0, args.num_classes, (args.batch_size,), pin_memory=pin)

    def step():
        x = images.to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x).float(), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def call():
        for _ in range(args.steps):
            loss = step()
        loss.item()  # waits for the device

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"peer": described, "torch": torch.__version__, "device": device.type,
            "compiled": compiled, "first_call_seconds": first,
            "images_per_second": args.batch_size * args.steps / seconds,
            "ms_per_step": 1000 * seconds / args.steps}
