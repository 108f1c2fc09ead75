"""Measure what LightUNet and its peers cost to run (reads nothing, writes only temporary ONNX files).

Prints one table with a row per measurement:

- CPU inference at --size x --size, batch 1, for each --threads: PyTorch eager, PyTorch with
  channels_last tensors, and ONNX Runtime on a plain `export_onnx` of the same network. Each time is the
  median of --repeats runs after --warmup runs; "speed" is relative to eager at the same thread count.
- The same for peers: MONAI `UNet` (the tutorial configuration: 16..256 channels, 4 strides, 2 residual
  units) and `BasicUNet` (defaults), segmentation_models_pytorch `Unet` (resnet34 encoder, random
  weights). A peer whose package is missing gets a "not installed" row.
- With a CUDA device: a LightUNet training step (forward, BCE loss, backward, Adam) at --size, for each
  --batches, in fp32 (TF32 convolutions, torch's default) and under autocast in bf16 and fp16, with and
  without activation checkpointing: peak memory allocated by tensors and images/s; "speed" is
  relative to fp32 without checkpointing at the same batch. Without one, the table says so.

    python benchmarks/model_cost.py                      # the full measurement (several minutes)
    python benchmarks/model_cost.py --size 512 --repeats 2 --threads 2 --models lightunet
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from model import build_variant, count_parameters, export_onnx

FINAL = "separable+residual"
GIB = 2**30
GPU_TARGET_GIB = 8  # the paper's "one mass-market GPU": batch 2 with AMP must fit in 8 GiB


@dataclass
class Row:
    """One measurement: which network, how it ran, and what it cost."""

    model: str
    params: int | None = None
    run: str = ""
    setting: str = ""
    seconds: float | None = None  # per forward pass (CPU) or per training step (GPU)
    images_per_s: float | None = None
    peak_gib: float | None = None
    speed: float | None = None  # relative to the first row of its group
    note: str = ""


@dataclass(frozen=True)
class Peer:
    """A network to compare: its name, the package it needs, how to build it, its size multiple."""

    name: str
    package: str
    build: Callable[[], nn.Module]
    size_multiple: int


def _monai_unet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def _monai_basic_unet() -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)


def _smp_unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=2)


MODELS = {
    "lightunet": Peer("LightUNet (final)", "torch", lambda: build_variant(FINAL), 2**7),
    "monai-unet": Peer("MONAI UNet", "monai", _monai_unet, 2**4),
    "monai-basicunet": Peer("MONAI BasicUNet", "monai", _monai_basic_unet, 2**4),
    "smp-unet": Peer("smp Unet resnet34", "segmentation_models_pytorch", _smp_unet, 2**5),
}


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Return the median wall time of fn over repeats calls, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def log(message: str) -> None:
    """Report progress on stderr, so stdout holds the table alone."""
    print(message, file=sys.stderr, flush=True)


def cpu_rows(key: str, args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Time one network's CPU inference: eager, channels_last and ONNX Runtime, per thread count."""
    peer = MODELS[key]
    if importlib.util.find_spec(peer.package) is None:
        return [Row(peer.name, note=f"not installed ({peer.package})")]
    if args.size % peer.size_multiple:
        return [Row(peer.name, note=f"--size must be a multiple of {peer.size_multiple}")]
    torch.manual_seed(0)
    net = peer.build().eval()
    params = count_parameters(net)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x = torch.randn(1, 1, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    log(f"{peer.name}: exporting to ONNX")
    onnx_note = ""
    onnx_path: Path | None = workdir / f"{key}.onnx"
    try:
        export_onnx(net, onnx_path, example=torch.zeros(2, 1, 2 * peer.size_multiple, 2 * peer.size_multiple),
                    size_multiple=peer.size_multiple)
    except Exception as exc:  # a peer's export failure is a finding to report, not a crash
        onnx_note, onnx_path = f"export failed: {type(exc).__name__}", None

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        setting = f"{threads} thread{'s' if threads > 1 else ''}"

        def timed(run: str, fn: Callable[[], object]) -> float:
            log(f"{peer.name}: {run}, {setting}")  # noqa: B023 (called at once, inside the loop)
            return median_seconds(fn, args.repeats, args.warmup)

        with torch.inference_mode():
            eager = timed("eager", lambda: net(x))
            channels_last = timed("channels_last", lambda: net_cl(x_cl))
        rows.append(Row(peer.name, params, "CPU eager", setting, eager, 1 / eager, speed=1.0))
        rows.append(Row(peer.name, params, "CPU channels_last", setting, channels_last, 1 / channels_last,
                        speed=eager / channels_last))
        if onnx_path is None:
            rows.append(Row(peer.name, params, "CPU ONNX Runtime", setting, note=onnx_note))
            continue
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        onnx_runtime = timed("ONNX Runtime", lambda: session.run(None, feed))  # noqa: B023
        rows.append(Row(peer.name, params, "CPU ONNX Runtime", setting, onnx_runtime, 1 / onnx_runtime,
                        speed=eager / onnx_runtime))
    return rows


def make_train_step(batch: int, size: int, precision: str, checkpointing: bool,
                    device: torch.device) -> Callable[[], None]:
    """Return one LightUNet training step (forward, BCE loss, backward, Adam) on random data."""
    torch.manual_seed(0)
    net = build_variant(FINAL, checkpointing=checkpointing).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # fp16's narrow exponent needs loss scaling; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    x = torch.randn(batch, 1, size, size, device=device)
    target = (torch.rand(batch, 2, size, size, device=device) > 0.99).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.binary_cross_entropy_with_logits(net(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def train_step_row(size: int, batch: int, precision: str, checkpointing: bool, repeats: int, warmup: int,
                   device: torch.device) -> Row:
    """Measure one configuration of a LightUNet training step: seconds, images/s, peak memory."""
    name = MODELS["lightunet"].name
    with torch.device("meta"):
        params = count_parameters(build_variant(FINAL))
    setting = f"batch {batch}, {precision}" + (", checkpointing" if checkpointing else "")
    cuda = device.type == "cuda"
    step = None
    try:
        step = make_train_step(batch, size, precision, checkpointing, device)
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(step, repeats, 0)
        peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    except torch.OutOfMemoryError:
        return Row(name, params, "GPU train step", setting, note="out of memory")
    finally:
        del step  # frees the network, optimizer and data before the next configuration's peak
        if cuda:
            torch.cuda.empty_cache()
    return Row(name, params, "GPU train step", setting, seconds, batch / seconds, peak)


def gpu_rows(args: argparse.Namespace) -> list[Row]:
    """Measure LightUNet training steps on the CUDA device for every batch, precision and checkpointing."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest algorithms
    precisions = ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    rows = []
    for batch in args.batches:
        baseline = None
        for checkpointing in (False, True):
            for precision in precisions:
                log(f"GPU: batch {batch}, {precision}, checkpointing {checkpointing}")
                row = train_step_row(args.size, batch, precision, checkpointing, args.repeats, args.warmup,
                                     device)
                if baseline is None:
                    baseline = row.seconds
                if row.seconds is not None and baseline is not None:
                    row.speed = baseline / row.seconds
                rows.append(row)
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(rows: list[Row], notes: list[str], title: str) -> None:
    """Print the rows as one table, notes underneath."""
    table = Table(title=title, caption="\n".join(notes), caption_justify="left")
    for header in ("model", "params", "run", "setting", "s / pass", "images/s", "peak GiB", "speed", "note"):
        table.add_column(header, justify="right" if header in {"params", "s / pass", "images/s", "peak GiB",
                                                               "speed"} else "left")
    for row in rows:
        table.add_row(row.model, "" if row.params is None else f"{row.params / 1e6:.2f}M", row.run,
                      row.setting, _fmt(row.seconds, ".3f"), _fmt(row.images_per_s, ".2f"),
                      _fmt(row.peak_gib, ".2f"), "" if row.speed is None else f"{row.speed:.2f}x", row.note)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # off a terminal rich assumes 80 columns and cuts cells
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; the defaults are the full measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1536, help="input height and width (default: 1536)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads (default: 1 2)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="networks to time on the CPU (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4],
                        help="GPU training batch sizes (default: 1 2 4)")
    parser.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU rows")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows: list[Row] = []
    notes = [f"CPU: batch 1, median of {args.repeats} runs after {args.warmup} warm-up; speed = vs eager "
             "at the same thread count. ONNX Runtime: default graph optimisations, CPU provider."]
    if args.cpu:
        with tempfile.TemporaryDirectory() as workdir:
            for key in args.models:
                rows += cpu_rows(key, args, Path(workdir))
    if torch.cuda.is_available():
        rows += gpu_rows(args)
        name = torch.cuda.get_device_name()
        notes.append(f"GPU: {name}; peak = torch.cuda.max_memory_allocated; speed = vs fp32 without "
                     f"checkpointing at the same batch. Target: batch 2 with AMP under {GPU_TARGET_GIB} GiB.")
    else:
        notes.append("no CUDA device: GPU rows skipped")
    render(rows, notes, f"Model cost at {args.size}x{args.size} (torch {torch.__version__}, "
                        f"onnxruntime {ort.__version__})")


if __name__ == "__main__":
    main()
