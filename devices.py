"""Where training and torch scoring run: the device, mixed precision, and torchrun's processes."""

import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cli import check_device
from errors import UserError


def choose_device(name="auto"):
    """'auto' picks CUDA when present; asking for CUDA without one is a user error. The names
    allowed and the message are the serving engine's too (cli.check_device)."""
    name = str(name)
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def cpu_has_native_bf16():
    """AMX or AVX512-BF16: bf16 autocast is then much faster than fp32 on the CPU."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def choose_amp_dtype(device, amp="auto"):
    """The autocast dtype for `--amp auto|bf16|fp16|off`; None means full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or off")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def amp_name(amp_dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


@dataclass
class Runtime:
    """Where this process trains, and its place among torchrun's processes."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def log(self, message):
        if self.is_main:
            print(message, flush=True)


def start_runtime(args):
    """Choose device and precision; join torchrun's process group when there is one."""
    device = choose_device(args.device)
    amp_dtype = choose_amp_dtype(device, args.amp)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    runtime = Runtime(device, amp_dtype, rank, world_size)
    if device.type == "cpu" and args.device == "auto":
        runtime.log("Note: no CUDA GPU found, training on the CPU (slow; see the README for GPUs).")
    runtime.log(
        f"Training on {device.type} in {amp_name(amp_dtype)}, {world_size} process(es), "
        f"{args.batch_size} x {args.accumulation_steps} accumulated images per step and process."
    )
    if device.type == "cpu":
        runtime.log(f"CPU: {cpu_description()}.")
    return runtime


def cpu_description():
    """The CPU's name, the widest instruction set torch uses on it, and its bf16 instructions:
    whether bf16 pays depends on them (docs/measurements.md), so the logs name them."""
    bf16 = [
        name
        for name, present in (
            ("AMX", torch.cpu._is_amx_tile_supported()),
            ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
        )
        if present
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_name()}, {capability}, bf16 instructions: {', '.join(bf16) or 'none'}"


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the platform module's answer below
    return platform.processor() or "unknown CPU"


def stop_runtime(runtime):
    if runtime.world_size > 1:
        dist.destroy_process_group()
