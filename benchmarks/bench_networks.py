"""Network table: parameters, size, GFLOPs at each seed's patch size, CPU forward time at 64^3.

    python benchmarks/bench_networks.py [--threads N] [--repeats 3]

FLOPs are counted with ``torch.utils.flop_counter`` on the meta device (shapes only: instant,
no memory). The CPU time is the median of ``--repeats`` eval-mode, no-grad forward passes of a
[1, C, 64, 64, 64] input (2.5D network: 64 slices of 64x64 as one batch of 2D images) after one
warm-up pass. Prints the Markdown table of KidneyTumorSegLib/networks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from KidneyTumorSegLib.networks import available, build_network, count_flops, count_parameters

#: registry name -> (seed, kwargs, input shape at the seed's patch size [B, C, *spatial])
SEED_CONFIGS = {
    "unet3d_se_hdc_da": ("Liu, coarse to fine (000)", {}, (1, 1, 80, 160, 160)),
    "resunet3d_ds": ("3D ResUNet + 2.5D VNet (001)", {}, (1, 1, 64, 256, 256)),
    "vnet25d_ms_se_ag": ("3D ResUNet + 2.5D VNet (001)", {"in_channels": 5}, (1, 5, 512, 512)),
    "vbnet": ("Mu, multi-resolution VB-nets (002)", {}, (1, 1, 96, 96, 96)),
    "vnet": ("Wei, two-phase framework (003)", {}, (1, 1, 80, 240, 384)),
    "vnet_two_stage": ("Wei, two-phase framework (003)", {}, (1, 1, 80, 240, 384)),
    "deeplabv3plus3d": ("Daza, DeepLab v3+ 3D (004)", {}, (1, 1, 48, 48, 48)),
}


def gflops_on_meta(name: str, kwargs: dict, shape: tuple) -> float:
    with torch.device("meta"):
        model = build_network(name, num_classes=3, **kwargs)
    return count_flops(model, shape) / 1e9 if _meta_ok(model, shape) else float("nan")


def _meta_ok(model, shape) -> bool:
    try:
        with torch.device("meta"):
            count_flops(model, shape)
        return True
    except Exception as exc:  # a network op without a meta kernel
        print(f"warning: FLOPs of {type(model).__name__} not countable on meta: {exc}", file=sys.stderr)
        return False


def cpu_forward_seconds(name: str, kwargs: dict, repeats: int) -> float:
    model = build_network(name, num_classes=3, **kwargs).eval()
    if getattr(model, "spatial_dims", 3) == 2:
        x = torch.randn(64, kwargs.get("in_channels", 1), 64, 64)
    else:
        x = torch.randn(1, kwargs.get("in_channels", 1), 64, 64, 64)
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s)")
    print("| network | seed | parameters | MB (float32) | GFLOPs at the seed's patch | seed patch [B, C, D, H, W] | CPU forward at 64³ (s) |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for name in available():
        if name not in SEED_CONFIGS:
            continue
        seed, kwargs, shape = SEED_CONFIGS[name]
        model = build_network(name, num_classes=3, **kwargs)
        params = count_parameters(model)
        gflops = gflops_on_meta(name, kwargs, shape)
        seconds = cpu_forward_seconds(name, kwargs, args.repeats)
        print(f"| `{name}` | {seed} | {params:,} | {params * 4 / 1e6:.1f} | {gflops:,.1f} | {list(shape)} | {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
