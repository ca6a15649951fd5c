"""Host->device copy bandwidth: expertd's pinned shared-memory slab and copier vs plain torch.

    python bench/h2d_bandwidth.py [--slot-mib 16] [--slots 64] [--passes 3]

expertd copies an expert from a slot of its host slab (POSIX shared memory registered
with cudaHostRegister) into a slot of its device slab on a dedicated stream
(`expertd.daemon.service.engine.cuda_copier`). The baseline copies the same bytes from a
torch pinned tensor (``pin_memory=True``) to the GPU, slot by slot, with the same
synchronisation. Goal: ratio >= 0.9. Without CUDA it says so and exits 0. The last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slot-mib", type=int, default=16)
    parser.add_argument("--slots", type=int, default=64, help="host slots (the data copied per pass)")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA here: nothing to measure")
        print(json.dumps({"bench": "h2d_bandwidth", "skipped": "no CUDA"}))
        return 0

    from expertd.daemon.service.engine import cuda_copier
    from expertd.daemon.service.slabs import CudaDeviceSlab, HostSlab

    slot_bytes = args.slot_mib << 20
    device_slots = 8
    host = HostSlab("bench-h2d", args.slots, slot_bytes)
    device = CudaDeviceSlab(device_slots, slot_bytes)
    try:
        host.array[:] = 1  # fault every page in before timing
        pinned = host.pin_for_cuda()
        copy = cuda_copier(host, device)
        baseline_src = torch.ones(args.slots * slot_bytes, dtype=torch.uint8, pin_memory=True)
        baseline_dst = torch.empty(device_slots * slot_bytes, dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()

        def ours() -> None:
            for slot in range(args.slots):
                copy(slot, slot % device_slots, slot_bytes)

        def baseline() -> None:
            for slot in range(args.slots):
                src = baseline_src[slot * slot_bytes : (slot + 1) * slot_bytes]
                dst_start = (slot % device_slots) * slot_bytes
                with torch.cuda.stream(stream):
                    baseline_dst[dst_start : dst_start + slot_bytes].copy_(src, non_blocking=True)
                stream.synchronize()

        timings: dict[str, list[float]] = {"expertd": [], "torch": []}
        ours()
        baseline()  # warm both
        for _ in range(args.passes):
            for name, run in (("expertd", ours), ("torch", baseline)):
                torch.cuda.synchronize()
                started = time.perf_counter()
                run()
                torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - started)
        moved = args.slots * slot_bytes
        gbps = {name: moved / min(t) / 1e9 for name, t in timings.items()}
        ratio = gbps["expertd"] / gbps["torch"]
        print(f"device {torch.cuda.get_device_name()}; {args.slots} copies of {args.slot_mib} MiB per pass")
        print(f"expertd (shm slab, cudaHostRegister: {pinned}) {gbps['expertd']:7.2f} GB/s")
        print(f"torch pinned tensor                          {gbps['torch']:7.2f} GB/s")
        print(f"ratio {ratio:.3f} (goal >= 0.9)")
        print(
            json.dumps(
                {
                    "bench": "h2d_bandwidth",
                    "device": torch.cuda.get_device_name(),
                    "expertd_gbps": gbps["expertd"],
                    "torch_pinned_gbps": gbps["torch"],
                    "ratio": ratio,
                    "goal_ratio": 0.9,
                    "host_registered": pinned,
                }
            )
        )
    finally:
        device.close()
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
