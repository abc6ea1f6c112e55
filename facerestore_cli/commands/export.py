"""`export`: the restorer as an ONNX graph or a TensorRT engine, for `restore --backend onnx|tensorrt`.
Option parsing and printing only; the work is in `facerestore_cli.export`."""

from __future__ import annotations

from pathlib import Path

import click

from facerestore_cli.commands.ui import console, device_option, model_options, user_errors


@click.command("export")
@model_options(
    "LoRA adapter (.safetensors), merged into the exported weights.",
    "Restorer folder, a Stable Diffusion 2.1-base folder with --osediff, or an osediff model file (*.toml) or its store name"
    " (multi-step diffbir-v1 models are not exported) [default: bundled weights/restorer-tiny].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "tensorrt"]),
    default="onnx",
    show_default=True,
    help="onnx: one graph for onnxruntime (any machine); tensorrt: an fp16 engine for this GPU.",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Engine file to write (.onnx / .engine); its sidecar goes to OUTPUT.json.",
)
@click.option("--face-size", type=click.IntRange(16), default=None, help="Face crop size the engine takes [default: the model's, 512].")
@click.option("--opset", type=click.IntRange(14), default=17, show_default=True, help="ONNX opset (--format onnx).")
@click.option("--fp16", is_flag=True, help="--format onnx: fp16 weights and compute (float32 in and out), for CUDA.")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="--format tensorrt: most faces per call (restore's --batch-size).",
)
@device_option("Where to trace the model (and build TensorRT engines: cuda).")
def export_cmd(model, lora, osediff, fmt, out, face_size, opset, fp16, max_batch, device) -> None:
    """Export the restorer (VAE encoder, UNet step(s), VAE decoder; LoRA merged) as one engine.

    Weights over protobuf's 2 GB (SD 2.1 / OSEDiff) go to one OUTPUT.data file next to the
    graph; keep the two together.

    \b
    Examples:
      facerestore export --model runs/tiny/final --lora runs/lrpo/lora.safetensors -o tiny.onnx
      facerestore restore photos/ -o out/ --model runs/tiny/final --lora runs/lrpo/lora.safetensors --backend onnx --engine tiny.onnx
      facerestore export --format tensorrt -o tiny.engine --max-batch 16
      facerestore export --model osediff-face -o osediff-face.onnx   (weights over 2 GB: + osediff-face.onnx.data)
    """
    from facerestore_cli.devices import resolve_device
    from facerestore_cli.export.engines import make_onnx, make_tensorrt
    from facerestore_cli.export.source import ModelSource
    from facerestore_cli.models.loading import DEFAULT_MODEL

    with user_errors():
        source = ModelSource(model or DEFAULT_MODEL, lora, osediff)
        dev = resolve_device(device)
        with console.status(f"exporting {source.model} to {fmt}"):
            if fmt == "onnx":
                meta = make_onnx(source, out, face_size, fp16, opset, dev)
            else:
                meta = make_tensorrt(source, out, face_size, max_batch, dev)
    data = out.with_name(out.name + ".data")  # the external weights of a large ONNX export
    data = data if fmt == "onnx" and data.is_file() else None
    size_mb = (out.stat().st_size + (data.stat().st_size if data else 0)) / 2**20
    files = f"{out} + {data.name}" if data else str(out)
    console.print(
        f"{fmt} engine: {files} ({size_mb:.1f} MiB), {meta.face_size} px, {meta.sampling_steps} UNet step(s), "
        f"model {meta.config_name} (fingerprint {meta.model_fingerprint}); sidecar {out.name}.json",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
    console.print(
        f"use it with: facerestore restore ... --backend {fmt} --engine {out} (and the same --model/--lora)",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )
